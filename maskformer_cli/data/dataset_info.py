"""What the tools know of a dataset (`DatasetInfo`), the image files they read, and the default colors.

The catalog (catalog.py) and custom dataset specs (custom.py) both produce a DatasetInfo.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field

# Image files the tools read: dataset images, custom datasets, `predict` inputs.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class DatasetInfo:
    """What the tools need to know of a dataset.

    classes:     K names, index = contiguous training id 0..K-1.
    colors:      K RGB tuples for overlays.
    thing_ids:   contiguous ids of "thing" classes (instances); the rest are "stuff". Empty for semantic-only.
    ignore_label: label value excluded from training and metrics (255 for most, 65 Mapillary, 65535 ADE-Full).
    task:        'semantic' or 'panoptic' (what the prepared labels support; panoptic also gives semantic).
    dataset_ids: for panoptic datasets, the original category id of each contiguous id (COCO ids 1..200).
    dirname:     directory of the prepared dataset under the datasets root (e.g. "ADEChallengeData2016").
    sem_seg:     split -> (image_dir, label_dir), relative to dirname; labels are contiguous ids 0..K-1 with
                 `ignore_label`, matched to images by file stem (after `label_suffix` replacement).
    label_suffix: (suffix to strip from the image stem, suffix to add for the label stem), e.g. Cityscapes
                 ("_leftImg8bit", "_gtFine_labelTrainIds").
    panoptic:    split -> (image_dir, panoptic_json, panoptic_png_dir), relative to dirname, COCO format.
    root:        absolute location for custom datasets (spec YAML); None for catalog datasets.
    test_size:   (shorter side, longer side cap) of the paper's single-scale test resize for this dataset;
                 shorter side 0 = native size. Used for released weights, which carry no recipe.
    """

    name: str
    classes: tuple[str, ...]
    ignore_label: int = 255
    task: str = "semantic"
    thing_ids: tuple[int, ...] = ()
    colors: tuple[tuple[int, int, int], ...] = ()
    dataset_ids: tuple[int, ...] = ()
    dirname: str = ""
    sem_seg: dict[str, tuple[str, str]] = field(default_factory=dict)
    label_suffix: tuple[str, str] = ("", "")
    panoptic: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    root: str | None = None
    test_size: tuple[int, int] = (512, 2048)

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
