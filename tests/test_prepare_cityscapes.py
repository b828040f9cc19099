"""prepare-data cityscapes: trainId labels drawn from the polygon JSONs, checked against numpy slicing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from prepare_utils import png_bytes, quiet_console, write_zip

from maskformer_cli.commands.prepare_data import run_prepare
from maskformer_cli.data.catalog import get_dataset_info
from maskformer_cli.errors import UserError

H, W = 24, 32


def rect(label, x0, y0, x1, y1, **extra):
    return {"label": label, "polygon": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], **extra}


OBJECTS = [
    rect("road", 0, 12, 31, 23),                        # road -> 0
    rect("sky", 0, 0, 31, 5),                           # sky -> 10
    rect("car", 4, 14, 12, 20),                         # car -> 13, over the road
    rect("license plate", 6, 18, 9, 19),                # id -1: not drawn, stays car
    rect("person", 20, 8, 24, 22, deleted=1),           # deleted: not drawn
    rect("persongroup", 26, 10, 29, 22),                # 'group' -> person -> 11
    rect("ego vehicle", 0, 22, 31, 23),                 # trainId 255 over the road
    rect("building", 14, 3, 18, 9),                     # building -> 2, over the sky
]


def expected() -> np.ndarray:
    # rectangles are filled including their border pixels; later objects are drawn on top
    out = np.full((H, W), 255, np.uint8)
    out[12:24, 0:32] = 0
    out[0:6, 0:32] = 10
    out[14:21, 4:13] = 13
    out[10:23, 26:30] = 11
    out[22:24, 0:32] = 255
    out[3:10, 14:19] = 2
    return out


def make_archives(tmp_path, objects=OBJECTS):
    poly = {"imgHeight": H, "imgWidth": W, "objects": objects}
    gt, left = {}, {}
    for split, city, n in (("train", "aachen", "aachen_000000_000019"), ("val", "lindau", "lindau_000000_000019"),
                           ("test", "berlin", "berlin_000000_000019")):
        gt[f"gtFine/{split}/{city}/{n}_gtFine_polygons.json"] = json.dumps(poly).encode()
        gt[f"gtFine/{split}/{city}/{n}_gtFine_labelIds.png"] = png_bytes(np.zeros((H, W), np.uint8))
        left[f"leftImg8bit/{split}/{city}/{n}_leftImg8bit.png"] = png_bytes(np.zeros((H, W, 3), np.uint8))
    gt["README"] = left["README"] = b"readme"
    gt["license.txt"] = left["license.txt"] = b"license"
    return (write_zip(tmp_path / "gtFine_trainvaltest.zip", gt),
            write_zip(tmp_path / "leftImg8bit_trainvaltest.zip", left))


def _run(root, archives):
    run_prepare("cityscapes", root=root, archives=list(archives), download=True, check=None, accept_checksum=False,
                force=False, synthetic={}, console=quiet_console())


def test_cityscapes_train_ids_from_polygons(tmp_path):
    gt, left = make_archives(tmp_path)
    root = tmp_path / "datasets"
    _run(root, [left, gt])  # order of --from-archive does not matter
    base = root / "cityscapes"
    with Image.open(base / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png") as im:
        got = np.array(im)
    np.testing.assert_array_equal(got, expected())
    assert (base / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png").is_file()
    assert (base / "gtFine/train/aachen/aachen_000000_000019_gtFine_polygons.json").is_file()
    assert (base / "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png").is_file()
    info = get_dataset_info("cityscapes")
    assert info.num_classes == 19 and info.classes[0] == "road" and info.classes[18] == "bicycle"
    img_dir, lab_dir = info.sem_seg["train"]
    stem = "aachen_000000_000019_leftImg8bit"
    label_stem = stem[: -len(info.label_suffix[0])] + info.label_suffix[1]
    assert (base / lab_dir / "aachen" / f"{label_stem}.png").is_file() and (base / img_dir / "aachen").is_dir()


def test_unknown_label_names_the_file(tmp_path):
    gt, left = make_archives(tmp_path, OBJECTS + [rect("spaceship", 0, 0, 2, 2)])
    with pytest.raises(UserError, match=r"aachen_000000_000019_gtFine_polygons.json: unknown Cityscapes label "
                                        r"'spaceship'"):
        _run(tmp_path / "d", [gt, left])


def test_login_only_archives_give_instructions(tmp_path):
    gt, _ = make_archives(tmp_path)
    with pytest.raises(UserError, match=r"leftImg8bit_trainvaltest.zip: log in at https://www.cityscapes-dataset"):
        _run(tmp_path / "d", [gt])
