"""`evaluate --predictions` on a custom dataset that has only a `panoptic:` section (no semantic label PNGs):
the semantic ground truth is the category map of the panoptic segments, as in training and `evaluate CKPT`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from panopticapi.utils import id2rgb
from prepare_utils import jpg_bytes, png_bytes
from typer.testing import CliRunner

from maskformer_cli.cli import app
from maskformer_cli.data.catalog import DatasetInfo
from maskformer_cli.errors import UserError
from maskformer_cli.saved_predictions import evaluate_saved_predictions

runner = CliRunner()

H = W = 32
IGNORE = 255
CLASSES = ["sky", "road", "car"]  # contiguous 0, 1, 2
CAT_IDS = {"sky": 7, "road": 3, "car": 12}  # dataset ids: not contiguous, not in class order
# image file names (whose stems name the predictions) differ from the panoptic PNG names on purpose
IMAGES = [(11, "img_a.jpg", "pan_0.png"), (5, "img_b.jpg", "pan_1.png"), (42, "img_c.jpg", "pan_2.png")]


def _w(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _panoptic_image(k: int) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """(segment-id map, segments_info, the category map it stands for, built here independently)."""
    ids = np.zeros((H, W), np.int64)
    cat = np.full((H, W), IGNORE, np.int64)

    def put(sid: int, cls: int, rows: slice, cols: slice) -> None:
        ids[rows, cols] = sid
        cat[rows, cols] = cls

    put(1, 0, slice(0, 10), slice(0, W))  # sky
    put(2, 1, slice(10, H), slice(0, W))  # road
    put(300, 2, slice(13 + k, 21 + k), slice(3, 11))  # a car (id needs the G channel)
    put(70000, 2, slice(14, 22), slice(15 + 2 * k, 23 + 2 * k))  # another car (B channel)
    put(5, 2, slice(25, 30), slice(24, 31))  # a crowd of cars: still class car in the semantic map
    ids[0:4, 0:4], cat[0:4, 0:4] = 0, IGNORE  # void
    ids[30:32, 0:6 + k], cat[30:32, 0:6 + k] = 99, IGNORE  # an id segments_info does not list
    segs = [{"id": 1, "category_id": CAT_IDS["sky"], "iscrowd": 0},
            {"id": 2, "category_id": CAT_IDS["road"], "iscrowd": 0},
            {"id": 300, "category_id": CAT_IDS["car"], "iscrowd": 0},
            {"id": 70000, "category_id": CAT_IDS["car"], "iscrowd": 0},
            {"id": 5, "category_id": CAT_IDS["car"], "iscrowd": 1}]
    return ids, segs, cat


def _prediction(k: int, gt: np.ndarray) -> np.ndarray:
    pred = np.where(gt == IGNORE, k % 3, gt)  # whatever is predicted on ignored pixels must not count
    if k == 1:
        pred = np.roll(pred, 3, axis=0)  # shifted down: partial overlaps everywhere
    elif k == 2:
        pred[13:21, 3:11] = 1  # a car missed (predicted road)
        pred[2:6, 20:28] = 2  # a car where there is sky
    return pred


def _make(tmp_path: Path) -> tuple[Path, Path, list[np.ndarray], list[np.ndarray]]:
    """Panoptic-only spec, the same data as a semantic-label spec, and (gt maps, predictions) by image."""
    anns, gts, preds = [], [], []
    for k, (image_id, image_name, png_name) in enumerate(IMAGES):
        ids, segs, cat = _panoptic_image(k)
        _w(tmp_path / "img" / image_name, jpg_bytes(H, W, seed=k))
        _w(tmp_path / "pngs" / png_name, png_bytes(id2rgb(ids).astype(np.uint8)))
        _w(tmp_path / "sem" / f"{Path(image_name).stem}.png", png_bytes(cat.astype(np.uint8)))
        pred = _prediction(k, cat)
        _w(tmp_path / "preds" / "labels" / f"{Path(image_name).stem}.png", png_bytes(pred.astype(np.uint8)))
        anns.append({"image_id": image_id, "file_name": png_name, "segments_info": segs})
        gts.append(cat)
        preds.append(pred)
    doc = {"images": [{"id": i, "file_name": f, "height": H, "width": W} for i, f, _ in reversed(IMAGES)],
           "annotations": anns,
           "categories": [{"id": CAT_IDS[c], "name": c, "isthing": int(c == "car")} for c in sorted(CAT_IDS)]}
    _w(tmp_path / "pan.json", json.dumps(doc).encode())
    classes = "[" + ", ".join(CLASSES) + "]"
    pan_spec = tmp_path / "pan.yaml"
    pan_spec.write_text(f"name: panonly\nclasses: {classes}\nthing_classes: [car]\n"
                        "panoptic:\n  val: {images: img, json: pan.json, pngs: pngs}\n")
    sem_spec = tmp_path / "sem.yaml"
    sem_spec.write_text(f"name: semcopy\nclasses: {classes}\nthing_classes: [car]\n"
                        "semantic:\n  val: {images: img, labels: sem}\n")
    return pan_spec, sem_spec, gts, preds


def _expected_miou(gts: list[np.ndarray], preds: list[np.ndarray]) -> tuple[float, list[float]]:
    k = len(CLASSES)
    conf = np.zeros((k, k), np.int64)
    for gt, pred in zip(gts, preds, strict=True):
        valid = gt != IGNORE
        conf += np.bincount(gt[valid] * k + pred[valid], minlength=k * k).reshape(k, k)
    tp = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - tp
    iou = tp / union
    return 100 * float(iou[union > 0].mean()), list(100 * iou)


def _expected_pq_stuff(gts: list[np.ndarray], preds: list[np.ndarray]) -> float:
    """panopticapi's rules, every class a stuff segment (one per class per image), IGNORE = void."""
    k = len(CLASSES)
    iou_sum, tp, fp, fn = (np.zeros(k) for _ in range(4))
    for gt, pred in zip(gts, preds, strict=True):
        void = gt == IGNORE
        for c in range(k):
            g, p = (gt == c), (pred == c)
            if not g.any() and not p.any():
                continue
            inter = (g & p).sum()
            union = g.sum() + p.sum() - inter - (p & void).sum()
            if g.any() and p.any() and inter / union > 0.5:
                tp[c] += 1
                iou_sum[c] += inter / union
                continue
            if g.any():
                fn[c] += 1
            if p.any() and (p & void).sum() / p.sum() <= 0.5:
                fp[c] += 1
    seen = tp + fp + fn > 0
    pq = iou_sum[seen] / (tp[seen] + 0.5 * fp[seen] + 0.5 * fn[seen])
    return 100 * float(pq.mean())


