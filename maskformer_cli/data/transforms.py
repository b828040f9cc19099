"""Joint image + label augmentation: the paper's semantic recipe, DETR's COCO recipe, and test-time resizing.

Every transform is called as `transform(image, labels, pad_values) -> (image, labels)`:

    image:      uint8 [3, H, W] RGB.
    labels:     int64 [C, H, W] label maps that move with the image (nearest-neighbour resampling). Channel 0
                is a category map (its ignore value is pad_values[0]); it drives the crop's category-area
                constraint. Panoptic datasets add a segment-id channel (pad value 0 = void).
    pad_values: one fill value per label channel, used where padding creates pixels.

Randomness comes from torch's global generator, so `torch.manual_seed` (and DataLoader worker seeding)
makes a run reproducible. Resizing follows detectron2's ResizeShortestEdge (bilinear image, pixel-center
nearest labels as PIL's NEAREST); the geometric steps on labels use torchvision.transforms.v2 on tv_tensors.Mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from maskformer_cli.config import DataConfig

IMAGE_PAD_VALUE = 128  # the reference semantic mapper pads crops with mid-grey before normalisation

# DETR's COCO recipe (also MaskFormer's COCO panoptic recipe)
DETR_SCALES = tuple(range(480, 801, 32))
DETR_MAX_SIZE = 1333
DETR_CROP_SCALES = (400, 500, 600)
DETR_CROP_RANGE = (384, 600)


# ------------------------------------------------------------------------------------------- geometry


def shortest_edge_size(h: int, w: int, short: float, max_long: float | None) -> tuple[int, int]:
    """(new_h, new_w) with the short side `short` and the long side at most `max_long` (detectron2's rounding)."""
    scale = short / min(h, w)
    nh, nw = h * scale, w * scale
    if max_long and max(nh, nw) > max_long:
        scale = max_long / max(nh, nw)
        nh, nw = nh * scale, nw * scale
    return max(1, int(nh + 0.5)), max(1, int(nw + 0.5))


def resize_nearest(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[C, H, W] -> [C, h, w]: the source pixel whose center is nearest each target pixel center (any dtype)."""
    h, w = labels.shape[-2:]
    rows = ((torch.arange(size[0], dtype=torch.float64) + 0.5) * (h / size[0])).floor().long().clamp_(max=h - 1)
    cols = ((torch.arange(size[1], dtype=torch.float64) + 0.5) * (w / size[1])).floor().long().clamp_(max=w - 1)
    return labels[..., rows[:, None], cols[None, :]]


def resize(image: torch.Tensor, labels: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (antialiased) image, nearest labels."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image, labels
    image = F.resize(tv_tensors.Image(image), list(size), interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    return image.as_subclass(torch.Tensor), resize_nearest(labels, size)


def crop(image: torch.Tensor, labels: torch.Tensor, top: int, left: int, h: int, w: int
         ) -> tuple[torch.Tensor, torch.Tensor]:
    image = F.crop(tv_tensors.Image(image), top, left, h, w).as_subclass(torch.Tensor)
    return image, F.crop(tv_tensors.Mask(labels), top, left, h, w).as_subclass(torch.Tensor)


def hflip(image: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    image = F.horizontal_flip(tv_tensors.Image(image)).as_subclass(torch.Tensor)
    return image, F.horizontal_flip(tv_tensors.Mask(labels)).as_subclass(torch.Tensor)


def pad_to(image: torch.Tensor, labels: torch.Tensor, size: tuple[int, int], pad_values: Sequence[int],
           image_value: int = IMAGE_PAD_VALUE) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom/right up to `size` (no-op where already as large); each label channel with its own value."""
    h, w = image.shape[-2:]
    ph, pw = max(0, size[0] - h), max(0, size[1] - w)
    if ph == 0 and pw == 0:
        return image, labels
    padding = [0, 0, pw, ph]  # left, top, right, bottom
    image = F.pad(tv_tensors.Image(image), padding, fill=image_value).as_subclass(torch.Tensor)
    labels = torch.stack([
        F.pad(tv_tensors.Mask(labels[c : c + 1]), padding, fill=int(pad_values[c])).as_subclass(torch.Tensor)[0]
        for c in range(labels.shape[0])
    ])
    return image, labels


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, ()).item())


