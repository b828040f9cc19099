"""ADE20K-Full (847 classes): class id = (R // 10) * 256 + G of `<image>_seg.png`, kept classes -> 0..846.

Raw:    ADE20K_2021_17_01.zip (registration at groups.csail.mit.edu/vision/datasets/ADE20K; use
        --from-archive): ADE20K_2021_17_01/images/ADE/{training,validation}/<scene>/.../<name>.jpg with
        <name>_seg.png beside each image.
Output: ADE20K_2021_17_01/images_detectron2/{training,validation}/<name>.jpg and
        annotations_detectron2/{training,validation}/<name>.tif (uint16, 65535 = ignore), as MaskFormer.
        Images whose shorter side exceeds 512 are resized to 512 (image bilinear, label nearest); the
        others are linked or copied unchanged.

The image list comes from walking the tree, not from index_ade20k.pkl: that index is a pickle, and
loading a pickle can run code. The split is read from the file name (ADE_val_* -> validation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from maskformer_cli.data.converters.base import (
    ArchiveSpec,
    Context,
    Converter,
    find_root,
    label_lut,
    link_or_copy,
    read_label,
    register_archive,
)
from maskformer_cli.errors import UserError

FULL_ZIP = register_archive(ArchiveSpec(
    filename="ADE20K_2021_17_01.zip",
    present=("images/ADE",),
    how_to_get="register at https://groups.csail.mit.edu/vision/datasets/ADE20K/ and download "
               "ADE20K_2021_17_01.zip, then run `maskformer prepare-data ade20k-full --from-archive "
               "PATH/ADE20K_2021_17_01.zip`",
))

IGNORE = 65535
MAX_SIDE = 512


def class_lut() -> np.ndarray:
    """uint16 [65536]: ADE20K-Full class id -> contiguous 0..846, 65535 for classes not kept."""
    from maskformer_cli.data.catalog import load_class_file

    ids = [int(i) for i, _ in load_class_file("ade20k_full_847.json")]
    return label_lut({cid: k for k, cid in enumerate(ids)}, 65536, IGNORE, np.uint16)


def decode_classes(seg_rgb: np.ndarray) -> np.ndarray:
    """uint8 [H,W,3] *_seg.png -> int32 [H,W] class ids (R // 10) * 256 + G."""
    r = seg_rgb[..., 0].astype(np.int32)
    g = seg_rgb[..., 1].astype(np.int32)
    return (r // 10) * 256 + g


def target_size(w: int, h: int, max_side: int = MAX_SIDE) -> tuple[int, int] | None:
    """(w, h) with the shorter side resized to `max_side` when it is larger; None to keep the size."""
    if w >= h > max_side:
        return round(w / h * max_side), max_side
    if h >= w > max_side:
        return max_side, round(h / w * max_side)
    return None


def split_of(stem: str) -> str:
    parts = stem.split("_")
    return "validation" if len(parts) > 1 and parts[1] == "val" else "training"


def convert(ctx: Context) -> dict[str, int]:
    from PIL import Image

    root = find_root(ctx.source(FULL_ZIP), "images/ADE", "images")
    lut = class_lut()
    pairs = []
    for img in sorted((root / "images").rglob("*.jpg")):
        seg = img.with_name(f"{img.stem}_seg.png")
        if seg.is_file():
            pairs.append((img, seg))
    if not pairs:
        raise UserError(f"{root / 'images'}: no <name>.jpg with <name>_seg.png found; is this ADE20K_2021_17_01?")
    counts = {"train": 0, "val": 0}
    seen: dict[str, Path] = {}
    for img, seg in ctx.track(pairs, "ade20k-full"):
        split = split_of(img.stem)
        if img.name in seen:
            raise UserError(f"{img}: the same file name also exists at {seen[img.name]}")
        seen[img.name] = img
        labels = decode_classes(read_label(seg, channels=3))
        try:
            with Image.open(img) as im:
                w, h = im.size
                if labels.shape != (h, w):
                    raise UserError(f"{img}: image is {w}x{h} but {seg.name} is {labels.shape[1]}x{labels.shape[0]}")
                size = target_size(w, h)
                out_img = ctx.out / "images_detectron2" / split / img.name
                if size is None:
                    link_or_copy(img, out_img)
                else:
                    out_img.parent.mkdir(parents=True, exist_ok=True)
                    im.convert("RGB").resize(size, Image.BILINEAR).save(out_img, quality=95)
        except (OSError, ValueError, SyntaxError) as e:
            raise UserError(f"{img}: cannot read image ({e})") from None
        if size is not None:
            labels = np.array(Image.fromarray(labels).resize(size, Image.NEAREST))
        out = lut[labels]
        out_lab = ctx.out / "annotations_detectron2" / split / f"{img.stem}.tif"
        out_lab.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(out).save(out_lab)  # uint16 -> mode I;16 TIFF, values kept
        counts["train" if split == "training" else "val"] += 1
    ctx.adopt_all(root)
    return counts


CONVERTER = Converter(name="ade20k_full", archives=(FULL_ZIP,), convert=convert,
                      outputs=("images_detectron2", "annotations_detectron2"))
