"""Cityscapes (19 classes, trainIds, 255 ignore) from the polygon annotations.

Login-only: download gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip from
https://www.cityscapes-dataset.com/downloads/ and pass both with --from-archive.

`*_gtFine_labelTrainIds.png` is drawn from `*_gtFine_polygons.json` as cityscapesScripts'
createTrainIdLabelImgs does: start from the trainId of 'unlabeled' (255), then fill each object polygon
in file order (later objects on top) with its label's trainId; deleted objects and labels with id < 0
(license plate) are skipped; a label '<name>group' unknown as such counts as '<name>'. The label table is
in class_names/cityscapes.json.
"""

from __future__ import annotations

import json

import numpy as np

from maskformer_cli.data.converters.base import ArchiveSpec, Context, Converter, find_root, register_archive
from maskformer_cli.errors import UserError

_HOW = ("log in at https://www.cityscapes-dataset.com/downloads/, download gtFine_trainvaltest.zip (241 MB) "
        "and leftImg8bit_trainvaltest.zip (11 GB), then run `maskformer prepare-data cityscapes "
        "--from-archive PATH/gtFine_trainvaltest.zip --from-archive PATH/leftImg8bit_trainvaltest.zip`")

GTFINE_ZIP = register_archive(ArchiveSpec(filename="gtFine_trainvaltest.zip", present=("gtFine/train", "gtFine/val"),
                                          how_to_get=_HOW))
LEFT_ZIP = register_archive(ArchiveSpec(filename="leftImg8bit_trainvaltest.zip",
                                        present=("leftImg8bit/train", "leftImg8bit/val"), how_to_get=_HOW))

SPLITS = ("train", "val", "test")


def label_table() -> dict[str, tuple[int, int]]:
    """name -> (id, trainId)."""
    from maskformer_cli.data.catalog import load_class_file

    return {name: (int(i), int(t)) for name, i, t, _ in load_class_file("cityscapes.json")["labels"]}


def draw_train_ids(annotation: dict, table: dict[str, tuple[int, int]], where: str = "") -> np.ndarray:
    """uint8 [H,W] trainId image of one polygons JSON (imgHeight, imgWidth, objects[label, polygon])."""
    from PIL import Image, ImageDraw

    try:
        size = (int(annotation["imgWidth"]), int(annotation["imgHeight"]))
        objects = annotation["objects"]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: not a Cityscapes polygons file ({e})") from None
    canvas = Image.new("L", size, table["unlabeled"][1])
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        if obj.get("deleted"):
            continue
        label = obj.get("label", "")
        if label not in table and label.endswith("group"):
            label = label[: -len("group")]
        if label not in table:
            raise UserError(f"{where}: unknown Cityscapes label '{obj.get('label')}'")
        label_id, train_id = table[label]
        if label_id < 0:
            continue
        polygon = [(x, y) for x, y in obj.get("polygon", [])]
        if len(polygon) >= 2:
            draw.polygon(polygon, fill=train_id)
    return np.array(canvas)


def convert(ctx: Context) -> dict[str, int]:
    from PIL import Image

    gt_root = find_root(ctx.source(GTFINE_ZIP), "gtFine")
    img_root = find_root(ctx.source(LEFT_ZIP), "leftImg8bit")
    table = label_table()
    counts = {}
    for split in SPLITS:
        polys = sorted((gt_root / "gtFine" / split).glob("*/*_gtFine_polygons.json"))
        for poly in ctx.track(polys, f"cityscapes {split}"):
            try:
                annotation = json.loads(poly.read_text())
            except (OSError, ValueError) as e:
                raise UserError(f"{poly}: cannot read ({e})") from None
            out = ctx.out / poly.relative_to(gt_root).with_name(
                poly.name.replace("_gtFine_polygons.json", "_gtFine_labelTrainIds.png"))
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(draw_train_ids(annotation, table, str(poly))).save(out)
        images = sorted((img_root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        if split != "test" and len(images) != len(polys):
            raise UserError(f"{img_root / 'leftImg8bit' / split}: {len(images)} images but {len(polys)} polygon "
                            f"files in gtFine/{split}; are both archives complete?")
        if images or polys:
            counts[split] = len(images)
    ctx.adopt_all(gt_root)
    ctx.adopt_all(img_root)  # both archives carry the same README and license.txt
    return counts


CONVERTER = Converter(name="cityscapes", archives=(GTFINE_ZIP, LEFT_ZIP), convert=convert)
