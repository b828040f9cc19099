"""The synthetic scenes: how each class looks and how one scene is drawn (stuff bands and wall patches,
overlapping thing instances, thin unlabelled borders, crowds). `synthetic.py` writes scenes to disk in the
ADE20K and COCO-panoptic formats.

A class is identified by the combination (shape, hue bucket, texture): consecutive thing classes share their
hue, so color alone does not tell them apart and the network must look at shape and texture. Every scene is
drawn from the RNG it is handed, with numpy only, so the same stream gives the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from maskformer_cli.data.catalog import SYNTHETIC_SHAPES

NUM_HUES = 8
NUM_TEXTURES = 4


@dataclass(frozen=True)
class ClassLook:
    """How one class is drawn. shape is None for stuff classes; texture indexes the stuff or thing patterns."""

    shape: str | None
    hue: float
    saturation: float
    value: float
    texture: int


def class_looks(num_classes: int) -> list[ClassLook]:
    """The appearance of every class, index = contiguous class id (the first num_classes // 3 are stuff).

    Thing t (class i = num_stuff + t): shape SYNTHETIC_SHAPES[i % 6] (the catalog's class names say it), hue
    bucket (t // 2) % 8 so pairs of classes share a color, texture ((t % 48) // 3 + t // 48) % 4. Shape and
    hue together identify t mod 48 and the texture identifies t // 48 mod 4, so the first 192 thing classes
    are pairwise distinct; beyond that a darker value level separates them.
    """
    num_stuff = max(1, num_classes // 3)
    looks = []
    for s in range(num_stuff):
        looks.append(ClassLook(
            shape=None,
            hue=(0.07 + s * 0.381966) % 1.0,
            saturation=0.28 + 0.14 * ((s // 4) % 2),
            value=0.78 - 0.18 * ((s // 8) % 2),
            texture=s % 4,
        ))
    for t in range(num_classes - num_stuff):
        i = num_stuff + t
        level = t // (48 * NUM_TEXTURES)
        looks.append(ClassLook(
            shape=SYNTHETIC_SHAPES[i % len(SYNTHETIC_SHAPES)],
            hue=((t // 2) % NUM_HUES) / NUM_HUES,
            saturation=0.8,
            value=0.95 - 0.3 * (level % 3),
            texture=((t % 48) // 3 + t // 48) % NUM_TEXTURES,
        ))
    return looks


# ------------------------------------------------------------------------------------------ drawing


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, all in [0, 1]; returns [..., 3]."""
    h = np.mod(h, 1.0) * 6.0
    i = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    u = (xx - cx) * c + (yy - cy) * s
    w = -(xx - cx) * s + (yy - cy) * c
    if shape == "disk":
        return u * u + w * w <= r * r
    if shape == "ring":
        d2 = u * u + w * w
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "square":
        return (np.abs(u) <= 0.8 * r) & (np.abs(w) <= 0.8 * r)
    if shape == "triangle":  # equilateral, circumradius r: inside the three edge half-planes
        out = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = k * 2 * np.pi / 3
            out &= u * np.cos(a) + w * np.sin(a) <= 0.5 * r
        return out
    if shape == "cross":
        return ((np.abs(u) <= r) & (np.abs(w) <= 0.3 * r)) | ((np.abs(w) <= r) & (np.abs(u) <= 0.3 * r))
    if shape == "bar":
        return (np.abs(u) <= r) & (np.abs(w) <= 0.28 * r)
    raise ValueError(f"unknown shape {shape!r}")


def _thing_pattern(texture: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray,
                   cy: float, cx: float, r: float, size: int) -> np.ndarray:
    """Value multiplier [H, W] of a thing texture: plain, striped, dotted, gradient."""
    if texture == 0:
        return np.ones_like(yy)
    angle = rng.uniform(0, np.pi)
    period = max(4.0, size / 22) * rng.uniform(0.8, 1.25)
    proj = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    if texture == 1:
        return np.where(np.sin(2 * np.pi * proj / period) > 0, 1.0, 0.6)
    if texture == 2:
        oy, ox = (yy - cy) % period - period / 2, (xx - cx) % period - period / 2
        return np.where(oy * oy + ox * ox <= (0.3 * period) ** 2, 0.5, 1.0)
    return 0.55 + 0.45 * np.clip((proj + r) / (2 * r), 0.0, 1.0)


def _stuff_pattern(texture: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    """Value multiplier [H, W] of a stuff texture: sky-like gradient, grass-like noise, bricks, wood grain."""
    if texture == 0:
        return 0.75 + 0.3 * (1 - yy / size)
    if texture == 1:
        noise = rng.random(yy.shape)
        noise = (noise + np.roll(noise, 1, 0) + np.roll(noise, 1, 1) + np.roll(noise, (1, 1), (0, 1))) / 4
        return 0.7 + 0.5 * noise
    if texture == 2:
        p = max(6.0, size / 12)
        row = np.floor(yy / p)
        joint = ((xx + (row % 2) * p) % (2 * p)) < 1.5
        mortar = (yy % p) < 1.5
        return np.where(mortar | joint, 0.6, 1.0)
    p = max(5.0, size / 16)
    return 0.85 + 0.15 * np.sin(2 * np.pi * (yy + 3 * np.sin(xx / p)) / p)


def _wavy(rng: np.random.Generator, xs: np.ndarray, size: int, base: float) -> np.ndarray:
    """A smooth random boundary y(x) around base * size."""
    a1, a2 = rng.uniform(0.02, 0.06), rng.uniform(0.0, 0.025)
    f1, f2 = rng.uniform(0.5, 1.5), rng.uniform(2.0, 4.0)
    p1, p2 = rng.uniform(0, 2 * np.pi, size=2)
    return size * (base + a1 * np.sin(2 * np.pi * f1 * xs / size + p1) + a2 * np.sin(2 * np.pi * f2 * xs / size + p2))


def _edges(labels: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour has a different label (a 1-2 px border once both sides count)."""
    e = np.zeros(labels.shape, dtype=bool)
    dy = labels[1:, :] != labels[:-1, :]
    dx = labels[:, 1:] != labels[:, :-1]
    e[1:, :] |= dy
    e[:-1, :] |= dy
    e[:, 1:] |= dx
    e[:, :-1] |= dx
    return e


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:, :] |= mask[:-1, :]
    out[:-1, :] |= mask[1:, :]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


@dataclass
class Scene:
    """One generated image and its ground truth.

    image:    [H, W, 3] uint8 RGB.
    semantic: [H, W] int64 contiguous class ids, -1 where unlabelled ("other"/void).
    panoptic: [H, W] int64 segment ids, 0 = void.
    segments: list of (segment id, contiguous class, iscrowd) in id order.
    """

    image: np.ndarray
    semantic: np.ndarray
    panoptic: np.ndarray
    segments: list[tuple[int, int, int]]


class _Instance(NamedTuple):
    """One thing instance as placed: contiguous class, center (cy, cx) and radius r in pixels, angle in radians."""

    cls: int
    cy: float
    cx: float
    r: float
    angle: float


def make_scene(rng: np.random.Generator, looks: list[ClassLook], size: int) -> Scene:
    """Draw one scene with its semantic and panoptic ground truth (see the module docstring).

    The steps below draw from `rng` in this fixed order, and each draws in a fixed order inside: reordering
    any of them changes every generated byte (and with it the golden loss curve the tests pin).
    """
    num_stuff = sum(1 for lk in looks if lk.shape is None)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    stuff = _lay_out_stuff(rng, num_stuff, yy, xx, size)
    other = _unlabelled_pixels(rng, stuff, yy, xx, size)
    things = _place_things(rng, looks, num_stuff, size)
    inst, alive = _paint_things(looks, things, yy, xx, size)
    other = _outline_things(rng, inst, alive, other)
    semantic = np.where(inst >= 0, np.take(np.array([t.cls for t in things] + [0]), inst), stuff)
    semantic[other] = -1
    crowd_cls = _pick_crowd_class(rng, things, alive)
    panoptic, segments = _panoptic_segments(stuff, other, inst, things, alive, crowd_cls)
    image = _render(rng, looks, stuff, other, inst, things, alive, yy, xx, size)
    return Scene(image=image, semantic=semantic, panoptic=panoptic, segments=segments)


def _lay_out_stuff(rng: np.random.Generator, num_stuff: int, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    """Stuff class map [H, W] int64: 1-3 wavy bands (sky-like top, wall-like middle, ground-like bottom), in 35%
    of images with a wobbly rounded patch of any stuff class painted over them."""
    xs = np.arange(size, dtype=np.float64)
    n = int(rng.integers(1, min(3, num_stuff) + 1))
    chosen = rng.choice(num_stuff, size=n, replace=False)
    stuff = np.full((size, size), int(chosen[0]), dtype=np.int64)
    if n >= 2:
        bounds = [_wavy(rng, xs, size, rng.uniform(0.3, 0.6))] if n == 2 else \
            [_wavy(rng, xs, size, rng.uniform(0.2, 0.4)), _wavy(rng, xs, size, rng.uniform(0.6, 0.8))]
        for k, b in enumerate(bounds):
            stuff[yy >= b[None, :]] = int(chosen[k + 1])
    if rng.random() < 0.35:
        cy, cx = rng.uniform(0.3, 0.7, size=2) * size
        ay, ax = rng.uniform(0.12, 0.28, size=2) * size
        wob = 1 + 0.15 * np.sin(3 * np.arctan2(yy - cy, xx - cx) + rng.uniform(0, 2 * np.pi))
        patch = ((yy - cy) / ay) ** 4 + ((xx - cx) / ax) ** 4 <= wob
        stuff[patch] = int(rng.integers(num_stuff))
    return stuff


def _unlabelled_pixels(rng: np.random.Generator, stuff: np.ndarray, yy: np.ndarray, xx: np.ndarray,
                       size: int) -> np.ndarray:
    """Bool [H, W] of "other" pixels before things are placed: the borders between stuff regions (70% of
    images) and, in 15% of images, a small unlabelled disk."""
    other = _edges(stuff) if rng.random() < 0.7 else np.zeros((size, size), dtype=bool)
    if rng.random() < 0.15:  # an unlabelled clutter object, as ADE20K's "other"
        cy, cx = rng.uniform(0.15, 0.85, size=2) * size
        other |= _shape_mask("disk", yy, xx, cy, cx, size * rng.uniform(0.04, 0.08), 0.0)
    return other


def _place_things(rng: np.random.Generator, looks: list[ClassLook], num_stuff: int, size: int) -> list[_Instance]:
    """1-3 thing classes with 1-3 instances each, in painter's order (later instances occlude earlier ones).

    Half of the classes group their instances around one point, so that same-class instances touch or
    overlap: the case a semantic mask cannot split into instances.
    """
    num_things = len(looks) - num_stuff
    if num_things == 0:
        return []
    things: list[_Instance] = []
    n_cls = int(rng.integers(1, min(3, num_things) + 1))
    for c in rng.choice(num_things, size=n_cls, replace=False):
        gy, gx = rng.uniform(0.2, 0.8, size=2) * size
        grouped = rng.random() < 0.5
        for _ in range(int(rng.integers(1, 4))):
            if grouped:
                cy, cx = gy + rng.normal(0, 0.12 * size), gx + rng.normal(0, 0.12 * size)
            else:
                cy, cx = rng.uniform(0.1, 0.9, size=2) * size
            r = size * rng.uniform(0.06, 0.16)
            things.append(_Instance(num_stuff + int(c), cy, cx, r, rng.uniform(0, 2 * np.pi)))
    order = rng.permutation(len(things))
    return [things[k] for k in order]


def _paint_things(looks: list[ClassLook], things: list[_Instance], yy: np.ndarray, xx: np.ndarray,
                  size: int) -> tuple[np.ndarray, list[int]]:
    """Instance map [H, W] int64 (index into `things`, -1 = stuff) and the indices still visible.

    Instances left with fewer than min_area visible pixels are hidden almost entirely: their pixels go back
    to stuff so no segment is a few stray pixels.
    """
    inst = np.full((size, size), -1, dtype=np.int64)
    for k, t in enumerate(things):
        inst[_shape_mask(looks[t.cls].shape or "disk", yy, xx, t.cy, t.cx, t.r, t.angle)] = k
    min_area = max(8, int(0.0015 * size * size))
    areas = np.bincount(inst[inst >= 0], minlength=len(things))
    for k in np.flatnonzero(areas < min_area):
        inst[inst == k] = -1
    alive = [k for k in range(len(things)) if areas[k] >= min_area]
    return inst, alive


def _outline_things(rng: np.random.Generator, inst: np.ndarray, alive: list[int], other: np.ndarray) -> np.ndarray:
    """The final "other" mask [H, W]: `other` plus a 1 px outline around 20% of the visible instances, as
    ADE20K annotators leave them, restricted to pixels no instance covers."""
    for k in alive:
        if rng.random() < 0.2:
            other |= _dilate(inst == k) & (inst < 0)
    return other & (inst < 0)


def _pick_crowd_class(rng: np.random.Generator, things: list[_Instance], alive: list[int]) -> int | None:
    """In 15% of images, one class with at least two visible instances whose instances form one crowd
    segment (COCO's iscrowd=1); None otherwise."""
    by_class: dict[int, int] = {}
    for k in alive:
        by_class[things[k].cls] = by_class.get(things[k].cls, 0) + 1
    if rng.random() < 0.15:
        groups = [c for c, n in sorted(by_class.items()) if n >= 2]
        if groups:
            return groups[int(rng.integers(len(groups)))]
    return None


def _panoptic_segments(stuff: np.ndarray, other: np.ndarray, inst: np.ndarray, things: list[_Instance],
                       alive: list[int], crowd_cls: int | None) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Panoptic id map [H, W] int64 (0 = void) and its segments, see Scene: one segment per visible stuff
    class (ascending), then one per visible instance in painter's order, with the instances of `crowd_cls`
    merged into one crowd segment placed where its first instance comes."""
    panoptic = np.zeros(stuff.shape, dtype=np.int64)
    segments: list[tuple[int, int, int]] = []

    def new_id(cls: int) -> int:  # R = category id, G = running index: readable like ADE instance maps
        return (cls + 1) + 256 * (len(segments) + 1)

    stuff_visible = (inst < 0) & ~other
    for c in np.unique(stuff[stuff_visible]):
        sid = new_id(int(c))
        panoptic[stuff_visible & (stuff == c)] = sid
        segments.append((sid, int(c), 0))
    crowd_sid = None
    for k in alive:
        c = things[k].cls
        if c == crowd_cls:
            if crowd_sid is None:
                crowd_sid = new_id(c)
                segments.append((crowd_sid, c, 1))
            panoptic[inst == k] = crowd_sid
        else:
            sid = new_id(c)
            panoptic[inst == k] = sid
            segments.append((sid, c, 0))
    return panoptic, segments


def _render(rng: np.random.Generator, looks: list[ClassLook], stuff: np.ndarray, other: np.ndarray,
            inst: np.ndarray, things: list[_Instance], alive: list[int], yy: np.ndarray, xx: np.ndarray,
            size: int) -> np.ndarray:
    """RGB image [H, W, 3] uint8: stuff regions, then the unlabelled pixels (dark gray), then each visible
    instance with its own color jitter, then Gaussian sensor noise over everything."""
    rgb = np.zeros((size, size, 3), dtype=np.float64)
    for c in np.unique(stuff):
        lk = looks[int(c)]
        region = stuff == c
        pat = _stuff_pattern(lk.texture, rng, yy, xx, size)
        h = lk.hue + rng.uniform(-0.02, 0.02)
        v = np.clip((lk.value + rng.uniform(-0.08, 0.08)) * pat, 0, 1)
        m = int(region.sum())
        rgb[region] = _hsv_to_rgb(np.full(m, h), np.full(m, lk.saturation), v[region])
    if other.any():
        rgb[other] = rng.uniform(0.12, 0.3) + rng.normal(0, 0.03, size=(int(other.sum()), 1))
    for k in alive:
        t = things[k]
        lk = looks[t.cls]
        region = inst == k
        pat = _thing_pattern(lk.texture, rng, yy, xx, t.cy, t.cx, t.r, size)
        h = lk.hue + rng.uniform(-0.025, 0.025)
        s = np.clip(lk.saturation + rng.uniform(-0.1, 0.1), 0, 1)
        v = np.clip((lk.value + rng.uniform(-0.1, 0.05)) * pat, 0, 1)
        m = int(region.sum())
        rgb[region] = _hsv_to_rgb(np.full(m, h), np.full(m, s), v[region])
    rgb = rgb * 255.0 + rng.normal(0, 4.0, size=rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