def _evaluate(spec: Path, preds: Path, out: Path, metric: str) -> dict:
    res = runner.invoke(app, ["evaluate", "--predictions", str(preds), "--dataset", str(spec),
                              "--metric", metric, "--out", str(out)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("predictions")
    return metrics


@pytest.mark.parametrize("metric", ["miou", "pq-stuff", "all"])
def test_panoptic_only_dataset_scores_label_predictions(tmp_path, metric):
    pan_spec, sem_spec, gts, preds = _make(tmp_path)
    # the fixture is not trivial: one perfect image, two imperfect ones, crowd/void/unlisted ids present
    assert not all((g[g != IGNORE] == p[g != IGNORE]).all() for g, p in zip(gts, preds, strict=True))
    got = _evaluate(pan_spec, tmp_path / "preds", tmp_path / "out_pan", metric)
    assert got["num_images"] == len(IMAGES)
    miou, ious = _expected_miou(gts, preds)
    if metric in ("miou", "all"):
        assert got["mIoU"] == pytest.approx(miou, abs=1e-9)
        for c, iou in enumerate(ious):
            assert got[f"IoU-{c}"] == pytest.approx(iou, abs=1e-9)
        assert 0 < got["mIoU"] < 100
    if metric in ("pq-stuff", "all"):
        assert got["PQ_stuff"] == pytest.approx(_expected_pq_stuff(gts, preds), abs=1e-9)
        assert 0 < got["PQ_stuff"] < 100
    assert ("mIoU" in got) == (metric != "pq-stuff") and ("PQ_stuff" in got) == (metric != "miou")
    # the same predictions against the same ground truth written as label PNGs: the same numbers
    same = _evaluate(sem_spec, tmp_path / "preds", tmp_path / "out_sem", metric)
    assert same == got
    rows = (tmp_path / "out_pan" / "per_class.csv").read_text()
    assert rows == (tmp_path / "out_sem" / "per_class.csv").read_text()


def test_all_with_panoptic_predictions_adds_pq_to_the_semantic_metrics(tmp_path):
    pan_spec, _, gts, preds = _make(tmp_path)
    # panoptic predictions = the ground truth (PQ 100; the unlisted id void, as a prediction must have it),
    # beside the label maps of the other test
    for k, (_, _, png_name) in enumerate(IMAGES):
        ids = _panoptic_image(k)[0]
        ids[ids == 99] = 0
        _w(tmp_path / "preds" / "panoptic" / png_name, png_bytes(id2rgb(ids).astype(np.uint8)))
    shutil.copy(tmp_path / "pan.json", tmp_path / "preds" / "panoptic.json")
    got = _evaluate(pan_spec, tmp_path / "preds", tmp_path / "out", "all")
    assert got["PQ"] == pytest.approx(100.0)
    assert got["mIoU"] == pytest.approx(_expected_miou(gts, preds)[0], abs=1e-9)
    assert got["PQ_stuff"] == pytest.approx(_expected_pq_stuff(gts, preds), abs=1e-9)
    assert "num_images_semantic" not in got  # both halves scored the same three images


def test_missing_prediction_is_named_by_image(tmp_path):
    pan_spec, _, _, _ = _make(tmp_path)
    (tmp_path / "preds" / "labels" / "img_b.png").unlink()
    with pytest.raises(UserError, match=r"1 ground-truth images have no prediction .*img_b\.jpg"):
        evaluate_saved_predictions(tmp_path / "preds", dataset=str(pan_spec), split="val", metric="miou")


def test_prediction_of_another_size_is_refused(tmp_path):
    pan_spec, _, _, _ = _make(tmp_path)
    _w(tmp_path / "preds" / "labels" / "img_c.png", png_bytes(np.zeros((H, W + 1), np.uint8)))
    with pytest.raises(UserError, match=r"img_c\.png: size \(32, 33\) differs from ground truth \(32, 32\)"):
        evaluate_saved_predictions(tmp_path / "preds", dataset=str(pan_spec), split="val", metric="miou")


def test_unknown_split_lists_the_splits_or_none(tmp_path, monkeypatch):
    pan_spec, _, _, _ = _make(tmp_path)
    with pytest.raises(UserError, match=r"has no semantic split 'test' \(has val\)"):
        evaluate_saved_predictions(tmp_path / "preds", dataset=str(pan_spec), split="test", metric="miou")
    bare = DatasetInfo(name="bare", classes=tuple(CLASSES), root=str(tmp_path))
    monkeypatch.setattr("maskformer_cli.data.catalog.get_dataset_info", lambda name, **kw: bare)
    with pytest.raises(UserError, match=r"has no semantic split 'val' \(has none\)"):
        evaluate_saved_predictions(tmp_path / "preds", dataset="bare", split="val", metric="miou")


def test_cityscapes_predictions_find_the_labels_in_the_city_folders(tmp_path, monkeypatch):
    """gtFine/val/<city>/*_gtFine_labelTrainIds.png (beside *_labelIds.png and *_color.png, which are not
    label maps to score) against predict's labels/<image stem>.png."""
    from PIL import Image

    monkeypatch.setenv("MASKFORMER_DATASETS", str(tmp_path / "datasets"))
    gt_dir = tmp_path / "datasets" / "cityscapes" / "gtFine" / "val"
    preds = tmp_path / "preds" / "labels"
    preds.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for city, frame in (("frankfurt", "000000_000294"), ("lindau", "000001_000019")):
        (gt_dir / city).mkdir(parents=True)
        gt = rng.integers(0, 19, (16, 32), dtype=np.uint8)
        Image.fromarray(gt).save(gt_dir / city / f"{city}_{frame}_gtFine_labelTrainIds.png")
        Image.fromarray(gt + 7).save(gt_dir / city / f"{city}_{frame}_gtFine_labelIds.png")  # another encoding
        pred = gt.copy()
        pred[:8] = 0  # half the rows wrong where gt != 0
        Image.fromarray(pred).save(preds / f"{city}_{frame}_leftImg8bit.png")
    res = evaluate_saved_predictions(tmp_path / "preds", dataset="cityscapes", split="val", metric="miou")
    assert res["num_images"] == 2 and 30 < res["pAcc"] < 70
