"""Per-dataset facts: class names, colors, thing/stuff split, ignore label, file layout.

`get_dataset_info(name)` is the one entry point; every other module asks it, never hard-codes a dataset.
Dataset names use dashes on the command line (`ade20k-full`) and either form in recipes.
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from maskformer_cli.errors import UserError


@dataclass(frozen=True)
class DatasetInfo:
    """What the tools need to know of a dataset.

    classes:     K names, index = contiguous training id 0..K-1.
    colors:      K RGB tuples for overlays.
    thing_ids:   contiguous ids of "thing" classes (instances); the rest are "stuff". Empty for semantic-only.
    ignore_label: label value excluded from training and metrics (255 for most, 65 Mapillary, 65535 ADE-Full).
    task:        'semantic' or 'panoptic' (what the prepared labels support; panoptic also gives semantic).
    dataset_ids: for panoptic datasets, the original category id of each contiguous id (COCO ids 1..200).
    splits:      split name -> relative directory or file hints used by datasets.py.
    """

    name: str
    classes: tuple[str, ...]
    ignore_label: int = 255
    task: str = "semantic"
    thing_ids: tuple[int, ...] = ()
    colors: tuple[tuple[int, int, int], ...] = ()
    dataset_ids: tuple[int, ...] = ()
    splits: dict[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def stuff_ids(self) -> tuple[int, ...]:
        things = set(self.thing_ids)
        return tuple(i for i in range(self.num_classes) if i not in things)

    def color(self, i: int) -> tuple[int, int, int]:
        return self.colors[i] if i < len(self.colors) else default_palette(i + 1)[i]


def default_palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """n well-separated RGB colors (golden-ratio hue steps), deterministic."""
    out = []
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0
        s = 0.55 + 0.35 * ((i * 7) % 3) / 2
        v = 0.95 - 0.25 * ((i * 5) % 2)
        r, g, b = colorsys.hsv_to_rgb(h, s, v)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return tuple(out)


# name -> factory(**kwargs) -> DatasetInfo. Factories let the synthetic set take its class count.
_REGISTRY: dict[str, Callable[..., DatasetInfo]] = {}


def register(name: str) -> Callable[[Callable[..., DatasetInfo]], Callable[..., DatasetInfo]]:
    def deco(fn: Callable[..., DatasetInfo]) -> Callable[..., DatasetInfo]:
        _REGISTRY[canonical_name(name)] = fn
        return fn

    return deco


def canonical_name(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def available() -> list[str]:
    return sorted(n.replace("_", "-") for n in _REGISTRY)


def get_dataset_info(name: str, **kwargs: object) -> DatasetInfo:
    """Facts of a catalog dataset; `kwargs` go to datasets that take parameters (synthetic)."""
    key = canonical_name(name)
    if key not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(key, list(_REGISTRY), n=1)
        hint = f" (did you mean '{close[0].replace('_', '-')}'?)" if close else ""
        raise UserError(f"unknown dataset '{name}'{hint}; known: {', '.join(available())}")
    return _REGISTRY[key](**kwargs)


def datasets_root(root: str | os.PathLike[str] | None = None) -> Path:
    """$MASKFORMER_DATASETS, else $DETECTRON2_DATASETS, else ./datasets (or `root` when given)."""
    if root is not None:
        return Path(root)
    for var in ("MASKFORMER_DATASETS", "DETECTRON2_DATASETS"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path("datasets")


# ------------------------------------------------------------------------------------ the embedded set


SYNTHETIC_SHAPES = ("disk", "square", "triangle", "ring", "cross", "bar")


@register("synthetic")
def _synthetic(num_classes: int = 12, **_: object) -> DatasetInfo:
    """Embedded dataset: the first third of classes are stuff (textured background regions), the rest things."""
    if num_classes < 2:
        raise UserError(f"synthetic dataset needs at least 2 classes, got {num_classes}")
    num_stuff = max(1, num_classes // 3)
    names = [f"stuff_{i}" for i in range(num_stuff)]
    names += [f"{SYNTHETIC_SHAPES[i % len(SYNTHETIC_SHAPES)]}_{i}" for i in range(num_stuff, num_classes)]
    return DatasetInfo(
        name="synthetic",
        classes=tuple(names),
        ignore_label=255,
        task="panoptic",
        thing_ids=tuple(range(num_stuff, num_classes)),
        colors=default_palette(num_classes),
        dataset_ids=tuple(range(1, num_classes + 1)),
        splits={"train": "train", "val": "val"},
    )
