"""Every paper dataset has a catalog entry with the paper's class count and a converter for prepare-data."""

from __future__ import annotations

import pytest

from maskformer_cli.data.catalog import available, get_dataset_info
from maskformer_cli.data.converters import ARCHIVES, CONVERTERS
from maskformer_cli.data.sources import DOWNLOADS

PAPER = {"ade20k": (150, 255), "ade20k-full": (847, 65535), "coco-stuff-10k": (171, 255), "cityscapes": (19, 255),
         "mapillary": (65, 65), "coco-panoptic": (133, 255), "ade20k-panoptic": (150, 255)}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_catalog_entry_and_converter(name):
    info = get_dataset_info(name)
    assert (info.num_classes, info.ignore_label) == PAPER[name]
    assert len(info.colors) == info.num_classes and len(set(info.classes)) >= info.num_classes - 2
    assert info.dirname and "train" in info.sem_seg and "val" in info.sem_seg
    conv = CONVERTERS[name.replace("-", "_")]
    for key in conv.archives:
        spec = ARCHIVES[key]
        assert spec.url or spec.how_to_get, f"{key}: needs a URL or instructions"
    assert name in available()


def test_thing_counts_of_panoptic_datasets():
    assert len(get_dataset_info("coco-panoptic").thing_ids) == 80
    assert len(get_dataset_info("ade20k-panoptic").thing_ids) == 100
    assert DOWNLOADS == "downloads"