def choice_short_sides(base: int, min_scale: float, max_scale: float) -> tuple[int, ...]:
    """The reference's MIN_SIZE_TRAIN list: int(x * 0.1 * base) for x = min_scale*10 .. max_scale*10 (ADE20K:
    256, 307, 358, ..., 1024), written as the configs write it so that the rounding is theirs."""
    lo, hi = math.ceil(round(min_scale * 10, 6)), math.floor(round(max_scale * 10, 6))
    sides = tuple(int(x * 0.1 * base) for x in range(lo, hi + 1))
    if not sides:
        raise ValueError(f"no short side between {min_scale} and {max_scale} x {base} in steps of 0.1")
    return sides


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()).item())


def _choice(options: Sequence[int]) -> int:
    return options[_randint(0, len(options) - 1)]


def category_constrained_crop(category: torch.Tensor, crop_size: tuple[int, int], cat_max_ratio: float,
                              ignore_value: int, tries: int = 10) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop in which no category covers more than `cat_max_ratio` of the labelled
    pixels and at least two categories appear, retried up to `tries` times (the last try is kept), as
    detectron2's RandomCrop_CategoryAreaConstraint. The crop is clipped to the image; ratio >= 1 disables."""
    h, w = category.shape[-2:]
    ch, cw = min(crop_size[0], h), min(crop_size[1], w)
    for _ in range(tries if cat_max_ratio < 1.0 else 1):
        top, left = _randint(0, h - ch), _randint(0, w - cw)
        if cat_max_ratio >= 1.0:
            break
        window = category[top : top + ch, left : left + cw]
        _, counts = torch.unique(window[window != ignore_value], return_counts=True)
        if counts.numel() > 1 and counts.max().item() < cat_max_ratio * counts.sum().item():
            break
    return top, left, ch, cw


# --------------------------------------------------------------------------------------------- color


def _rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """float [3, H, W] in [0, 1] -> HSV in [0, 1]."""
    r, g, b = rgb.unbind(0)
    maxc, _ = rgb.max(0)
    minc, _ = rgb.min(0)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp(min=1e-12), torch.zeros_like(maxc))
    safe = delta.clamp(min=1e-12)
    h = torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    return torch.stack([h, s, maxc])


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv.unbind(0)
    h6 = (h % 1.0) * 6
    i = h6.floor().long() % 6
    f = h6 - h6.floor()
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = torch.stack([
        torch.stack([v, q, p, p, t, v]),
        torch.stack([t, v, v, q, p, p]),
        torch.stack([p, p, t, v, v, q]),
    ])  # [3, 6, H, W]
    return table.gather(1, i[None, None].expand(3, 1, *i.shape)).squeeze(1)


