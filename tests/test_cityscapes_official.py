"""Cityscapes' official scores (class / category IoU and iIoU through cityscapesscripts): the trainId ->
labelId conversion against cityscapesscripts' own label table, the class IoU against our mIoU on the same
predictions, iIoU's instance weighting, and `predict --dataset cityscapes` / `evaluate --metric cityscapes`
end to end on a small Cityscapes-shaped dataset made here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("cityscapesscripts")

from cityscapesscripts.helpers.labels import labels as cs_labels  # noqa: E402

from maskformer_cli.cli import app  # noqa: E402
from maskformer_cli.commands.evaluate import run_evaluate  # noqa: E402
from maskformer_cli.errors import UserError  # noqa: E402
from maskformer_cli.metrics_cityscapes import (  # noqa: E402
    frame_key,
    ground_truth_pairs,
    official_scores,
    to_label_ids,
    train_id_to_label_id,
)

H, W = 64, 128
FRAMES = (("frankfurt", "000000_000294"), ("frankfurt", "000001_000019"), ("lindau", "000000_000019"))
TRAIN_TO_ID = {lab.trainId: lab.id for lab in cs_labels if 0 <= lab.trainId < 255}
ID_TO_TRAIN = np.full(256, 255, np.uint8)
for lab in cs_labels:
    if lab.id >= 0:
        ID_TO_TRAIN[lab.id] = lab.trainId


def scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(labelIds, instanceIds) [H, W]: blocks of stuff labelIds (void ids among them) and a few car and
    person instances of different sizes, instance ids labelId * 1000 + k as in gtFine."""
    stuff = np.array([7, 8, 11, 17, 21, 23, 0, 4])  # road, sidewalk, building, pole, vegetation, sky, void ids
    label = np.repeat(np.repeat(rng.choice(stuff, (4, 8)), H // 4, 0), W // 8, 1).astype(np.uint8)
    inst = label.astype(np.int32).copy()
    for k, (lid, h, w) in enumerate([(26, 20, 40), (26, 4, 6), (24, 12, 5), (24, 3, 3)]):
        y, x = rng.integers(0, H - h), rng.integers(0, W - w)
        label[y:y + h, x:x + w] = lid
        inst[y:y + h, x:x + w] = lid * 1000 + k
    return label, inst


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    """datasets/cityscapes with leftImg8bit + gtFine (labelIds, instanceIds, labelTrainIds) for train and val."""
    root = tmp_path_factory.mktemp("datasets")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for city, frame in FRAMES:
            stem = f"{city}_{frame}"
            label, inst = scene(rng)
            gt = root / "cityscapes" / "gtFine" / split / city
            img = root / "cityscapes" / "leftImg8bit" / split / city
            gt.mkdir(parents=True, exist_ok=True)
            img.mkdir(parents=True, exist_ok=True)
            Image.fromarray(label).save(gt / f"{stem}_gtFine_labelIds.png")
            Image.fromarray(inst.astype(np.uint16)).save(gt / f"{stem}_gtFine_instanceIds.png")  # 16-bit, as gtFine
            Image.fromarray(ID_TO_TRAIN[label]).save(gt / f"{stem}_gtFine_labelTrainIds.png")
            rgb = (np.stack([label * 7, label * 3, label * 11], -1) % 256).astype(np.uint8)
            Image.fromarray(rgb).save(img / f"{stem}_leftImg8bit.png")
    return root


def noisy_predictions(root: Path, out: Path, seed: int = 1) -> dict[str, np.ndarray]:
    """trainId predictions named as predict's labels/<stem>.png: the ground truth with blocks relabelled."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    preds = {}
    for city, frame in FRAMES:
        stem = f"{city}_{frame}"
        gt = np.array(Image.open(root / "cityscapes/gtFine/val" / city / f"{stem}_gtFine_labelTrainIds.png"))
        pred = np.where(gt == 255, rng.integers(0, 19, gt.shape), gt).astype(np.uint8)
        for _ in range(6):
            y, x = rng.integers(0, H - 16), rng.integers(0, W - 16)
            pred[y:y + 16, x:x + 16] = rng.integers(0, 19)
        Image.fromarray(pred).save(out / f"{stem}_leftImg8bit.png")
        preds[stem] = pred
    return preds


def test_train_ids_map_to_the_label_ids_of_cityscapesscripts():
    lut = train_id_to_label_id()
    assert {t: int(lut[t]) for t in range(19)} == TRAIN_TO_ID
    assert lut[255] == 0 and to_label_ids(np.array([[0, 13, 255]])).tolist() == [[7, 26, 0]]


def test_class_iou_equals_our_miou_and_perfect_predictions_score_100(cityscapes, tmp_path, monkeypatch):
    from maskformer_cli.saved_predictions import evaluate_saved_predictions

    monkeypatch.setenv("MASKFORMER_DATASETS", str(cityscapes))
    gt_files = ground_truth_pairs(cityscapes / "cityscapes/gtFine/val")
    assert len(gt_files) == 3
    # perfect: the ground truth's own labelIds (void pixels predicted as anything are not counted)
    perfect = {frame_key(g.name): g for g in gt_files}
    res = official_scores(perfect, gt_files)
    for key in ("IoU_class", "iIoU_class", "IoU_category", "iIoU_category"):
        assert res[key] == pytest.approx(100.0), key
    # noisy: cityscapesscripts' class IoU is our mIoU over trainIds (same confusion counts)
    preds = noisy_predictions(cityscapes, tmp_path / "preds")
    ours = evaluate_saved_predictions(tmp_path / "preds", dataset="cityscapes", split="val", metric="miou")
    label_dir = tmp_path / "labelIds"
    label_dir.mkdir()
    for stem, p in preds.items():
        Image.fromarray(to_label_ids(p)).save(label_dir / f"{stem}_leftImg8bit.png")
    res = official_scores({frame_key(p.name): p for p in label_dir.iterdir()}, gt_files)
    assert 20 < ours["mIoU"] < 95
    assert res["IoU_class"] == pytest.approx(ours["mIoU"], abs=1e-9)
    for key in ("iIoU_class", "IoU_category", "iIoU_category"):
        assert 0 < res[key] < 100 and res[key] != pytest.approx(res["IoU_class"]), key
    assert set(res["per_class_official"]) >= {"car", "person", "road"}


def test_iiou_weights_small_instances_up(cityscapes, tmp_path):
    """Missing the small car of an image costs iIoU far more than IoU (each instance weighs by its class's
    average size over its own size)."""
    gt_file = ground_truth_pairs(cityscapes / "cityscapes/gtFine/val")[:1]
    label = np.array(Image.open(gt_file[0]))
    inst = np.array(Image.open(str(gt_file[0]).replace("labelIds", "instanceIds")))
    pred = label.copy()
    pred[inst == 26 * 1000 + 1] = 7  # the 4x6 car becomes road
    f = tmp_path / "p.png"
    Image.fromarray(pred).save(f)
    res = official_scores({frame_key(gt_file[0].name): f}, gt_file)
    car_iou, car_iiou = res["per_class_official"]["car"]
    assert car_iou > 90 and car_iiou < car_iou - 20


def test_missing_prediction_or_instances_is_one_clear_error(cityscapes, tmp_path):
    gt_files = ground_truth_pairs(cityscapes / "cityscapes/gtFine/val")
    with pytest.raises(UserError, match="3 ground-truth images have no prediction"):
        official_scores({}, gt_files)
    bare = tmp_path / "gt" / "x"
    bare.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(bare / "x_000000_000000_gtFine_labelIds.png")
    with pytest.raises(UserError, match="instanceIds"):
        ground_truth_pairs(tmp_path / "gt")
    wrong_size = tmp_path / "small.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(wrong_size)
    with pytest.raises(UserError, match="cityscapesscripts: .*not equal"):
        official_scores({frame_key(g.name): wrong_size for g in gt_files}, gt_files)


def test_predict_and_evaluate_on_cityscapes_end_to_end(cityscapes, tmp_path):
    """A briefly trained 19-class model: `evaluate CKPT --metric cityscapes` writes labelId PNGs and gives
    the official scores with IoU_class == mIoU; `predict --dataset cityscapes` writes the same labelIds,
    and `evaluate --predictions` of them gives the same scores."""
    import tiny_recipe

    from maskformer_cli.config import load_recipe
    from maskformer_cli.trainer import train

    recipe = load_recipe(None, [*tiny_recipe.TINY, "data.dataset=cityscapes", f"data.root={cityscapes}",
                                "data.crop_size=[64,64]", "data.test_short_side=0", "solver.max_iters=40",
                                "solver.lr=1e-3", "model.num_queries=19"])
    run = train(recipe, run_dir=tmp_path / "run", quiet=True)
    ckpt = run.run_dir / "checkpoints" / "last.pt"
    env = {**os.environ, "MASKFORMER_DATASETS": str(cityscapes)}
    res = run_evaluate(ckpt, dataset=None, split="val", metric="cityscapes", inference=None, tta=False,
                       predictions=None, out=tmp_path / "eval", per_class=False, batch_size=2, limit=None,
                       device="cpu")
    assert res["mIoU"] > 1 and res["IoU_class"] == pytest.approx(res["mIoU"], abs=1e-9)
    written = sorted(p.name for p in (tmp_path / "eval" / "labelIds").iterdir())
    assert written == sorted(f"{c}_{f}_leftImg8bit.png" for c, f in FRAMES)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["iIoU_class"] == pytest.approx(res["iIoU_class"])

    images = cityscapes / "cityscapes" / "leftImg8bit" / "val"
    out = tmp_path / "pred"
    r = CliRunner().invoke(app, ["predict", f"{images}/**/*.png", "--weights", str(ckpt), "--dataset", "cityscapes",
                                 "--out", str(out), "--no-overlays"], env=env)
    assert r.exit_code == 0, r.output
    for name in written:
        assert np.array_equal(np.array(Image.open(out / "labelIds" / name)),
                              np.array(Image.open(tmp_path / "eval" / "labelIds" / name))), name
        trainids = np.array(Image.open(out / "labels" / name))
        assert np.array_equal(np.array(Image.open(out / "labelIds" / name)), to_label_ids(trainids))
    r = CliRunner().invoke(app, ["evaluate", "--predictions", str(out), "--dataset", "cityscapes", "--metric",
                                 "cityscapes", "--out", str(tmp_path / "eval2")], env=env)
    assert r.exit_code == 0, r.output
    again = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    for key in ("mIoU", "IoU_class", "iIoU_class", "IoU_category", "iIoU_category"):
        assert again[key] == pytest.approx(saved[key], abs=1e-9), key


def test_cityscapes_metric_on_another_dataset_is_refused(tmp_path, monkeypatch):
    (tmp_path / "preds").mkdir()
    with pytest.raises(UserError, match="not Cityscapes"):
        run_evaluate(None, dataset="ade20k", split="val", metric="cityscapes", inference=None, tta=False,
                     predictions=tmp_path / "preds", out=tmp_path / "e", per_class=False, batch_size=1, limit=None,
                     device="cpu")
