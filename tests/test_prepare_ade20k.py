"""prepare-data ade20k / ade20k-panoptic from tiny archives in the official raw layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from panopticapi.utils import rgb2id
from PIL import Image
from prepare_utils import (
    FileServer,
    archive_override,
    console_text,
    jpg_bytes,
    png_bytes,
    quiet_console,
    sha256,
    write_tar,
    write_zip,
)

from maskformer_cli.commands.prepare_data import run_prepare
from maskformer_cli.data.catalog import get_dataset_info
from maskformer_cli.data.staging import STAMP, read_stamp
from maskformer_cli.errors import UserError

ADE = "ADEChallengeData2016.zip"
SIZES = {"ADE_train_00000001": (16, 24), "ADE_train_00000002": (20, 20), "ADE_val_00000001": (18, 16)}


def _split(stem: str) -> str:
    return "training" if "_train_" in stem else "validation"


def make_ade_zip(path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    raw, members = {}, {}
    for i, (stem, (h, w)) in enumerate(SIZES.items()):
        lab = rng.integers(0, 151, (h, w)).astype(np.uint8)
        lab[0, 0], lab[0, 1] = 0, 150  # both ends of the range
        raw[stem] = lab
        members[f"ADEChallengeData2016/images/{_split(stem)}/{stem}.jpg"] = jpg_bytes(h, w, i)
        members[f"ADEChallengeData2016/annotations/{_split(stem)}/{stem}.png"] = png_bytes(lab)
    members["ADEChallengeData2016/objectInfo150.txt"] = b"Idx\tRatio\tTrain\tVal\tName\n"
    write_zip(path, members)
    return raw


def expected_semantic(raw: np.ndarray) -> np.ndarray:
    # the official conversion, written out per pixel: 0 ("other") -> 255, k -> k - 1
    out = np.empty_like(raw)
    for (y, x), v in np.ndenumerate(raw):
        out[y, x] = 255 if v == 0 else v - 1
    return out


def _prepare(name, root, archives=(), **kw):
    console = kw.pop("console", None) or quiet_console()
    args = dict(root=root, archives=list(archives), download=False, check=None, accept_checksum=True, force=False,
                synthetic={})
    args.update(kw)
    run_prepare(name, console=console, **args)
    return console_text(console)


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im)


@pytest.fixture
def ade(tmp_path):
    arch = tmp_path / "dl" / ADE
    return arch, make_ade_zip(arch)


def test_ade20k_labels_pixel_for_pixel_and_second_run_is_a_noop(tmp_path, ade):
    arch, raw = ade
    root = tmp_path / "datasets"
    out = _prepare("ade20k", root, [arch])
    base = root / "ADEChallengeData2016"
    for stem, lab in raw.items():
        got = _read(base / "annotations_detectron2" / _split(stem) / f"{stem}.png")
        np.testing.assert_array_equal(got, expected_semantic(lab))
        assert (base / "images" / _split(stem) / f"{stem}.jpg").is_file()
    assert (base / "objectInfo150.txt").is_file()
    stamp = read_stamp(base)["datasets"]["ade20k"]
    assert stamp["counts"] == {"train": 2, "val": 1} and stamp["num_classes"] == 150
    assert "train" in out and "disk size" in out
    assert not list(root.glob(".maskformer-*")), "staging and lock are cleaned up"
    # layout matches the catalog entry the loaders use
    info = get_dataset_info("ade20k")
    for img_dir, lab_dir in info.sem_seg.values():
        assert (base / img_dir).is_dir() and (base / lab_dir).is_dir()
    # second run: nothing to do, nothing rewritten
    label = base / "annotations_detectron2/training/ADE_train_00000001.png"
    mtime = label.stat().st_mtime_ns
    out2 = _prepare("ade20k", root, [arch])
    assert "nothing to do" in out2 and label.stat().st_mtime_ns == mtime
    # --force prepares again
    label.write_bytes(b"damaged")
    _prepare("ade20k", root, [arch], force=True)
    np.testing.assert_array_equal(_read(label), expected_semantic(raw["ADE_train_00000001"]))


def test_local_archive_with_other_checksum_is_refused_unless_accepted(tmp_path, ade):
    arch, _ = ade
    root = tmp_path / "datasets"
    with pytest.raises(UserError, match=r"does not match the official ADEChallengeData2016.zip.*--accept-checksum"):
        _prepare("ade20k", root, [arch], accept_checksum=False)
    assert not (root / "ADEChallengeData2016").exists()
    _prepare("ade20k", root, [arch], accept_checksum=True)
    assert "differs" in read_stamp(root / "ADEChallengeData2016")["datasets"]["ade20k"]["sources"][ADE]
    with archive_override(ADE, sha256=sha256(arch)):  # a matching checksum needs no flag
        _prepare("ade20k", tmp_path / "other_root", [arch], accept_checksum=False)
    # the checksum cache stays inside the datasets root: nothing is written beside the user's archive
    assert sorted(p.name for p in arch.parent.iterdir() if p.name.startswith(arch.name)) == [arch.name]
    assert list((root / "downloads" / ".checksums").glob(f"{arch.name}.*.sha256.json"))


def test_download_from_local_server_then_prepare(tmp_path, ade):
    arch, raw = ade
    root = tmp_path / "datasets"
    with FileServer() as server:
        server.files["/ADEChallengeData2016.zip"] = arch.read_bytes()
        server.drop_after["/ADEChallengeData2016.zip"] = 1000  # first connection cut: resumed
        with archive_override(ADE, url=server.url + "/ADEChallengeData2016.zip", sha256=sha256(arch),
                              size=arch.stat().st_size):
            _prepare("ade20k", root, download=True, accept_checksum=False)
    assert (root / "downloads" / ADE).read_bytes() == arch.read_bytes()
    got = _read(root / "ADEChallengeData2016/annotations_detectron2/validation/ADE_val_00000001.png")
    np.testing.assert_array_equal(got, expected_semantic(raw["ADE_val_00000001"]))


def test_missing_archive_without_download_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"ADEChallengeData2016.zip: not found and --no-download given"):
        _prepare("ade20k", tmp_path, download=False)


def test_existing_raw_tree_is_used_in_place(tmp_path, ade):
    arch, raw = ade
    import zipfile

    root = tmp_path / "datasets"
    with zipfile.ZipFile(arch) as zf:
        zf.extractall(root)  # what a user who unzipped it by hand has
    _prepare("ade20k", root, download=False)
    got = _read(root / "ADEChallengeData2016/annotations_detectron2/training/ADE_train_00000002.png")
    np.testing.assert_array_equal(got, expected_semantic(raw["ADE_train_00000002"]))
    assert "already in place" in read_stamp(root / "ADEChallengeData2016")["datasets"]["ade20k"]["sources"][ADE]


def test_corrupt_archive_leaves_nothing_that_looks_prepared(tmp_path, ade):
    arch, _ = ade
    cut = tmp_path / "cut" / ADE
    cut.parent.mkdir()
    cut.write_bytes(arch.read_bytes()[:-200])
    root = tmp_path / "datasets"
    with pytest.raises(UserError, match="corrupt or truncated"):
        _prepare("ade20k", root, [cut])
    assert not (root / "ADEChallengeData2016").exists()
    assert not list(root.glob(".maskformer-*"))


def test_bad_label_value_names_the_file(tmp_path):
    arch = tmp_path / ADE
    write_zip(arch, {
        "ADEChallengeData2016/images/training/ADE_train_00000001.jpg": jpg_bytes(8, 8),
        "ADEChallengeData2016/annotations/training/ADE_train_00000001.png": png_bytes(np.full((8, 8), 200, np.uint8)),
        "ADEChallengeData2016/images/validation/ADE_val_00000001.jpg": jpg_bytes(8, 8),
        "ADEChallengeData2016/annotations/validation/ADE_val_00000001.png": png_bytes(np.zeros((8, 8), np.uint8)),
    })
    with pytest.raises(UserError, match=r"ADE_train_00000001.png: label value 200 > 150") as e:
        _prepare("ade20k", tmp_path / "datasets", [arch])
    assert not (tmp_path / "datasets" / "ADEChallengeData2016").exists()
    # the archive and its member are named, not the staging copy that is deleted by now
    assert f"{arch} member ADEChallengeData2016/annotations/training/ADE_train_00000001.png" in str(e.value)
    assert ".maskformer-tmp" not in str(e.value)


# ---------------------------------------------------------------------------------------------- panoptic


def make_instance_tar(path: Path, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Instance PNGs: R = instance class (1..100), G = instance id; two instances in the first image."""
    inst = {}
    members = {}
    for stem, lab in raw.items():
        h, w = lab.shape
        rgb = np.zeros((h, w, 3), np.uint8)
        if stem == "ADE_train_00000001":
            rgb[2:6, 3:9] = (1, 1, 0)    # instance class 1 -> ADE class 8 (bed) -> category 7
            rgb[8:12, 10:20] = (8, 2, 0)  # instance class 8 -> ADE class 20 (car) -> category 19
            rgb[9:11, 0:4] = (8, 3, 0)    # a second car
        inst[stem] = rgb
        members[f"annotations_instance/{_split(stem)}/{stem}.png"] = png_bytes(rgb)
    write_tar(path, members)
    return inst