def color_aug_ssd(image: torch.Tensor, brightness_delta: float = 32, contrast: tuple[float, float] = (0.5, 1.5),
                  saturation: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> torch.Tensor:
    """SSD-style photometric distortion as detectron2's ColorAugSSDTransform (each step with probability 1/2):
    brightness shift, then contrast-saturation-hue or saturation-hue-contrast. Hue moves by up to
    `hue_delta` OpenCV units (2 degrees each). uint8 [3, H, W] in and out, clipped after every step."""
    x = image.float()

    def clip(t: torch.Tensor) -> torch.Tensor:
        return t.clamp(0, 255).floor()  # the reference casts to uint8 after each step

    def contrast_step(t: torch.Tensor) -> torch.Tensor:
        return clip(t * _uniform(*contrast)) if torch.rand(()) < 0.5 else t

    def saturation_step(t: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= 0.5:
            return t
        hsv = _rgb_to_hsv(t / 255)
        hsv[1] = (hsv[1] * _uniform(*saturation)).clamp(0, 1)
        return clip(_hsv_to_rgb(hsv) * 255 + 0.5)

    def hue_step(t: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= 0.5:
            return t
        hsv = _rgb_to_hsv(t / 255)
        hsv[0] = (hsv[0] + _randint(-hue_delta, hue_delta) / 180) % 1.0
        return clip(_hsv_to_rgb(hsv) * 255 + 0.5)

    if torch.rand(()) < 0.5:
        x = clip(x + _uniform(-brightness_delta, brightness_delta))
    if torch.rand(()) < 0.5:
        x = hue_step(saturation_step(contrast_step(x)))
    else:
        x = contrast_step(hue_step(saturation_step(x)))
    return x.to(torch.uint8)


# ---------------------------------------------------------------------------------------- transforms


class TrainSemanticTransform:
    """The paper's semantic recipe (detectron2 order): scale jitter -> category-constrained crop -> color jitter
    -> horizontal flip -> pad to the crop size (image grey, labels with their pad values)."""

    def __init__(self, crop_size: tuple[int, int], min_scale: float = 0.5, max_scale: float = 2.0,
                 base_short_side: int = 512, max_long_side: int = 2048, cat_max_ratio: float = 1.0,
                 color_jitter: bool = True, flip: bool = True, scale_sampling: str = "choice") -> None:
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.min_scale, self.max_scale = min_scale, max_scale
        if scale_sampling not in ("choice", "uniform"):
            raise ValueError(f"scale_sampling must be 'choice' or 'uniform', got {scale_sampling!r}")
        self.short_sides = choice_short_sides(base_short_side, min_scale, max_scale) if scale_sampling == "choice" \
            else None
        self.base_short_side, self.max_long_side = base_short_side, max_long_side
        self.cat_max_ratio, self.color_jitter, self.flip = cat_max_ratio, color_jitter, flip

    def __call__(self, image: torch.Tensor, labels: torch.Tensor, pad_values: Sequence[int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = image.shape[-2:]
        if self.short_sides is not None:
            short = _choice(self.short_sides)
        else:
            short = self.base_short_side * _uniform(self.min_scale, self.max_scale)
        image, labels = resize(image, labels, shortest_edge_size(h, w, short, self.max_long_side))
        box = category_constrained_crop(labels[0], self.crop_size, self.cat_max_ratio, int(pad_values[0]))
        image, labels = crop(image, labels, *box)
        if self.color_jitter:
            image = color_aug_ssd(image)
        if self.flip and torch.rand(()) < 0.5:
            image, labels = hflip(image, labels)
        return pad_to(image, labels, self.crop_size, pad_values)


class TrainDETRTransform:
    """DETR's COCO recipe: flip; then either a multi-scale shortest-edge resize (480..800 step 32, long side
    <= 1333), or resize to a short side in (400, 500, 600) -> random crop with sides in [384, 600] -> the
    same multi-scale resize, each branch with probability 1/2."""

    def __init__(self, flip: bool = True, scales: Sequence[int] = DETR_SCALES, max_size: int = DETR_MAX_SIZE,
                 crop_scales: Sequence[int] = DETR_CROP_SCALES, crop_range: tuple[int, int] = DETR_CROP_RANGE
                 ) -> None:
        self.flip, self.scales, self.max_size = flip, tuple(scales), max_size
        self.crop_scales, self.crop_range = tuple(crop_scales), crop_range

    def __call__(self, image: torch.Tensor, labels: torch.Tensor, pad_values: Sequence[int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.flip and torch.rand(()) < 0.5:
            image, labels = hflip(image, labels)
        if torch.rand(()) < 0.5:
            h, w = image.shape[-2:]
            image, labels = resize(image, labels, shortest_edge_size(h, w, _choice(self.crop_scales), None))
            h, w = image.shape[-2:]
            lo, hi = self.crop_range
            ch, cw = _randint(min(h, lo), min(h, hi)), _randint(min(w, lo), min(w, hi))
            image, labels = crop(image, labels, _randint(0, h - ch), _randint(0, w - cw), ch, cw)
        h, w = image.shape[-2:]
        return resize(image, labels, shortest_edge_size(h, w, _choice(self.scales), self.max_size))


class TestTransform:
    """Inference: resize the short side to `short_side` with the long side capped (0 or None keeps the size)."""

    def __init__(self, short_side: int | None, max_long_side: int = 2048) -> None:
        self.short_side, self.max_long_side = short_side, max_long_side

    def __call__(self, image: torch.Tensor, labels: torch.Tensor, pad_values: Sequence[int] = ()
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.short_side:
            return image, labels
        h, w = image.shape[-2:]
        return resize(image, labels, shortest_edge_size(h, w, self.short_side, self.max_long_side))


SegTransform = TrainSemanticTransform | TrainDETRTransform | TestTransform


def build_transforms(data_cfg: DataConfig, train: bool) -> SegTransform:
    """The transform of a recipe's data section: training augmentation, or the test-time resize."""
    if not train:
        short = data_cfg.crop_size[0] if data_cfg.test_short_side is None else data_cfg.test_short_side
        return TestTransform(short, data_cfg.test_max_long_side)
    if data_cfg.augmentation == "detr":
        return TrainDETRTransform(flip=data_cfg.flip)
    return TrainSemanticTransform(
        crop_size=data_cfg.crop_size,
        min_scale=data_cfg.min_scale,
        max_scale=data_cfg.max_scale,
        base_short_side=data_cfg.base_short_side or data_cfg.crop_size[0],
        max_long_side=data_cfg.max_long_side,
        cat_max_ratio=data_cfg.cat_max_ratio,
        color_jitter=data_cfg.color_jitter,
        flip=data_cfg.flip,
        scale_sampling=data_cfg.scale_sampling,
    )
