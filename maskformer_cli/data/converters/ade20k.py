"""ADE20K-150 (SceneParsing): raw labels 0 = other, 1..150 -> contiguous 0..149 with 0 -> 255 (ignore).

Raw:    ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_{train,val}_%08d.{jpg,png}
Output: ADEChallengeData2016/annotations_detectron2/{training,validation}/*.png (the detectron2 layout).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

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

ADE_ZIP = register_archive(ArchiveSpec(
    filename="ADEChallengeData2016.zip",
    url="http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
    sha256="7ff1be44964418441f542a7cc1e1a650e7dc0fc275f5d23252bc9bbdbc977b29",
    size=967_382_037,
    present=("images/training", "images/validation", "annotations/training", "annotations/validation"),
))

SPLITS = {"train": "training", "val": "validation"}
NUM_CLASSES = 150


def ade_to_contiguous(label: np.ndarray) -> np.ndarray:
    """uint8 [H,W] raw ADE20K-150 label (0..150) -> uint8 [H,W] 0..149, 255 for 0 ("other")."""
    return np.where(label == 0, 255, label.astype(np.int32) - 1).astype(np.uint8)


def ade_root(ctx: Context) -> Path:
    return find_root(ctx.source(ADE_ZIP), "images/training")


def convert_semantic(ctx: Context, out_dir: str = "annotations_detectron2") -> dict[str, int]:
    """Write the shifted labels of both splits under ctx.out/out_dir; returns images per split."""
    src = ade_root(ctx)
    counts = {}
    for split, d in SPLITS.items():
        images = sorted((src / "images" / d).glob("*.jpg"))
        if not images:
            raise UserError(f"{src / 'images' / d}: no .jpg images")
        for img in ctx.track(images, f"ade20k {split}"):
            lab_path = src / "annotations" / d / f"{img.stem}.png"
            if not lab_path.is_file():
                raise UserError(f"{img}: its label {lab_path} is missing")
            raw = read_label(lab_path)
            if raw.max(initial=0) > NUM_CLASSES:
                raise UserError(f"{lab_path}: label value {int(raw.max())} > {NUM_CLASSES}; not an ADE20K-150 label")
            write_png(ctx.out / out_dir / d / lab_path.name, ade_to_contiguous(raw))
        counts[split] = len(images)
    return counts


def convert(ctx: Context) -> dict[str, int]:
    counts = convert_semantic(ctx)
    ctx.adopt_all(ade_root(ctx))
    return counts


CONVERTER = Converter(name="ade20k", archives=(ADE_ZIP,), convert=convert, outputs=("annotations_detectron2",))
