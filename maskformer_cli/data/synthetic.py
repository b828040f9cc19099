"""The embedded default dataset: generated scenes written in the real ADE20K and COCO-panoptic formats.

Each scene is a few "stuff" regions (wavy horizontal bands and an occasional wall patch, each a textured
low-saturation area) with several "thing" instances painted over them (disk, square, triangle, ring, cross,
bar), several of the same class per image, overlapping and occluding. A class is identified by the
combination (shape, hue bucket, texture): consecutive thing classes share their hue, so color alone does not
tell them apart and the network must look at shape and texture. Thin unlabelled borders ("other" in ADE20K
terms, void in COCO panoptic) make a small share of pixels ignored, and a few images group the instances of
a class into one crowd segment (panoptic only, as COCO's iscrowd=1).

Output layout under `out_dir` (the `synthetic_k{K}` directory of the catalog entry):

    images/{training,validation}/syn_XXXXXXXX.jpg             RGB, JPEG quality 95
    annotations/{training,validation}/syn_XXXXXXXX.png        uint8, 0 = other, 1..K = classes (ADEChallenge)
    annotations_detectron2/{training,validation}/*.png        uint8, label - 1 with 0 -> 255 (what datasets read)
    panoptic_{train,val}.json + panoptic_{train,val}/*.png    COCO panoptic; id = R + 256 G + 256^2 B, 0 = void
    .maskformer_prepared.json                                 stamp: datasets.synthetic = version, params, counts

Generation is deterministic: the same arguments give the same bytes (each image has its own RNG stream, seeded
by (seed, index)). Only numpy and PIL are used; the scenes are drawn in `synthetic_scenes.py`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from panopticapi.utils import id2rgb
from PIL import Image

from maskformer_cli.data.catalog import DatasetInfo, get_dataset_info
from maskformer_cli.data.synthetic_scenes import ClassLook, Scene, class_looks, make_scene
from maskformer_cli.errors import UserError

__all__ = ["ClassLook", "Scene", "ade_to_detectron2", "class_looks", "generate_synthetic", "make_scene"]

SYNTHETIC_VERSION = 1
STAMP_NAME = ".maskformer_prepared.json"  # one entry per dataset, the layout data/staging.py reads and writes
STAMP_FORMAT = 1
MAX_CLASSES = 255  # raw ADE-style labels are uint8 with 0 = other
SPLITS = (("train", "training"), ("val", "validation"))


def ade_to_detectron2(raw: np.ndarray) -> np.ndarray:
    """ADEChallenge raw label (uint8, 0 = other, 1..K) -> detectron2 label (0..K-1, 255 = ignore)."""
    return (raw.astype(np.int16) - 1).astype(np.uint8)  # 0 - 1 wraps to 255 in uint8


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG", optimize=False)


def generate_synthetic(
    out_dir: str | os.PathLike[str],
    num_classes: int = 12,
    num_images: int = 240,
    size: int = 128,
    seed: int = 0,
    val_fraction: float = 0.2,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Generate the synthetic dataset into `out_dir` (replaced atomically) and return the counts.

    The dataset is written into a sibling temporary directory and renamed into place when complete, so a
    crash never leaves a half-written tree that looks prepared. `progress(done, total)` is called after each
    image. Returns {"train": images, "val": images, "classes": K, "segments": panoptic segments}.
    """
    _check_params(num_classes, num_images, size, val_fraction)
    out_dir = Path(out_dir)
    info = get_dataset_info("synthetic", num_classes=num_classes)
    looks = class_looks(num_classes)
    categories = _coco_categories(info, num_classes)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    counts = {"train": 0, "val": 0, "classes": num_classes, "segments": 0}
    try:
        done = 0
        split_of = _split_indices(num_images, val_fraction)
        for split, ade_split in SPLITS:
            dirs = _make_split_dirs(tmp, split, ade_split)
            images, annotations = [], []
            for idx in split_of[split]:  # each image its own RNG stream, so any subset regenerates identically
                scene = make_scene(np.random.default_rng([seed, idx]), looks, size)
                image, annotation = _write_scene(scene, idx, dirs, info)
                images.append(image)
                annotations.append(annotation)
                counts[split] += 1
                counts["segments"] += len(annotation["segments_info"])
                done += 1
                if progress is not None:
                    progress(done, num_images)
            doc = {"info": {"description": f"maskformer synthetic dataset, {num_classes} classes",
                            "version": SYNTHETIC_VERSION},
                   "images": images, "annotations": annotations, "categories": categories}
            (tmp / f"panoptic_{split}.json").write_text(json.dumps(doc), encoding="utf-8")
        _write_stamp(tmp, num_classes, num_images, size, seed, val_fraction, counts)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def _check_params(num_classes: int, num_images: int, size: int, val_fraction: float) -> None:
    """Raise UserError (one line) for arguments the formats or the split cannot hold."""
    if not 2 <= num_classes <= MAX_CLASSES:
        raise UserError(f"synthetic: num_classes must be in 2..{MAX_CLASSES} (uint8 ADE-style labels), got {num_classes}")
    if num_images < 2:
        raise UserError(f"synthetic: num_images must be at least 2 (one per split), got {num_images}")
    if size < 32:
        raise UserError(f"synthetic: image size must be at least 32 pixels, got {size}")
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"synthetic: val_fraction must be in (0, 1), got {val_fraction}")


