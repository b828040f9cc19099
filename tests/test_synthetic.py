"""The embedded synthetic dataset: deterministic, in the real formats, readable by the reference tools."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from panopticapi.evaluation import pq_compute_single_core
from panopticapi.utils import rgb2id
from PIL import Image
from pycocotools import mask as mask_utils

from maskformer_cli.data import synthetic
from maskformer_cli.data.catalog import get_dataset_info
from maskformer_cli.data.synthetic import ade_to_detectron2, class_looks, generate_synthetic
from maskformer_cli.errors import UserError


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "synthetic_k12"
    generate_synthetic(out, num_classes=12, num_images=40, size=64, seed=3)
    return out


def _annotations(ds: Path, split: str) -> dict:
    return json.loads((ds / f"panoptic_{split}.json").read_text())


def test_layout_counts_and_stamp(ds):
    stamp = json.loads((ds / ".maskformer_prepared.json").read_text())["datasets"]["synthetic"]
    assert stamp["name"] == "synthetic" and stamp["version"] == synthetic.SYNTHETIC_VERSION
    assert stamp["params"] == {"num_classes": 12, "num_images": 40, "size": 64, "seed": 3}
    staging = pytest.importorskip("maskformer_cli.data.staging")  # prepare-data reads the same stamp
    assert staging.stamp_entry(ds, "synthetic") == stamp
    assert stamp["counts"]["train"] == 32 and stamp["counts"]["val"] == 8
    for split, ade in (("train", "training"), ("val", "validation")):
        images = sorted((ds / "images" / ade).iterdir())
        assert len(images) == stamp["counts"][split]
        for img in images:
            assert img.suffix == ".jpg" and img.stem.startswith("syn_") and len(img.stem) == 12
            with Image.open(img) as im:
                assert im.format == "JPEG" and im.mode == "RGB" and im.size == (64, 64)
            for sub in ("annotations", "annotations_detectron2"):
                with Image.open(ds / sub / ade / f"{img.stem}.png") as lab:
                    assert lab.format == "PNG" and lab.mode == "L" and lab.size == (64, 64)
            with Image.open(ds / f"panoptic_{split}" / f"{img.stem}.png") as pan:
                assert pan.mode == "RGB"
        doc = _annotations(ds, split)
        assert [im["file_name"] for im in doc["images"]] == [p.name for p in images]
    # nothing temporary left next to the dataset
    assert [p.name for p in ds.parent.iterdir()] == ["synthetic_k12"]


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 1), (b, 1), (c, 2)):
        generate_synthetic(out, num_classes=7, num_images=6, size=48, seed=seed)
    da, db, dc = _digest(a), _digest(b), _digest(c)
    assert da == db
    assert len(da) == 6 * 4 + 2 + 1  # image + 3 label PNGs per image, 2 JSONs, the stamp
    differing = [k for k in da if k.endswith(".jpg") and da[k] != dc[k]]
    assert len(differing) == 6


def test_panoptic_png_and_json_agree(ds):
    """Independent readers: panopticapi's rgb2id and pycocotools' bbox of the RLE."""
    for split in ("train", "val"):
        doc = _annotations(ds, split)
        cat_ids = {c["id"] for c in doc["categories"]}
        for ann in doc["annotations"]:
            pan = rgb2id(np.asarray(Image.open(ds / f"panoptic_{split}" / ann["file_name"])))
            segs = ann["segments_info"]
            ids = [s["id"] for s in segs]
            assert len(set(ids)) == len(ids) and 0 not in ids
            assert set(np.unique(pan).tolist()) - {0} == set(ids)
            for s in segs:
                m = pan == s["id"]
                assert s["area"] == int(m.sum()) > 0
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                assert s["bbox"] == mask_utils.toBbox(rle).astype(int).tolist()
                assert s["category_id"] in cat_ids and s["iscrowd"] in (0, 1)


def test_pq_of_ground_truth_against_itself_is_perfect(ds):
    """panopticapi's own evaluator accepts the files (it raises on any PNG/JSON inconsistency)."""
    doc = _annotations(ds, "val")
    categories = {c["id"]: c for c in doc["categories"]}
    pairs = [(a, a) for a in doc["annotations"]]
    folder = str(ds / "panoptic_val")
    stat = pq_compute_single_core(0, pairs, folder, folder, categories)
    result, _ = stat.pq_average(categories, isthing=None)
    assert result["pq"] == pytest.approx(1.0) and result["n"] > 0
    non_crowd = sum(1 for a in doc["annotations"] for s in a["segments_info"] if not s["iscrowd"])
    assert sum(stat.pq_per_cat[c].tp for c in categories) == non_crowd


