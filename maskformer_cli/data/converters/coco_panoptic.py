"""COCO panoptic 2017 (133 categories: 80 things, 53 stuff; ids 1..200) + semantic labels from it.

Raw:    panoptic_annotations_trainval2017.zip: annotations/panoptic_{train,val}2017.json and NESTED
        annotations/panoptic_{train,val}2017.zip holding panoptic_{train,val}2017/*.png;
        train2017.zip, val2017.zip: {train,val}2017/*.jpg.
Output: coco/{train2017,val2017}/, coco/annotations/panoptic_{train,val}2017.json,
        coco/panoptic_{train,val}2017/*.png (detectron2 layout), and
        coco/panoptic_semseg_{train,val}2017/*.png: per pixel the contiguous category 0..132 of its
        segment (ids sorted), 255 for void (as Mask2Former's semantic-from-panoptic labels).
An existing coco/ tree (images, JSONs, PNG folders) is used in place: nothing is downloaded again.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from panopticapi.utils import rgb2id

from maskformer_cli.data import archives
from maskformer_cli.data.converters.base import (
    ArchiveSpec,
    Context,
    Converter,
    find_root,
    read_label,
    register_archive,
    write_png,
)
from maskformer_cli.errors import UserError

PANOPTIC_ZIP = register_archive(ArchiveSpec(
    filename="panoptic_annotations_trainval2017.zip",
    url="http://images.cocodataset.org/annotations/panoptic_annotations_trainval2017.zip",
    sha256="c05f76d2129b6b561eb70efe16e7006df62f73fb92889132d373b9d90e31a370",
    size=860_725_834,
    present=("annotations/panoptic_train2017.json", "annotations/panoptic_val2017.json", "panoptic_train2017",
             "panoptic_val2017"),
))
TRAIN_ZIP = register_archive(ArchiveSpec(
    filename="train2017.zip",
    url="http://images.cocodataset.org/zips/train2017.zip",
    sha256="69a8bb58ea5f8f99d24875f21416de2e9ded3178e903f1f7603e283b9e06d929",
    size=19_336_861_798,
    present=("train2017",),
))
VAL_ZIP = register_archive(ArchiveSpec(
    filename="val2017.zip",
    url="http://images.cocodataset.org/zips/val2017.zip",
    sha256="4f7e2ccb2866ec5041993c9cf2a952bbed69647b115d0f74da7ce8f4bef82f05",
    size=815_585_330,
    present=("val2017",),
))

SPLITS = {"train": ("train2017", TRAIN_ZIP), "val": ("val2017", VAL_ZIP)}


def contiguous_map() -> dict[int, int]:
    """COCO panoptic category id (1..200) -> contiguous 0..132 (ids in increasing order)."""
    from maskformer_cli.data.catalog import load_class_file

    ids = sorted(int(c[0]) for c in load_class_file("coco_panoptic_133.json"))
    return {cid: k for k, cid in enumerate(ids)}


def semantic_from_panoptic(ids: np.ndarray, segments: list[dict], to_contiguous: dict[int, int],
                           where: str = "") -> np.ndarray:
    """int32 [H,W] segment ids + segments_info -> uint8 [H,W] contiguous category, 255 void/unlisted."""
    out = np.full(ids.shape, 255, np.uint8)
    for s in segments:
        cat = s.get("category_id")
        if cat not in to_contiguous:
            raise UserError(f"{where}: unknown COCO panoptic category id {cat}")
        out[ids == s["id"]] = to_contiguous[cat]
    return out


def _png_dir(ctx: Context, ann_root: Path, name: str) -> Path:
    """Directory of the panoptic PNGs of one split: in place, or extracted from the nested zip."""
    if (ann_root / name).is_dir():
        return ann_root / name
    nested = ann_root / "annotations" / f"{name}.zip"
    if not nested.is_file():
        raise UserError(f"{ann_root}: neither {name}/ nor annotations/{name}.zip found")
    dest = ctx.scratch / name
    archives.extract(nested, dest)
    return find_root(dest, name) / name


def convert(ctx: Context) -> dict[str, int]:
    ann_root = find_root(ctx.source(PANOPTIC_ZIP), "annotations/panoptic_val2017.json")
    to_contiguous = contiguous_map()
    counts = {}
    for split, (name, image_key) in SPLITS.items():
        json_path = ann_root / "annotations" / f"panoptic_{name}.json"
        try:
            data = json.loads(json_path.read_text())
            annotations = data["annotations"]
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{json_path}: cannot read COCO panoptic annotations ({e})") from None
        pngs = _png_dir(ctx, ann_root, f"panoptic_{name}")
        img_root = find_root(ctx.source(image_key), name)
        for ann in ctx.track(annotations, f"coco-panoptic {split}"):
            png = pngs / ann["file_name"]
            if not png.is_file():
                raise UserError(f"{png}: listed in {json_path.name} but missing")
            ids = rgb2id(read_label(png, channels=3))
            sem = semantic_from_panoptic(ids, ann.get("segments_info", []), to_contiguous, str(png))
            write_png(ctx.out / f"panoptic_semseg_{name}" / png.name, sem)
        counts[split] = len(data.get("images", annotations))
        ctx.adopt(pngs, f"panoptic_{name}")
        ctx.adopt(json_path, f"annotations/panoptic_{name}.json")
        ctx.adopt(img_root / name, name)
    return counts


CONVERTER = Converter(name="coco_panoptic", archives=(PANOPTIC_ZIP, TRAIN_ZIP, VAL_ZIP), convert=convert,
                      outputs=("panoptic_semseg_train2017", "panoptic_semseg_val2017"))