def _split_indices(num_images: int, val_fraction: float) -> dict[str, range]:
    """Image ids 1..num_images: the last round(num_images * val_fraction) are val, the rest train (at least
    one image in each split)."""
    num_val = min(num_images - 1, max(1, round(num_images * val_fraction)))
    return {"train": range(1, num_images - num_val + 1), "val": range(num_images - num_val + 1, num_images + 1)}


def _coco_categories(info: DatasetInfo, num_classes: int) -> list[dict[str, Any]]:
    """The COCO-panoptic "categories" list: one entry per contiguous class, in class order."""
    return [
        {"id": info.dataset_ids[i], "name": info.classes[i], "supercategory": "thing" if i in info.thing_ids
         else "stuff", "isthing": int(i in info.thing_ids), "color": list(info.color(i))}
        for i in range(num_classes)
    ]


def _make_split_dirs(tmp: Path, split: str, ade_split: str) -> dict[str, Path]:
    """Create and return the four per-split folders: images, annotations, annotations_detectron2, panoptic."""
    dirs = {k: tmp / k / ade_split for k in ("images", "annotations", "annotations_detectron2")}
    dirs["panoptic"] = tmp / f"panoptic_{split}"
    for d in dirs.values():
        d.mkdir(parents=True)
    return dirs


def _write_scene(scene: Scene, idx: int, dirs: dict[str, Path], info: DatasetInfo) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write image idx in all formats; return its COCO-panoptic (image, annotation) entries."""
    stem = f"syn_{idx:08d}"
    Image.fromarray(scene.image).save(dirs["images"] / f"{stem}.jpg", format="JPEG", quality=95)
    raw = (scene.semantic + 1).astype(np.uint8)  # -1 (other) -> 0
    _save_png(raw, dirs["annotations"] / f"{stem}.png")
    _save_png(ade_to_detectron2(raw), dirs["annotations_detectron2"] / f"{stem}.png")
    _save_png(id2rgb(scene.panoptic), dirs["panoptic"] / f"{stem}.png")
    segs = []
    for sid, cls, crowd in scene.segments:
        m = scene.panoptic == sid
        segs.append({"id": sid, "category_id": info.dataset_ids[cls], "area": int(m.sum()),
                     "bbox": _bbox(m), "iscrowd": crowd})
    height, width = scene.semantic.shape
    image = {"id": idx, "file_name": f"{stem}.jpg", "height": height, "width": width}
    return image, {"image_id": idx, "file_name": f"{stem}.png", "segments_info": segs}


def _write_stamp(tmp: Path, num_classes: int, num_images: int, size: int, seed: int, val_fraction: float,
                 counts: dict[str, int]) -> None:
    """Write the prepared stamp (see data/staging.py) recording the generation parameters and counts."""
    params: dict[str, int | float] = {"num_classes": num_classes, "num_images": num_images, "size": size,
                                      "seed": seed}
    if val_fraction != 0.2:  # prepare-data compares params without it
        params["val_fraction"] = val_fraction
    entry = {"name": "synthetic", "version": SYNTHETIC_VERSION, "params": params, "counts": counts}
    stamp = {"datasets": {"synthetic": entry}, "format": STAMP_FORMAT}
    (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=2, sort_keys=True), encoding="utf-8")


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace out_dir by the complete tree tmp: the old tree is renamed aside first and removed last."""
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old.exists():
        shutil.rmtree(old)
