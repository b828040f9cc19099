"""prepare-data ade20k-full: class ids from *_seg.png, 847 kept classes, uint16 TIFF, resize past 512."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest
from PIL import Image
from prepare_utils import console_text, jpg_bytes, png_bytes, quiet_console, write_zip

from maskformer_cli.commands.prepare_data import run_prepare
from maskformer_cli.errors import UserError

# facts from MaskFormer's ADE20K-Full class list: (ADE20K-Full object id, contiguous id)
WALL, BED, ADDING_MACHINE, NOT_KEPT = (2978, 0), (165, 7), (3148, 846), 1
KEPT = {2978: 0, 165: 7, 3148: 846}


def seg_png(classes: np.ndarray) -> bytes:
    """Encode class ids the ADE20K way: R = id // 256 * 10, G = id % 256 (B = instance, unused here)."""
    rgb = np.zeros(classes.shape + (3,), np.uint8)
    rgb[..., 0] = classes // 256 * 10 + 3  # +3: R / 10 is floored, any R in [10k, 10k+9] means k
    rgb[..., 1] = classes % 256
    rgb[..., 2] = 77
    return png_bytes(rgb)


def _classes(h, w, seed):
    rng = np.random.default_rng(seed)
    return rng.choice([2978, 165, 3148, NOT_KEPT, 0], size=(h, w))


def _expected(classes: np.ndarray) -> np.ndarray:
    out = np.full(classes.shape, 65535, np.uint16)
    for (y, x), c in np.ndenumerate(classes):
        if int(c) in KEPT:
            out[y, x] = KEPT[int(c)]
    return out


def _read16(path):
    try:
        import tifffile
    except ModuleNotFoundError:  # PIL keeps 16-bit values when not converted
        with Image.open(path) as im:
            return np.array(im)
    return tifffile.imread(path)


def test_class_list_facts():
    data = json.loads(resources.files("maskformer_cli.data").joinpath("class_names/ade20k_full_847.json")
                      .read_text())
    ids = [i for i, _ in data]
    assert len(ids) == 847 == len(set(ids))
    assert ids.index(WALL[0]) == WALL[1] and ids.index(BED[0]) == BED[1] and ids.index(ADDING_MACHINE[0]) == 846


def test_ade20k_full_labels_and_resize(tmp_path):
    small_tr, small_va = _classes(12, 20, 0), _classes(16, 10, 1)
    # 1024 x 1536 -> shorter side 512: exactly 2x; classes in 2x2 blocks so any nearest rule agrees
    big = np.kron(_classes(512, 768, 2), np.ones((2, 2), dtype=np.int64))
    members = {
        "ADE20K_2021_17_01/images/ADE/training/urban/street/ADE_train_00000001.jpg": jpg_bytes(12, 20),
        "ADE20K_2021_17_01/images/ADE/training/urban/street/ADE_train_00000001_seg.png": seg_png(small_tr),
        "ADE20K_2021_17_01/images/ADE/training/urban/street/ADE_train_00000001_parts_1.png": b"not used",
        "ADE20K_2021_17_01/images/ADE/training/home/ADE_frame_00000007.jpg": jpg_bytes(1024, 1536),
        "ADE20K_2021_17_01/images/ADE/training/home/ADE_frame_00000007_seg.png": seg_png(big),
        "ADE20K_2021_17_01/images/ADE/validation/home/ADE_val_00000001.jpg": jpg_bytes(16, 10),
        "ADE20K_2021_17_01/images/ADE/validation/home/ADE_val_00000001_seg.png": seg_png(small_va),
        "ADE20K_2021_17_01/index_ade20k.pkl": b"\x80\x04never unpickled",
        "ADE20K_2021_17_01/objects.txt": b"objects",
    }
    arch = write_zip(tmp_path / "ADE20K_2021_17_01.zip", members)
    root = tmp_path / "datasets"
    console = quiet_console()
    run_prepare("ade20k-full", root=root, archives=[arch], download=True, check=None, accept_checksum=False,
                force=False, synthetic={}, console=console)
    base = root / "ADE20K_2021_17_01"
    lab = base / "annotations_detectron2"
    np.testing.assert_array_equal(_read16(lab / "training/ADE_train_00000001.tif"), _expected(small_tr))
    np.testing.assert_array_equal(_read16(lab / "validation/ADE_val_00000001.tif"), _expected(small_va))
    got_big = _read16(lab / "training/ADE_frame_00000007.tif")
    assert got_big.dtype == np.uint16 and got_big.shape == (512, 768)
    np.testing.assert_array_equal(got_big, _expected(big[::2, ::2]))
    with Image.open(base / "images_detectron2/training/ADE_frame_00000007.jpg") as im:
        assert im.size == (768, 512)
    # images not larger than 512 are kept byte for byte
    assert (base / "images_detectron2/training/ADE_train_00000001.jpg").read_bytes() == members[
        "ADE20K_2021_17_01/images/ADE/training/urban/street/ADE_train_00000001.jpg"]
    assert (base / "index_ade20k.pkl").is_file()  # kept, never loaded
    assert "val" in console_text(console)


def test_registration_only_archive_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match=r"register at https://groups.csail.mit.edu.*--from-archive"):
        run_prepare("ade20k-full", root=tmp_path, archives=[], download=True, check=None, accept_checksum=False,
                    force=False, synthetic={}, console=quiet_console())
