"""ADE20K panoptic (150 categories, 100 things) from the semantic labels plus the instance annotations.

Raw:    ADEChallengeData2016.zip (see ade20k) + annotations_instance.tar:
        annotations_instance/{training,validation}/*.png with R = instance class (1..100, 0 = none) and
        G = instance id; the instance class maps to an ADE20K-150 class (MaskFormer's instance->semantic
        table, class_names/ade20k_150.json).
Output: ADEChallengeData2016/ade20k_panoptic_{train,val}.json + ade20k_panoptic_{train,val}/*.png (COCO
        panoptic format; category ids 0..149 as in MaskFormer), plus the semantic labels of ade20k.

Composition: stuff segments come from the semantic map (thing classes there are not used), then every
instance is pasted over them. Unlike the reference script, area and bbox are computed from the final
map, so a stuff segment partly covered by an instance gets its true area (and vanishes if covered fully).
"""

from __future__ import annotations

import json

import numpy as np
from panopticapi.utils import id2rgb

from maskformer_cli.data.converters import ade20k
from maskformer_cli.data.converters.base import (
    ArchiveSpec,
    Context,
    Converter,
    find_root,
    image_size,
    read_label,
    register_archive,
    write_png,
)
from maskformer_cli.errors import UserError

INSTANCE_TAR = register_archive(ArchiveSpec(
    filename="annotations_instance.tar",
    url="http://sceneparsing.csail.mit.edu/data/ChallengeData2017/annotations_instance.tar",
    present=("annotations_instance/training", "annotations_instance/validation"),
))


def categories() -> tuple[list[dict], dict[int, int]]:
    """COCO-style categories (ids 0..149) and the instance class (1..100) -> category id map."""
    from maskformer_cli.data.catalog import load_class_file

    meta = load_class_file("ade20k_150.json")
    inst_to_cat = {int(i): int(s) - 1 for i, s in meta["instance_to_semantic"]}
    things = set(inst_to_cat.values())
    cats = [{"id": i, "name": n, "isthing": int(i in things), "color": list(c)}
            for i, (n, c) in enumerate(zip(meta["names"], meta["colors"], strict=True))]
    return cats, inst_to_cat


def compose(semantic: np.ndarray, instance: np.ndarray, is_thing: np.ndarray, inst_to_cat: dict[int, int],
            where: str = "") -> tuple[np.ndarray, list[dict]]:
    """semantic: uint8 [H,W] raw ADE labels (0 = other); instance: uint8 [H,W,3] (R class, G id).

    Returns int32 [H,W] segment ids (0 = void) and COCO segments_info (id, category_id, area, bbox, iscrowd).
    """
    seg = np.zeros(semantic.shape, np.int32)
    cat_of: dict[int, int] = {}
    next_id = 1
    sem = semantic.astype(np.int32) - 1
    for c in np.unique(sem):
        if c < 0 or is_thing[c]:
            continue
        seg[sem == c] = next_id
        cat_of[next_id] = int(c)
        next_id += 1
    # an instance is one (class, id) pair; class 0 means "no instance"
    key = instance[..., 0].astype(np.int32) * 256 + instance[..., 1].astype(np.int32)
    for k in np.unique(key):
        cls, ident = divmod(int(k), 256)
        if cls == 0 or ident == 0:
            continue
        if cls not in inst_to_cat:
            raise UserError(f"{where}: instance class {cls} is not one of the 100 ADE20K instance classes")
        seg[key == k] = next_id
        cat_of[next_id] = inst_to_cat[cls]
        next_id += 1
    segments = []
    for sid in np.unique(seg):
        if sid == 0:
            continue
        ys, xs = np.nonzero(seg == sid)
        x0, y0 = int(xs.min()), int(ys.min())
        segments.append({"id": int(sid), "category_id": cat_of[int(sid)], "area": int(len(xs)),
                         "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1], "iscrowd": 0})
    return seg, segments


def convert(ctx: Context) -> dict[str, int]:
    counts = ade20k.convert_semantic(ctx)
    src = ade20k.ade_root(ctx)
    inst_root = find_root(ctx.source(INSTANCE_TAR), "annotations_instance/training", "training")
    inst_dir = inst_root / "annotations_instance" if (inst_root / "annotations_instance").is_dir() else inst_root
    cats, inst_to_cat = categories()
    is_thing = np.array([c["isthing"] for c in cats], bool)
    for split, d in ade20k.SPLITS.items():
        images, annotations = [], []
        for img in ctx.track(sorted((src / "images" / d).glob("*.jpg")), f"ade20k-panoptic {split}"):
            sem_path = src / "annotations" / d / f"{img.stem}.png"
            ins_path = inst_dir / d / f"{img.stem}.png"
            if not ins_path.is_file():
                raise UserError(f"{img}: its instance annotation {ins_path} is missing")
            semantic = read_label(sem_path)
            instance = read_label(ins_path, channels=3)
            w, h = image_size(img)
            if semantic.shape != (h, w) or instance.shape[:2] != (h, w):
                raise UserError(f"{img}: image is {w}x{h} but its labels are {semantic.shape[::-1]} and "
                                f"{instance.shape[1::-1]}")
            seg, segments = compose(semantic, instance, is_thing, inst_to_cat, where=str(ins_path))
            write_png(ctx.out / f"ade20k_panoptic_{split}" / f"{img.stem}.png", id2rgb(seg))
            images.append({"id": img.stem, "file_name": img.name, "width": w, "height": h})
            annotations.append({"image_id": img.stem, "file_name": f"{img.stem}.png", "segments_info": segments})
        (ctx.out / f"ade20k_panoptic_{split}.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    ctx.adopt(inst_dir, "annotations_instance")
    ctx.adopt_all(src)
    return counts


CONVERTER = Converter(
    name="ade20k_panoptic", archives=(ade20k.ADE_ZIP, INSTANCE_TAR), convert=convert,
    outputs=("annotations_detectron2", "ade20k_panoptic_train", "ade20k_panoptic_val",
             "ade20k_panoptic_train.json", "ade20k_panoptic_val.json"),
)
