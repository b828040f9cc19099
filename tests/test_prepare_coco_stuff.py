"""prepare-data coco-stuff-10k from a tiny cocostuff-10k-v1.1 archive (.mat labels via scipy)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.io
from PIL import Image
from prepare_utils import jpg_bytes, quiet_console, write_zip

from maskformer_cli.commands.prepare_data import run_prepare
from maskformer_cli.data.catalog import get_dataset_info
from maskformer_cli.errors import UserError

# COCO ids 1..182 without the 11 unused {12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91} -> 0..170, written out:
# 1 person -> 0, 11 fire hydrant -> 10, 13 stop sign -> 11, 90 toothbrush -> 79, 92 banner -> 80,
# 182 wood -> 170; 0 (unlabeled) -> 255
KNOWN = {0: 255, 1: 0, 11: 10, 13: 11, 90: 79, 92: 80, 182: 170}


def mat_bytes(S: np.ndarray) -> bytes:
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"S": S.astype(np.uint8)})
    return buf.getvalue()


def test_class_names_are_the_171_in_coco_id_order():
    info = get_dataset_info("coco-stuff-10k")
    assert info.num_classes == 171 and info.classes[0] == "person" and info.classes[79] == "toothbrush"
    assert info.classes[80] == "banner" and info.classes[170] == "wood"


def test_coco_stuff_10k_labels(tmp_path):
    rng = np.random.default_rng(0)
    names = {"train": ["COCO_train2014_000000000077", "COCO_train2014_000000000078"],
             "test": ["COCO_train2014_000000000079"]}
    raw = {}
    members = {}
    for split, lst in names.items():
        members[f"imageLists/{split}.txt"] = ("\n".join(lst) + "\n").encode()
        for n in lst:
            S = rng.choice(list(KNOWN), size=(10, 14))
            raw[n] = S
            members[f"images/{n}.jpg"] = jpg_bytes(10, 14)
            members[f"annotations/{n}.mat"] = mat_bytes(S)
    members["imageLists/all.txt"] = b""
    arch = write_zip(tmp_path / "cocostuff-10k-v1.1.zip", members)
    root = tmp_path / "datasets"
    run_prepare("coco-stuff-10k", root=root, archives=[arch], download=False, check=None, accept_checksum=False,
                force=False, synthetic={}, console=quiet_console())
    base = root / "coco" / "coco_stuff_10k"
    for split, lst in names.items():
        for n in lst:
            with Image.open(base / "annotations_detectron2" / split / f"{n}.png") as im:
                got = np.array(im)
            want = np.vectorize(KNOWN.get)(raw[n]).astype(np.uint8)
            np.testing.assert_array_equal(got, want)
            assert (base / "images_detectron2" / split / f"{n}.jpg").is_file()
    assert (base / "imageLists" / "train.txt").is_file()
    info = get_dataset_info("coco-stuff-10k")
    assert info.sem_seg["val"] == info.sem_seg["test"]


def test_label_size_mismatch_is_reported_with_the_file(tmp_path):
    members = {"imageLists/train.txt": b"a\n", "imageLists/test.txt": b"",
               "images/a.jpg": jpg_bytes(10, 14), "annotations/a.mat": mat_bytes(np.zeros((9, 14)))}
    arch = write_zip(tmp_path / "cocostuff-10k-v1.1.zip", members)
    with pytest.raises(UserError, match=r"a.mat: labels are 14x9 but the image is 14x10"):
        run_prepare("coco-stuff-10k", root=tmp_path / "d", archives=[arch], download=False, check=None,
                    accept_checksum=False, force=False, synthetic={}, console=quiet_console())


def test_v10_archive_is_read_with_h5py(tmp_path):
    h5py = pytest.importorskip("h5py")
    S = np.array([[1, 2, 3], [172, 2, 1]], np.uint8)  # v1.0: 1 unlabeled, 2..172 -> 0..170
    mat = tmp_path / "a.mat"
    with h5py.File(mat, "w") as f:
        f["S"] = S.T  # MATLAB v7.3 stores arrays transposed
    members = {"imageLists/train.txt": b"a\n", "imageLists/test.txt": b"", "images/a.jpg": jpg_bytes(2, 3),
               "annotations/a.mat": mat.read_bytes()}
    arch = write_zip(tmp_path / "cocostuff-10k-v1.0.zip", members)
    run_prepare("coco-stuff-10k", root=tmp_path / "d", archives=[arch], download=False, check=None,
                accept_checksum=False, force=False, synthetic={}, console=quiet_console())
    with Image.open(tmp_path / "d/coco/coco_stuff_10k/annotations_detectron2/train/a.png") as im:
        np.testing.assert_array_equal(np.array(im), [[255, 0, 1], [170, 0, 255]])
