"""Custom dataset specs: loading as a DatasetInfo, `prepare-data custom --check` finding every fault and
agreeing with the loader (EXIF orientation), missing panoptic paths reported once, and a helpful error for a
dataset given as a folder instead of its spec YAML."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from panopticapi.utils import id2rgb
from PIL import Image
from prepare_utils import console_text, jpg_bytes, png_bytes, quiet_console

from maskformer_cli.commands.prepare_data import run_prepare
from maskformer_cli.data.catalog import datasets_root, get_dataset_info
from maskformer_cli.data.custom import check_custom
from maskformer_cli.data.datasets import build_dataset
from maskformer_cli.errors import UserError

CLASSES = ["road", "car", "person"]


def _w(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _spec(tmp_path: Path, text: str) -> Path:
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    return spec


SPEC = """
name: roads
classes: classes.txt
ignore_label: 255
thing_classes: [car, person]
semantic:
  train: {images: img/train, labels: lbl/train, label_suffix: _mask}
  val: {images: img/val, labels: lbl/val, label_suffix: _mask}
"""


def make_dataset(tmp_path: Path) -> dict[str, list[np.ndarray]]:
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    rng = np.random.default_rng(0)
    good = {"train": [], "val": []}

    def label(h=8, w=8):
        lab = rng.integers(0, 3, (h, w)).astype(np.uint8)
        lab[0, 0] = 255
        return lab

    for split, stems in (("train", ["a", "sub/b"]), ("val", ["v"])):
        for s in stems:
            lab = label()
            good[split].append(lab)
            _w(tmp_path / f"img/{split}/{s}.jpg", jpg_bytes(8, 8))
            _w(tmp_path / f"lbl/{split}/{s}_mask.png", png_bytes(lab))
    # planted faults, all in train
    _w(tmp_path / "img/train/no_label.jpg", jpg_bytes(8, 8))
    _w(tmp_path / "lbl/train/no_image_mask.png", png_bytes(label()))
    _w(tmp_path / "img/train/wrong_size.jpg", jpg_bytes(8, 8))
    _w(tmp_path / "lbl/train/wrong_size_mask.png", png_bytes(label(6, 8)))
    bad = label()
    bad[1, 1], bad[2, 2] = 7, 3
    _w(tmp_path / "img/train/bad_value.jpg", jpg_bytes(8, 8))
    _w(tmp_path / "lbl/train/bad_value_mask.png", png_bytes(bad))
    _w(tmp_path / "img/train/truncated.jpg", jpg_bytes(8, 8))
    _w(tmp_path / "lbl/train/truncated_mask.png", png_bytes(label())[:60])
    _w(tmp_path / "img/train/rgb.jpg", jpg_bytes(8, 8))
    _w(tmp_path / "lbl/train/rgb_mask.png", png_bytes(np.zeros((8, 8, 3), np.uint8)))
    _w(tmp_path / "img/train/broken_image.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")
    _w(tmp_path / "lbl/train/broken_image_mask.png", png_bytes(label()))
    return good


def test_spec_becomes_a_dataset_info_with_absolute_paths(tmp_path):
    make_dataset(tmp_path)
    spec = _spec(tmp_path, SPEC)
    info = get_dataset_info(str(spec))
    assert info.name == "roads" and info.classes == tuple(CLASSES) and info.thing_ids == (1, 2)
    assert info.root == str(tmp_path.resolve()) and info.task == "semantic"
    assert info.sem_seg["val"] == (str((tmp_path / "img/val").resolve()), str((tmp_path / "lbl/val").resolve()))
    assert info.label_suffix == ("", "_mask")


@pytest.mark.parametrize("text, message", [
    ("name: x\nclases: [a]\nsemantic: {train: {images: i, labels: l}}\n", "did you mean 'classes'"),
    ("classes: [a, b]\nignore_label: 1\nsemantic: {train: {images: i, labels: l}}\n", "collides with class index 1"),
    ("classes: [a, a]\nsemantic: {train: {images: i, labels: l}}\n", "duplicate class names: a"),
    ("classes: [a]\nsemantic: {train: {images: i}}\n", "'semantic.train' lacks 'labels'"),
    ("classes: [a]\n", "needs a 'semantic' and/or 'panoptic' section"),
    ("classes: [a\n", r"spec.yaml:2:1: not valid YAML"),
])
def test_spec_errors_name_the_file_and_key(tmp_path, text, message):
    spec = _spec(tmp_path, text)
    with pytest.raises(UserError, match=message) as e:
        get_dataset_info(str(spec))
    assert str(spec) in str(e.value)


def test_check_finds_every_planted_fault(tmp_path):
    good = make_dataset(tmp_path)
    rep = check_custom(_spec(tmp_path, SPEC))
    text = "\n".join(rep.problems)
    expected = [
        ("no_label.jpg", "no label"),
        ("no_image_mask.png", "no image"),
        ("wrong_size_mask.png", "label is 8x6 but image wrong_size.jpg is 8x8"),
        ("bad_value_mask.png", "2 pixels with values outside 0..2 and ignore 255: 3, 7"),
        ("truncated_mask.png", "unreadable label"),
        ("rgb_mask.png", "3 channels"),
        ("broken_image.jpg", "unreadable image"),
    ]
    for fname, what in expected:
        assert any(fname in p and what in p for p in rep.problems), f"missing: {fname} {what}\n{text}"
    assert len(rep.problems) == len(expected), text
    # pixel counts of the clean val split, counted independently
    want = np.zeros(3, np.int64)
    for lab in good["val"]:
        for v in lab.ravel():
            if v < 3:
                want[v] += 1
    np.testing.assert_array_equal(rep.pixels["val"], want)
    assert rep.images == {"train": 2 + 5, "val": 1}


def test_check_command_lists_problems_and_exits_1(tmp_path):
    make_dataset(tmp_path)
    spec = _spec(tmp_path, SPEC)
    r = subprocess.run([sys.executable, "-m", "maskformer_cli", "prepare-data", "custom", "--check", str(spec)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "7 problem(s)" in r.stderr
    for fname in ("no_label.jpg", "no_image_mask.png", "bad_value_mask.png", "truncated_mask.png"):
        assert fname in r.stdout
    assert "road" in r.stdout and "person" in r.stdout  # the pixel table


def test_clean_dataset_passes(tmp_path):
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES))
    _w(tmp_path / "img/train/a.jpg", jpg_bytes(8, 8))
    _w(tmp_path / "lbl/train/a_mask.png", png_bytes(np.ones((8, 8), np.uint8)))
    _w(tmp_path / "img/val/v.jpg", jpg_bytes(8, 8))
    _w(tmp_path / "lbl/val/v_mask.png", png_bytes(np.zeros((8, 8), np.uint8)))
    console = quiet_console()
    result = run_prepare("custom", root=None, archives=[], download=False, check=_spec(tmp_path, SPEC),
                         accept_checksum=False, force=False, synthetic={}, console=console)
    assert result["problems"] == [] and result["pixels"]["train"] == [0, 64, 0]
    assert "no problems found" in console_text(console)


def test_custom_needs_check(tmp_path):
    with pytest.raises(UserError, match="--check SPEC.yaml"):
        run_prepare("custom", root=None, archives=[], download=False, check=None, accept_checksum=False,
                    force=False, synthetic={}, console=quiet_console())


def test_panoptic_spec_and_check(tmp_path):
    ids = np.zeros((6, 8), np.int64)
    ids[:, :4], ids[:, 4:] = 1, 2
    ids[0, 0] = 9  # not listed in segments_info
    cats = [{"id": 10, "name": "road", "isthing": 0}, {"id": 20, "name": "car", "isthing": 1}]
    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 6},
                       {"id": 2, "file_name": "b.jpg", "width": 8, "height": 6}],
            "annotations": [{"image_id": 1, "file_name": "a.png",
                             "segments_info": [{"id": 1, "category_id": 10}, {"id": 2, "category_id": 20}]},
                            {"image_id": 2, "file_name": "b.png", "segments_info": []}],
            "categories": cats}
    _w(tmp_path / "pan.json", json.dumps(data).encode())
    _w(tmp_path / "img/a.jpg", jpg_bytes(6, 8))
    _w(tmp_path / "img/b.jpg", jpg_bytes(6, 8))
    _w(tmp_path / "pngs/a.png", png_bytes(id2rgb(ids).astype(np.uint8)))
    spec = _spec(tmp_path, "name: pan\npanoptic:\n  train: {images: img, json: pan.json, pngs: pngs}\n")
    info = get_dataset_info(str(spec))
    assert info.task == "panoptic" and info.classes == ("road", "car") and info.dataset_ids == (10, 20)
    assert info.thing_ids == (1,)
    rep = check_custom(spec)
    assert any("a.png: segment id 9" in p for p in rep.problems)
    assert any("b.png: panoptic PNG listed in pan.json is missing" in p for p in rep.problems)
    assert len(rep.problems) == 2
    np.testing.assert_array_equal(rep.pixels["panoptic:train"], [(ids == 1).sum(), (ids == 2).sum()])


# ------------------------------------------------------ the check agrees with the loader; folder errors


def _jpg(w: int, h: int, orientation: int | None = None) -> bytes:
    """A w x h (stored) JPEG, with an EXIF Orientation tag when given."""
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    if orientation is None:
        im.save(buf, format="JPEG")
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


SEM_SPEC = "name: rot\nclasses: [a, b]\nsemantic:\n  train: {images: img, labels: lbl}\n"


def _loader_accepts(spec: Path, split: str, task: str) -> bool:
    info = get_dataset_info(str(spec))
    ds = build_dataset(info, datasets_root(), split, task, None)
    try:
        for i in range(len(ds)):
            ds.load(i)
    except UserError:
        return False
    return True


# ------------------------------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("orientation", [None, 1, 3, 5, 6, 8])
@pytest.mark.parametrize("label_wh", [(64, 48), (48, 64)])
def test_check_agrees_with_the_loader_on_exif_rotated_images(tmp_path, orientation, label_wh):
    _w(tmp_path / "img/a.jpg", _jpg(64, 48, orientation))
    _w(tmp_path / "lbl/a.png", png_bytes(np.ones((label_wh[1], label_wh[0]), np.uint8)))
    spec = tmp_path / "spec.yaml"
    spec.write_text(SEM_SPEC)
    rep = check_custom(spec)
    swapped = orientation in (5, 6, 8)
    assert (rep.problems == []) == _loader_accepts(spec, "train", "semantic")
    assert (rep.problems == []) == ((label_wh == (48, 64)) if swapped else (label_wh == (64, 48)))
    if rep.problems:
        (problem,) = rep.problems
        loaded = (48, 64) if swapped else (64, 48)
        assert f"label is {label_wh[0]}x{label_wh[1]} but image a.jpg is {loaded[0]}x{loaded[1]}" in problem
        assert ("EXIF-rotated" in problem) == swapped
        if swapped:
            assert f"Orientation={orientation}" in problem and "stored as 64x48" in problem


def _panoptic_tree(tmp_path: Path, n: int = 3, image: bytes | None = None, pan_hw=(48, 64)) -> Path:
    ids = np.zeros(pan_hw, np.int64)
    ids[:, : pan_hw[1] // 2] = 1
    images, anns = [], []
    for i in range(n):
        images.append({"id": i, "file_name": f"im{i}.jpg", "width": 64, "height": 48})
        anns.append({"image_id": i, "file_name": f"im{i}.png", "segments_info": [{"id": 1, "category_id": 1}]})
        _w(tmp_path / f"img/im{i}.jpg", image if image is not None else _jpg(64, 48))
        _w(tmp_path / f"pngs/im{i}.png", png_bytes(id2rgb(ids).astype(np.uint8)))
    cats = [{"id": 1, "name": "car", "isthing": 1}, {"id": 2, "name": "road", "isthing": 0}]
    _w(tmp_path / "pan.json", json.dumps({"images": images, "annotations": anns, "categories": cats}).encode())
    spec = tmp_path / "pan.yaml"
    spec.write_text("name: pan\npanoptic:\n  val: {images: img, json: pan.json, pngs: pngs}\n")
    return spec


def test_panoptic_check_uses_the_oriented_image_size(tmp_path):
    spec = _panoptic_tree(tmp_path, n=1, image=_jpg(64, 48, orientation=6))
    rep = check_custom(spec)
    assert len(rep.problems) == 1 and "EXIF-rotated" in rep.problems[0], rep.problems
    assert "PNG is 64x48 but image im0.jpg is 48x64" in rep.problems[0]
    assert not _loader_accepts(spec, "val", "panoptic")


# ------------------------------------------------------------------------------- missing panoptic paths


@pytest.mark.parametrize("key, wrong, what", [
    ("pngs", "pngz", "pngs directory"),
    ("images", "imgz", "images directory"),
    ("json", "pan_val.json", "json file"),
])
def test_missing_panoptic_path_is_one_problem(tmp_path, key, wrong, what):
    spec = _panoptic_tree(tmp_path, n=32)
    assert check_custom(spec).problems == []
    text = spec.read_text().replace(f"{key}: {dict(pngs='pngs', images='img', json='pan.json')[key]}",
                                    f"{key}: {wrong}")
    text = text.replace("name: pan\n", "name: pan\nclasses: [car, road]\nthing_classes: [car]\n")
    spec.write_text(text)
    rep = check_custom(spec)
    assert rep.problems == [f"{(tmp_path / wrong).resolve()}: panoptic:val {what} does not exist"]


def test_missing_panoptic_json_without_classes_says_so(tmp_path):
    spec = _panoptic_tree(tmp_path, n=1)
    spec.write_text(spec.read_text().replace("json: pan.json", "json: pan_val.json"))
    with pytest.raises(UserError, match=r"no 'classes', and .*pan_val.json \(the panoptic JSON to take them "
                                        r"from\) does not exist"):
        check_custom(spec)


def test_missing_panoptic_dirs_are_each_reported_once_by_the_command(tmp_path):
    spec = _panoptic_tree(tmp_path, n=5)
    spec.write_text("name: pan\npanoptic:\n  val: {images: imgz, json: pan.json, pngs: pngz}\n")
    r = subprocess.run([sys.executable, "-m", "maskformer_cli", "prepare-data", "custom", "--check", str(spec)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "2 problem(s)" in r.stderr
    assert r.stdout.count("does not exist") == 2 and "listed in pan.json" not in r.stdout


# ----------------------------------------------------------------------------- dataset given as a folder


def test_folder_as_dataset_names_its_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").mkdir()
    (tmp_path / "mydata/pan.yaml").write_text("x: 1\n")
    (tmp_path / "mydata/notes.txt").write_text("")
    with pytest.raises(UserError) as e:
        get_dataset_info("mydata")
    msg = str(e.value)
    assert "'mydata' is a directory: give the path of its dataset spec YAML" in msg
    assert "Fine-tuning on your own data" in msg and "did you mean mydata/pan.yaml?" in msg
    assert "unknown dataset" not in msg


def test_folder_without_or_with_several_specs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is a directory: give the path of its dataset spec YAML") as e:
        get_dataset_info("empty")
    assert "did you mean" not in str(e.value)
    (tmp_path / "two").mkdir()
    (tmp_path / "two/a.yaml").write_text("")
    (tmp_path / "two/b.yml").write_text("")
    with pytest.raises(UserError, match="it has a.yaml, b.yml") as e:
        get_dataset_info("two")
    assert "did you mean" not in str(e.value)


def test_existing_non_yaml_file_and_near_miss_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.json").write_text("{}")
    with pytest.raises(UserError, match="'spec.json' is not a dataset spec: .*ending in .yaml or .yml"):
        get_dataset_info("spec.json")
    with pytest.raises(UserError, match=r"unknown dataset 'ade20' \(did you mean 'ade20k'\?\); known: "):
        get_dataset_info("ade20")
    assert get_dataset_info("ade20k").num_classes == 150  # a catalog name wins over a same-named folder
    (tmp_path / "ade20k").mkdir()
    assert get_dataset_info("ade20k").num_classes == 150


def test_folder_as_dataset_from_the_command_line(tmp_path):
    (tmp_path / "mydata").mkdir()
    (tmp_path / "mydata/pan.yaml").write_text("x: 1\n")
    (tmp_path / "preds").mkdir()
    r = subprocess.run([sys.executable, "-m", "maskformer_cli", "evaluate", "--predictions", "preds",
                        "--dataset", "mydata", "--metric", "miou"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "'mydata' is a directory" in r.stderr and "mydata/pan.yaml" in r.stderr