def test_ade20k_panoptic_against_independent_composition(tmp_path, ade):
    arch, raw = ade
    tar = tmp_path / "dl" / "annotations_instance.tar"
    inst = make_instance_tar(tar, raw)
    root = tmp_path / "datasets"
    _prepare("ade20k", root, [arch])
    _prepare("ade20k-panoptic", root, [arch, tar])
    base = root / "ADEChallengeData2016"
    info = get_dataset_info("ade20k-panoptic")
    things = set(info.thing_ids)
    assert len(things) == 100 and 7 in things and 19 in things and 0 not in things  # bed, car; wall is stuff
    data = json.loads((base / "ade20k_panoptic_train.json").read_text())
    anns = {a["image_id"]: a for a in data["annotations"]}
    assert len(data["categories"]) == 150 and sum(c["isthing"] for c in data["categories"]) == 100
    for stem in ("ADE_train_00000001", "ADE_train_00000002"):
        ids = rgb2id(_read(base / "ade20k_panoptic_train" / f"{stem}.png"))
        segs = {s["id"]: s for s in anns[stem]["segments_info"]}
        lab, rgb = raw[stem], inst[stem]
        for (y, x), v in np.ndenumerate(lab):
            in_instance = rgb[y, x, 0] > 0
            if in_instance:
                want = {1: 7, 8: 19}[int(rgb[y, x, 0])]
            elif v == 0 or (v - 1) in things:
                want = None  # void: "other", or a thing pixel not covered by an instance
            else:
                want = int(v) - 1
            got = segs[ids[y, x]]["category_id"] if ids[y, x] else None
            assert got == want, (stem, y, x)
        for s in segs.values():  # areas and boxes describe the final map
            ys, xs = np.nonzero(ids == s["id"])
            assert s["area"] == len(xs) and s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                                          ys.max() - ys.min() + 1]
    ids = rgb2id(_read(base / "ade20k_panoptic_train" / "ADE_train_00000001.png"))
    assert len({ids[9, 12], ids[9, 1]}) == 2, "two instances of one class are two segments"
    stamp = read_stamp(base)["datasets"]
    assert set(stamp) == {"ade20k", "ade20k_panoptic"}  # one directory, two complete datasets
    assert (base / "annotations_instance/validation/ADE_val_00000001.png").is_file()


