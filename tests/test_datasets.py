"""Datasets over the prepared layouts, bad-file handling, and batching."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from panopticapi.utils import rgb2id
from PIL import Image

from maskformer_cli.config import DataConfig
from maskformer_cli.data.catalog import DatasetInfo, get_dataset_info
from maskformer_cli.data.collate import collate
from maskformer_cli.data.datasets import Sample, build_dataset
from maskformer_cli.data.synthetic import generate_synthetic
from maskformer_cli.data.transforms import build_transforms
from maskformer_cli.errors import UserError
from maskformer_cli.structures import Target


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> tuple[DatasetInfo, Path]:
    root = tmp_path_factory.mktemp("datasets")
    info = get_dataset_info("synthetic", num_classes=9)
    generate_synthetic(root / info.dirname, num_classes=9, num_images=30, size=40, seed=1, val_fraction=0.1)
    return info, root


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array) if mode is None else Image.fromarray(array, mode=mode)
    im.save(path)
    return path


def _semantic_info(root: Path, num_classes: int = 5, ignore: int = 255, **kw) -> DatasetInfo:
    return DatasetInfo(name="tiny", classes=tuple(f"c{i}" for i in range(num_classes)), ignore_label=ignore,
                       sem_seg={"train": ("img", "lab")}, root=str(root), **kw)


def _tiny_semantic(root: Path, n: int = 3, h: int = 20, w: int = 24) -> DatasetInfo:
    g = np.random.default_rng(0)
    for i in range(n):
        _png(root / "img" / f"im{i}.png", g.integers(0, 256, (h, w, 3), dtype=np.uint8))
        lab = g.integers(0, 5, (h, w)).astype(np.uint8)
        lab[0] = 255
        _png(root / "lab" / f"im{i}.png", lab)
    return _semantic_info(root)


# ------------------------------------------------------------------------------------------- synthetic


def test_semantic_targets_reconstruct_the_label_png(syn):
    info, root = syn
    ds = build_dataset(info, root, "train", "semantic", transform=None)
    assert len(ds) == 27
    for i in range(len(ds)):
        s = ds[i]
        lab = np.asarray(Image.open(s.meta["sem_seg_file"])).astype(np.int64)
        img = np.asarray(Image.open(s.meta["file_name"]).convert("RGB"))
        assert torch.equal(s.image, torch.from_numpy(img.copy()).permute(2, 0, 1))
        t = s.target
        assert torch.equal(t.semantic_map(255), torch.from_numpy(lab))
        assert torch.equal(t.ignore, torch.from_numpy(lab == 255))
        assert t.classes.tolist() == sorted(set(np.unique(lab).tolist()) - {255})
        assert t.masks.dtype == torch.bool and (t.masks.sum(0) <= 1).all()
        assert (s.meta["height"], s.meta["width"]) == lab.shape and s.meta["image_id"] == Path(s.meta["file_name"]).stem


def test_panoptic_targets_match_segments_info(syn):
    info, root = syn
    ds = build_dataset(info, root, "val", "panoptic", transform=None)
    doc = json.loads((root / info.dirname / "panoptic_val.json").read_text())
    assert len(ds) == len(doc["annotations"]) == 3
    for i, ann in enumerate(doc["annotations"]):
        s = ds[i]
        pan = rgb2id(np.asarray(Image.open(root / info.dirname / "panoptic_val" / ann["file_name"])))
        kept = [seg for seg in ann["segments_info"] if not seg["iscrowd"]]
        t = s.target
        assert t.segment_ids.tolist() == [seg["id"] for seg in kept]
        assert t.classes.tolist() == [seg["category_id"] - 1 for seg in kept]
        for m, seg in zip(t.masks, kept, strict=True):
            assert torch.equal(m, torch.from_numpy(pan == seg["id"]))
        crowd = np.isin(pan, [seg["id"] for seg in ann["segments_info"] if seg["iscrowd"]])
        assert torch.equal(t.ignore, torch.from_numpy((pan == 0) | crowd))
        assert not t.is_crowd.any()
        assert s.meta["segments_info"] == [{**seg, "category_id": seg["category_id"] - 1} for seg in ann["segments_info"]]
        assert s.meta["image_id"] == ann["image_id"]


def test_crowd_pixels_are_ignored_in_panoptic_targets(tmp_path):
    root = tmp_path
    info = get_dataset_info("synthetic", num_classes=6)
    generate_synthetic(root / info.dirname, num_classes=6, num_images=40, size=40, seed=0)
    ds = build_dataset(info, root, "train", "panoptic", transform=None)
    found = 0
    for i in range(len(ds)):
        crowd = [seg for seg in ds.items[i][1]["segments_info"] if seg["iscrowd"]]
        if crowd:
            t = ds[i].target
            pan = rgb2id(np.asarray(Image.open(ds[i].meta["pan_seg_file"])))
            cm = torch.from_numpy(pan == crowd[0]["id"])
            assert t.ignore[cm].all() and not t.masks[:, cm].any()
            assert crowd[0]["id"] not in t.segment_ids.tolist()
            found += 1
    assert found >= 1


def test_semantic_from_panoptic_when_no_semantic_labels(syn):
    info, root = syn
    pan_only = dataclasses.replace(info, sem_seg={})
    ds = build_dataset(pan_only, root, "train", "semantic", transform=None)
    assert any(seg["iscrowd"] for _, ann in ds.items for seg in ann["segments_info"])  # crowd keeps its class
    for i in range(len(ds)):
        s = ds[i]
        raw = np.asarray(Image.open(root / info.dirname / "annotations" / "training"
                                    / Path(s.meta["pan_seg_file"]).name)).astype(np.int64)
        assert torch.equal(s.target.semantic_map(255), torch.from_numpy(np.where(raw == 0, 255, raw - 1)))
        assert torch.equal(s.meta["sem_seg"], torch.from_numpy(np.where(raw == 0, 255, raw - 1)))


def test_training_pipeline_batches(syn):
    info, root = syn
    cfg = DataConfig(crop_size=(32, 32), cat_max_ratio=0.75)
    for task in ("semantic", "panoptic"):
        ds = build_dataset(info, root, "train", task, build_transforms(cfg, train=True))
        loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=functools.partial(collate, size_divisibility=32))
        batch = next(iter(loader))
        assert batch.images.shape == (4, 3, 32, 32) and batch.images.dtype == torch.float32
        for t, img in zip(batch.targets, batch.images, strict=True):
            assert t.masks.shape[-2:] == img.shape[-2:] and t.classes.max() < 9
            assert ((t.masks.sum(0) > 0) | t.ignore).all() or task == "panoptic"


def test_dataset_errors_name_what_is_missing(syn, tmp_path):
    info, root = syn
    with pytest.raises(UserError, match="prepare-data synthetic"):
        build_dataset(info, tmp_path, "train", "semantic", transform=None)
    with pytest.raises(UserError, match="unknown split 'test'"):
        build_dataset(info, root, "test", "semantic", transform=None)
    semantic_only = dataclasses.replace(info, panoptic={})
    with pytest.raises(UserError, match="no panoptic"):
        build_dataset(semantic_only, root, "train", "panoptic", transform=None)


# ------------------------------------------------------------------------------------------- bad files


def test_corrupt_image_raises_or_is_skipped(tmp_path):
    info = _tiny_semantic(tmp_path)
    good = (tmp_path / "img" / "im1.png").read_bytes()
    (tmp_path / "img" / "im1.png").write_bytes(good[: len(good) // 2])  # valid header, truncated pixels
    ds = build_dataset(info, tmp_path, "train", "semantic", transform=None)
    assert isinstance(ds[0], Sample)
    with pytest.raises(UserError, match="im1.png"):
        ds[1]
    skipping = build_dataset(info, tmp_path, "train", "semantic", transform=None, skip_bad=True)
    samples = [skipping[i] for i in range(3)]
    assert samples[1] is None and len(skipping.skipped) == 1 and "im1.png" in skipping.skipped[0]
    batch = collate(samples)
    assert len(batch) == 2 and batch.num_skipped == 1


def test_missing_label_and_bad_values(tmp_path):
    info = _tiny_semantic(tmp_path)
    (tmp_path / "lab" / "im2.png").unlink()
    _png(tmp_path / "lab" / "im0.png", np.full((20, 24), 7, dtype=np.uint8))
    ds = build_dataset(info, tmp_path, "train", "semantic", transform=None)
    with pytest.raises(UserError, match=r"label not found: .*im2\.png"):
        ds[2]
    with pytest.raises(UserError, match=r"im0\.png has values \[7\]"):
        ds[0]


def test_size_mismatch_names_both_files(tmp_path):
    info = _tiny_semantic(tmp_path)
    _png(tmp_path / "lab" / "im0.png", np.zeros((20, 25), dtype=np.uint8))
    ds = build_dataset(info, tmp_path, "train", "semantic", transform=None)
    with pytest.raises(UserError, match=r"image .*im0\.png is 24x20 .* label .*im0\.png is 25x20"):
        ds[0]


def test_exif_rotated_jpeg_matches_its_label(tmp_path):
    shown = np.zeros((40, 30, 3), dtype=np.uint8)  # as displayed: 40 high, 30 wide, red top-left corner
    shown[:10, :10] = (255, 0, 0)
    stored = Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90)  # 30 high, 40 wide on disk
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    (tmp_path / "img").mkdir()
    stored.save(tmp_path / "img" / "a.jpg", quality=95, exif=exif)
    label = np.zeros((40, 30), dtype=np.uint8)
    label[:10, :10] = 1
    _png(tmp_path / "lab" / "a.png", label)
    s = build_dataset(_semantic_info(tmp_path), tmp_path, "train", "semantic", transform=None)[0]
    assert s.image.shape == (3, 40, 30)
    assert s.image[0, :8, :8].float().mean() > 200 and s.image[0, 12:, 12:].float().mean() < 50
    assert torch.equal(s.target.semantic_map(), torch.from_numpy(label.astype(np.int64)))


def test_16bit_labels_keep_their_values(tmp_path):
    lab = np.random.default_rng(0).integers(0, 300, (16, 20)).astype(np.uint16)
    lab[:2] = 65535
    _png(tmp_path / "lab" / "a.png", lab)
    assert Image.open(tmp_path / "lab" / "a.png").mode.startswith("I")
    _png(tmp_path / "img" / "a.png", np.zeros((16, 20, 3), dtype=np.uint8))
    info = _semantic_info(tmp_path, num_classes=300, ignore=65535)
    t = build_dataset(info, tmp_path, "train", "semantic", transform=None)[0].target
    assert torch.equal(t.semantic_map(65535), torch.from_numpy(lab.astype(np.int64)))
    assert t.classes.max() > 255


def test_palette_labels_are_read_as_indices(tmp_path):
    lab = np.random.default_rng(1).integers(0, 4, (12, 12)).astype(np.uint8)
    lab[0, 0] = 65
    im = Image.fromarray(lab, mode="P")
    im.putpalette([200, 10, 10, 10, 200, 10, 10, 10, 200, 90, 90, 90] + [0, 0, 0] * 252)
    (tmp_path / "lab").mkdir()
    im.save(tmp_path / "lab" / "a.png")
    _png(tmp_path / "img" / "a.png", np.zeros((12, 12, 3), dtype=np.uint8))
    info = _semantic_info(tmp_path, num_classes=65, ignore=65)
    t = build_dataset(info, tmp_path, "train", "semantic", transform=None)[0].target
    assert torch.equal(t.semantic_map(65), torch.from_numpy(lab.astype(np.int64)))


def test_label_suffix_and_nested_folders(tmp_path):
    for city in ("aachen", "bonn"):
        _png(tmp_path / "img" / city / f"{city}_0_leftImg8bit.png", np.zeros((8, 16, 3), dtype=np.uint8))
        _png(tmp_path / "lab" / city / f"{city}_0_gtFine_labelTrainIds.png", np.full((8, 16), 3, dtype=np.uint8))
    info = _semantic_info(tmp_path, label_suffix=("_leftImg8bit", "_gtFine_labelTrainIds"))
    ds = build_dataset(info, tmp_path, "train", "semantic", transform=None)
    assert len(ds) == 2 and [s.target.classes.tolist() for s in (ds[0], ds[1])] == [[3], [3]]
    assert ds[1].meta["sem_seg_file"].endswith("bonn/bonn_0_gtFine_labelTrainIds.png")


# --------------------------------------------------------------------------------------------- collate


def _sample(h: int, w: int, value: int) -> Sample:
    lab = torch.full((h, w), 1, dtype=torch.int64)
    lab[0] = 255
    t = Target(classes=torch.tensor([1]), masks=(lab == 1)[None], ignore=lab == 255)
    return Sample(torch.full((3, h, w), value, dtype=torch.uint8), t, {"i": value})


def test_collate_pads_to_divisible_size():
    batch = collate([_sample(40, 50, 7), None, _sample(60, 30, 9)], size_divisibility=32, ignore_label=255)
    assert batch.images.shape == (2, 3, 64, 64) and batch.image_sizes == [(40, 50), (60, 30)]
    assert batch.num_skipped == 1 and [m["i"] for m in batch.metas] == [7, 9]
    from maskformer_cli.models import normalize

    for img, (h, w), value in zip(batch.images, batch.image_sizes, (7, 9), strict=True):
        assert (img[:, :h, :w] == value).all()
        # the reference normalises, then pads with 0: the padding must be exactly 0 after normalisation
        x = normalize(img)
        padding = torch.ones(64, 64, dtype=torch.bool)
        padding[:h, :w] = False
        assert padding.any() and (x[:, padding] == 0).all() and (x[:, ~padding] != 0).all()
    t = batch.targets[0]
    assert t.masks.shape == (1, 64, 64)
    assert t.masks[0, 1:40, :50].all() and t.masks.sum() == 39 * 50
    assert t.ignore[0, :50].all() and t.ignore[40:].all() and t.ignore[:, 50:].all() and not t.ignore[1:40, :50].any()
    expected = torch.full((64, 64), 255)
    expected[1:40, :50] = 1
    assert torch.equal(batch.sem_seg[0], expected)
    assert collate([_sample(33, 10, 1)], size_divisibility=0).images.shape == (1, 3, 33, 10)


def test_collate_of_only_skipped_samples_is_empty():
    batch = collate([None, None])
    assert len(batch) == 0 and batch.num_skipped == 2 and batch.images.shape[0] == 0


def test_an_interrupted_preparation_is_refused_and_a_tree_without_our_stamp_is_used(tmp_path):
    """prepare-data marks the stamp entry 'incomplete' while moving files into place: such a tree is refused
    with the command that repairs it; a tree prepared by detectron2's scripts (no stamp) loads."""
    import json

    from PIL import Image

    from maskformer_cli.data.catalog import get_dataset_info
    from maskformer_cli.data.datasets import build_dataset
    from maskformer_cli.data.staging import STAMP
    from maskformer_cli.errors import UserError

    base = tmp_path / "ADEChallengeData2016"
    (base / "images" / "validation").mkdir(parents=True)
    (base / "annotations_detectron2" / "validation").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(base / "images" / "validation" / "a.jpg")
    Image.new("L", (8, 8)).save(base / "annotations_detectron2" / "validation" / "a.png")
    info = get_dataset_info("ade20k")
    assert len(build_dataset(info, tmp_path, "val", "semantic", None)) == 1  # no stamp: detectron2's layout
    (base / STAMP).write_text(json.dumps({"datasets": {"ade20k": {"status": "incomplete"}}}))
    with pytest.raises(UserError, match=r"interrupted .* run `maskformer prepare-data ade20k --force`"):
        build_dataset(info, tmp_path, "val", "semantic", None)
    (base / STAMP).write_text(json.dumps({"datasets": {"ade20k": {"version": 1, "counts": {"val": 1}}}}))
    assert len(build_dataset(info, tmp_path, "val", "semantic", None)) == 1
