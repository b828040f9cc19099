"""One converter per catalog dataset: from the official raw archives to the layout the tools read."""

from __future__ import annotations

from maskformer_cli.data.converters import (
                                            ade20k,
                                            ade20k_full,
                                            ade20k_panoptic,
                                            cityscapes,
                                            coco_panoptic,
                                            coco_stuff_10k,
                                            mapillary,
)
from maskformer_cli.data.converters.base import ARCHIVES, ArchiveSpec, Context, Converter

CONVERTERS: dict[str, Converter] = {
    c.name: c
    for c in (ade20k.CONVERTER, ade20k_panoptic.CONVERTER, ade20k_full.CONVERTER, coco_stuff_10k.CONVERTER,
              cityscapes.CONVERTER, mapillary.CONVERTER, coco_panoptic.CONVERTER)
}

__all__ = ["ARCHIVES", "CONVERTERS", "ArchiveSpec", "Context", "Converter"]