# ----------------------------------------------------------------------------------------------------- CLI


def test_cli_errors_are_one_red_line_and_success_prints_a_table(tmp_path, ade):
    arch, _ = ade
    root = tmp_path / "datasets"
    cmd = [sys.executable, "-m", "maskformer_cli", "prepare-data", "ade20k", "--root", str(root),
           "--from-archive", str(arch), "--no-download"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "--accept-checksum" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(cmd + ["--accept-checksum"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "classes" in r.stdout and (root / "ADEChallengeData2016" / STAMP).is_file()


def test_a_crash_while_moving_files_into_place_is_refused_by_train_and_repaired_by_prepare(tmp_path, ade,
                                                                                          monkeypatch):
    import maskformer_cli.commands.prepare_data as prepare_mod
    from maskformer_cli.data.datasets import build_dataset

    arch, _ = ade
    root = tmp_path / "datasets"
    real = prepare_mod.merge_move

    def crash(src, dst, replace=()):
        real(src, dst, replace)  # the files are in place, the stamp is not updated yet
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_mod, "merge_move", crash)
    with pytest.raises(KeyboardInterrupt):
        _prepare("ade20k", root, [arch], accept_checksum=True)
    assert read_stamp(root / "ADEChallengeData2016")["datasets"]["ade20k"]["status"] == "incomplete"
    with pytest.raises(UserError, match="was interrupted"):
        build_dataset(get_dataset_info("ade20k"), root, "val", "semantic", None)
    monkeypatch.setattr(prepare_mod, "merge_move", real)
    _prepare("ade20k", root, [arch], accept_checksum=True)  # no --force needed
    assert "status" not in read_stamp(root / "ADEChallengeData2016")["datasets"]["ade20k"]
    assert len(build_dataset(get_dataset_info("ade20k"), root, "val", "semantic", None)) > 0
