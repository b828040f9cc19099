"""prepare-data mapillary: palette-index labels kept as indices, nested v1.2/labels flattened."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from prepare_utils import jpg_bytes, png_bytes, quiet_console, write_zip

from maskformer_cli.commands.prepare_data import run_prepare
from maskformer_cli.data.catalog import get_dataset_info
from maskformer_cli.errors import UserError

# a palette whose colors are unrelated to the indices: reading RGB (or converting) would give other numbers
PALETTE = [v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)]


def _labels(seed):
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, 66, (12, 16)).astype(np.uint8)
    lab[0, 0], lab[0, 1] = 65, 64
    return lab


def _run(root, arch):
    run_prepare("mapillary", root=root, archives=[arch], download=False, check=None, accept_checksum=False,
                force=False, synthetic={}, console=quiet_console())


@pytest.mark.parametrize("nested", [False, True], ids=["v1.2-release", "nested-v1.2"])
def test_mapillary_indices_are_kept(tmp_path, nested):
    labels = {("training", "a"): _labels(0), ("training", "b"): _labels(1), ("validation", "c"): _labels(2)}
    members = {"config.json": b"{}"}
    sub = "v1.2/labels" if nested else "labels"
    for (split, stem), lab in labels.items():
        members[f"{split}/images/{stem}.jpg"] = jpg_bytes(12, 16)
        members[f"{split}/{sub}/{stem}.png"] = png_bytes(lab, palette=PALETTE)
    members["testing/images/t.jpg"] = jpg_bytes(12, 16)
    arch = write_zip(tmp_path / "mapillary-vistas-dataset_public_v1.2.zip", members)
    root = tmp_path / "datasets"
    _run(root, arch)
    base = root / "mapillary_vistas"
    for (split, stem), lab in labels.items():
        with Image.open(base / split / "labels" / f"{stem}.png") as im:
            assert im.mode == "P"
            np.testing.assert_array_equal(np.array(im), lab)
        assert (base / split / "images" / f"{stem}.jpg").is_file()
    info = get_dataset_info("mapillary")
    assert info.num_classes == 65 and info.ignore_label == 65 and info.classes[64] == "Ego Vehicle"


def test_rgb_labels_are_refused(tmp_path):
    members = {"training/images/a.jpg": jpg_bytes(4, 4), "validation/images/c.jpg": jpg_bytes(4, 4),
               "training/labels/a.png": png_bytes(np.zeros((4, 4, 3), np.uint8)),
               "validation/labels/c.png": png_bytes(np.zeros((4, 4, 3), np.uint8))}
    arch = write_zip(tmp_path / "mapillary-vistas-dataset_public_v1.2.zip", members)
    with pytest.raises(UserError, match=r"a.png: label image mode RGB; expected palette indices"):
        _run(tmp_path / "d", arch)