def test_semantic_and_panoptic_labels_describe_the_same_scene(ds):
    doc = _annotations(ds, "train")
    for ann in doc["annotations"]:
        raw = np.asarray(Image.open(ds / "annotations" / "training" / ann["file_name"])).astype(np.int64)
        pan = rgb2id(np.asarray(Image.open(ds / "panoptic_train" / ann["file_name"])))
        assert np.array_equal(raw == 0, pan == 0)  # ADE "other" is COCO void
        expected = np.zeros_like(raw)
        for s in ann["segments_info"]:  # crowd segments keep their category in the semantic label
            expected[pan == s["id"]] = s["category_id"]  # dataset id = contiguous + 1 = raw ADE value
        assert np.array_equal(raw, expected)


def test_detectron2_conversion(ds):
    values = np.arange(256, dtype=np.uint8)
    assert np.array_equal(ade_to_detectron2(values), np.where(values == 0, 255, values.astype(int) - 1))
    for raw_path in sorted((ds / "annotations" / "validation").iterdir()):
        raw = np.asarray(Image.open(raw_path)).astype(int)
        d2 = np.asarray(Image.open(ds / "annotations_detectron2" / "validation" / raw_path.name))
        assert np.array_equal(d2, np.where(raw == 0, 255, raw - 1))


def test_scene_statistics(tmp_path):
    """Some ignore (but little), crowd groups, repeated instances of one class, things over stuff."""
    out = tmp_path / "s"
    counts = generate_synthetic(out, num_classes=12, num_images=60, size=48, seed=0)
    info = get_dataset_info("synthetic", num_classes=12)
    doc = _annotations(out, "train")
    ignore, crowd, repeated = [], 0, 0
    for ann in doc["annotations"]:
        raw = np.asarray(Image.open(out / "annotations" / "training" / ann["file_name"]))
        ignore.append(float((raw == 0).mean()))
        crowd += sum(s["iscrowd"] for s in ann["segments_info"])
        things = Counter(s["category_id"] for s in ann["segments_info"]
                         if s["category_id"] - 1 in info.thing_ids and not s["iscrowd"])
        repeated += any(v >= 2 for v in things.values())
        assert any(s["category_id"] - 1 in info.stuff_ids for s in ann["segments_info"])
    assert counts["train"] == len(doc["annotations"]) == 48
    assert 0.001 < np.mean(ignore) < 0.08 and sum(v > 0 for v in ignore) > 10
    assert crowd >= 1 and repeated >= 5


def test_class_looks_are_distinct_and_scale_to_150(tmp_path):
    for k in (2, 12, 150, 255):
        looks = class_looks(k)
        num_stuff = max(1, k // 3)
        assert sum(lk.shape is None for lk in looks) == num_stuff
        keys = [(lk.shape, round(lk.hue, 6), lk.saturation, lk.value, lk.texture) for lk in looks]
        assert len(set(keys)) == k
        info = get_dataset_info("synthetic", num_classes=k)
        for i, lk in enumerate(looks[num_stuff:], start=num_stuff):
            assert info.classes[i].startswith(lk.shape)  # the catalog's names say the shape
    # several thing classes share a hue: shape matters
    hues = Counter(round(lk.hue, 6) for lk in class_looks(12) if lk.shape)
    assert max(hues.values()) >= 2
    out = tmp_path / "k150"
    generate_synthetic(out, num_classes=150, num_images=6, size=48)
    doc = _annotations(out, "train")
    assert len(doc["categories"]) == 150
    assert sum(c["isthing"] for c in doc["categories"]) == 100
    raw_max = max(int(np.asarray(Image.open(p)).max()) for p in (out / "annotations" / "training").iterdir())
    assert 1 <= raw_max <= 150


def test_failure_leaves_previous_dataset_untouched(tmp_path, monkeypatch):
    out = tmp_path / "synthetic_k5"
    generate_synthetic(out, num_classes=5, num_images=4, size=40)
    before = _digest(out)
    calls = {"n": 0}
    real = synthetic.make_scene

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "make_scene", failing)
    with pytest.raises(RuntimeError):
        generate_synthetic(out, num_classes=5, num_images=4, size=40, seed=9)
    assert _digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic_k5"]
    monkeypatch.setattr(synthetic, "make_scene", real)
    generate_synthetic(out, num_classes=5, num_images=4, size=40, seed=9)  # replaces it in place
    assert _digest(out) != before


@pytest.mark.parametrize("kwargs", [{"num_classes": 1}, {"num_classes": 300}, {"num_images": 1}, {"size": 8},
                                    {"val_fraction": 1.0}])
def test_bad_parameters_are_user_errors(tmp_path, kwargs):
    with pytest.raises(UserError):
        generate_synthetic(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_default_size_is_fast(tmp_path):
    import time

    t0 = time.perf_counter()
    seen: list[tuple[int, int]] = []
    counts = generate_synthetic(tmp_path / "d", progress=lambda done, total: seen.append((done, total)))
    assert counts["train"] == 192 and counts["val"] == 48
    assert seen == [(i, 240) for i in range(1, 241)]
    assert time.perf_counter() - t0 < 30  # seconds on a busy 2-core machine (about 3 s alone)
