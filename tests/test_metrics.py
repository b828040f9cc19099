"""Metrics against independent references: panopticapi's pq_compute on the same files, numpy loops for mIoU."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from panopticapi import evaluation as pq_eval
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image

from maskformer_cli.metrics import SemanticMetrics
from maskformer_cli.metrics_panoptic import PanopticMetrics, PQStuffMetrics

CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 3, "name": "car", "isthing": 1},
    {"id": 7, "name": "bike", "isthing": 1},
    {"id": 10, "name": "sky", "isthing": 0},
    {"id": 15, "name": "road", "isthing": 0},
    {"id": 20, "name": "grass", "isthing": 0},
    {"id": 42, "name": "never-seen-stuff", "isthing": 0},
    {"id": 44, "name": "never-seen-thing", "isthing": 1},
]
THINGS = [1, 3, 7]
STUFF = [10, 15, 20]


# ------------------------------------------------------------------------------------------- fixtures


def _rect(rng, h, w, max_frac=0.6):
    y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
    y1 = min(h, y0 + rng.integers(2, max(3, int(h * max_frac))))
    x1 = min(w, x0 + rng.integers(2, max(3, int(w * max_frac))))
    return slice(y0, y1), slice(x0, x1)


def _new_ids(rng, n, large):
    high = (1 << 24) - 1 if large else 200
    return [int(v) for v in rng.choice(np.arange(1, high), size=n, replace=False)]


def _random_image(rng, large_ids):
    """A random ground truth (stuff, things, crowd, void, an unlisted id, an empty segment) and a
    prediction derived from it (kept, shifted, split, relabelled, missed, spurious, on void / crowd)."""
    h, w = int(rng.integers(24, 48)), int(rng.integers(24, 56))
    gt = np.zeros((h, w), np.int64)
    ids = iter(_new_ids(rng, 64, large_ids))
    gt_segments = []
    for _ in range(int(rng.integers(1, 4))):
        sid = next(ids)
        gt[_rect(rng, h, w, 1.0)] = sid
        gt_segments.append({"id": sid, "category_id": int(rng.choice(STUFF)), "iscrowd": 0})
    for _ in range(int(rng.integers(1, 6))):
        sid = next(ids)
        gt[_rect(rng, h, w, 0.4)] = sid
        gt_segments.append(
            {"id": sid, "category_id": int(rng.choice(THINGS)), "iscrowd": int(rng.random() < 0.25)}
        )
    gt[_rect(rng, h, w, 0.3)] = 0  # void
    if rng.random() < 0.5:  # an id in the map that the segment list does not know
        gt[_rect(rng, h, w, 0.2)] = next(ids)
    if rng.random() < 0.3:  # a listed segment with no pixels
        gt_segments.append({"id": next(ids), "category_id": int(rng.choice(THINGS)), "iscrowd": 0})
    present = set(np.unique(gt).tolist())
    for s in gt_segments:
        s["area"] = int((gt == s["id"]).sum()) if s["id"] in present else 0

    pred = np.zeros((h, w), np.int64)
    pred_cat = {}
    pids = iter(_new_ids(rng, 64, large_ids and rng.random() < 0.5))
    for s in gt_segments:
        mask = gt == s["id"]
        action = rng.choice(["keep", "shift", "split", "relabel", "miss"], p=[0.35, 0.25, 0.1, 0.15, 0.15])
        if action == "miss" or not mask.any():
            continue
        if action == "shift":
            mask = np.roll(mask, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1))
        cat = s["category_id"]
        if action == "relabel":
            cat = int(rng.choice(THINGS + STUFF))
        if action == "split":
            cols = np.nonzero(mask.any(0))[0]
            left = mask.copy()
            left[:, cols[len(cols) // 2] :] = False
            pid = next(pids)
            pred[left] = pid
            pred_cat[pid] = cat
            mask = mask & ~left
        pid = next(pids)
        pred[mask] = pid
        pred_cat[pid] = cat
    for _ in range(int(rng.integers(0, 4))):  # spurious segments, some on void or crowd
        pid = next(pids)
        pred[_rect(rng, h, w, 0.3)] = pid
        pred_cat[pid] = int(rng.choice(THINGS + STUFF))
    pred_segments = [
        {"id": i, "category_id": pred_cat[i]} for i in sorted(set(np.unique(pred).tolist()) - {0})
    ]
    return gt, gt_segments, pred, pred_segments


def _edge_images():
    """Hand-made cases: IoU exactly 0.5 (no match), void left out of the union, two crowd regions of one
    class (panopticapi keeps the last listed), unmatched predictions exactly half on void (a false
    positive) and just over half (ignored)."""
    h, w = 20, 20
    gt = np.zeros((h, w), np.int64)
    gt[:, 10:] = 900  # road, 200 px
    gt[0:10, 0:10] = 11  # person, 100 px
    gt[10:18, 0:8] = 12  # car, 64 px; rows 10-17, cols 8-9 stay void
    gt[18:20, 0:7] = 13  # crowd person, 14 px
    gt[18:20, 7:10] = 14  # another crowd person, 6 px, listed last
    gt_a = [
        {"id": 900, "category_id": 15, "iscrowd": 0},
        {"id": 11, "category_id": 1, "iscrowd": 0},
        {"id": 12, "category_id": 3, "iscrowd": 0},
        {"id": 13, "category_id": 1, "iscrowd": 1},
        {"id": 14, "category_id": 1, "iscrowd": 1},
    ]
    pred = np.zeros((h, w), np.int64)
    pred[0:5, 0:10] = 1  # person: intersection 50, union 100 -> IoU 0.5 -> no match, a false positive
    pred[5:10, 0:10] = 3  # the other half: the same
    pred[10:18, 0:10] = 2  # car + 16 void pixels: the union leaves them out -> IoU 1
    pred[18:20, 0:10] = 4  # person on both crowds: only the last one (6 of 20 px) counts -> a false positive
    pred[:, 10:] = 5  # road, exact
    pred_a = [{"id": i, "category_id": c} for i, c in [(1, 1), (2, 3), (3, 1), (4, 1), (5, 15)]]

    gt_b = np.zeros((h, w), np.int64)
    gt_b[0:10, :] = 7  # sky; rows 10-19, cols 10-19 are void
    gt_b[10:20, 0:10] = 8  # person, 100 px
    seg_b = [{"id": 7, "category_id": 10, "iscrowd": 0}, {"id": 8, "category_id": 1, "iscrowd": 0}]
    pred_b = np.zeros((h, w), np.int64)
    pred_b[10:20, 1:10] = 20  # person, 90 of 100 px -> match
    pred_b[0:2, 0:10] = 24  # road on sky -> a false positive; the sky is missed
    pred_b[9, 10:20] = 25  # bike: 10 px sky ...
    pred_b[10, 10:20] = 25  # ... + 10 px void: exactly half -> still a false positive
    pred_b[8, 10:19] = 26  # car: 9 px sky ...
    pred_b[11, 10:20] = 26  # ... + 10 px void: just over half -> ignored
    pred_b[12:14, 10:20] = 22  # car, all void -> ignored
    pred_sb = [{"id": i, "category_id": c} for i, c in [(20, 1), (22, 3), (24, 15), (25, 7), (26, 3)]]
    for segs, m in ((gt_a, gt), (seg_b, gt_b)):
        for s in segs:
            s["area"] = int((m == s["id"]).sum())
    return [(gt, gt_a, pred, pred_a), (gt_b, seg_b, pred_b, pred_sb)]


def _empty_prediction_image(rng):
    gt, gt_segments, _, _ = _random_image(rng, large_ids=False)
    return gt, gt_segments, np.zeros_like(gt), []


def _void_ground_truth_image():
    """No ground-truth segment at all (an all-void / all-ignore image) while the prediction has segments
    (this crashed PQ with an IndexError): every predicted pixel is on void, so panopticapi ignores them all."""
    h, w = 12, 12
    gt = np.zeros((h, w), np.int64)
    pred = np.zeros((h, w), np.int64)
    pred[:6] = 3
    pred[6:, :4] = 4
    return gt, [], pred, [{"id": 3, "category_id": 1}, {"id": 4, "category_id": 15}]


def _write_coco_panoptic(root, images, categories):
    """Write gt and pred as COCO panoptic JSON + PNG folders; returns the four paths."""
    gt_dir, pred_dir = root / "gt", root / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    gt_anns, pred_anns, infos = [], [], []
    for i, (gt, gt_segments, pred, pred_segments) in enumerate(images):
        name = f"{i:04d}.png"
        Image.fromarray(id2rgb(gt)).save(gt_dir / name)
        Image.fromarray(id2rgb(pred)).save(pred_dir / name)
        infos.append(
            {"id": i, "file_name": name.replace(".png", ".jpg"), "height": gt.shape[0], "width": gt.shape[1]}
        )
        gt_anns.append({"image_id": i, "file_name": name, "segments_info": gt_segments})
        pred_anns.append({"image_id": i, "file_name": name, "segments_info": pred_segments})
    gt_json, pred_json = root / "gt.json", root / "pred.json"
    gt_json.write_text(json.dumps({"images": infos, "annotations": gt_anns, "categories": categories}))
    pred_json.write_text(json.dumps({"annotations": pred_anns}))
    return gt_json, pred_json, gt_dir, pred_dir


def _panopticapi_single_core(gt_json, pred_json, gt_dir, pred_dir):
    """panopticapi's own per-image code on the written files, in this process (pq_compute would fork)."""
    gt = json.loads(gt_json.read_text())
    pred = {a["image_id"]: a for a in json.loads(pred_json.read_text())["annotations"]}
    categories = {c["id"]: c for c in gt["categories"]}
    pairs = [(a, pred[a["image_id"]]) for a in gt["annotations"]]
    stat = pq_eval.pq_compute_single_core(0, pairs, str(gt_dir), str(pred_dir), categories)
    results = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        try:
            results[name], per_class = stat.pq_average(categories, isthing=isthing)
        except ZeroDivisionError:  # no class of this group present: panopticapi divides by n = 0
            continue
        if name == "All":
            results["per_class"] = per_class
    return stat, results


def _ours_from_files(metric, gt_json, pred_json, gt_dir, pred_dir):
    gt = json.loads(gt_json.read_text())
    pred = {a["image_id"]: a for a in json.loads(pred_json.read_text())["annotations"]}
    for ann in gt["annotations"]:
        p = pred[ann["image_id"]]
        gt_map = rgb2id(np.array(Image.open(gt_dir / ann["file_name"]), dtype=np.uint8))
        pred_map = rgb2id(np.array(Image.open(pred_dir / p["file_name"]), dtype=np.uint8))
        metric.update(
            torch.from_numpy(pred_map), p["segments_info"], torch.from_numpy(gt_map), ann["segments_info"]
        )
    return metric


def _assert_same_as_panopticapi(ours, stat, theirs, categories, groups):
    for group in groups:
        suffix = {"All": "", "Things": "_th", "Stuff": "_st"}[group]
        assert ours[f"n{suffix}"] == theirs[group]["n"]
        for m in ("pq", "sq", "rq"):
            assert ours[f"{m.upper()}{suffix}"] / 100 == pytest.approx(theirs[group][m], abs=1e-9, rel=0), (
                group,
                m,
            )
    for entry, cat in zip(ours["per_class"], categories, strict=True):
        s = stat.pq_per_cat[cat["id"]]
        assert (entry["TP"], entry["FP"], entry["FN"]) == (s.tp, s.fp, s.fn), cat
        if s.tp + s.fp + s.fn == 0:
            assert math.isnan(entry["PQ"])
            continue
        ref = theirs["per_class"][cat["id"]]
        for m in ("pq", "sq", "rq"):
            assert entry[m.upper()] / 100 == pytest.approx(ref[m], abs=1e-12, rel=0), (cat, m)


# ------------------------------------------------------------------------------------------------- PQ


@pytest.fixture
def panoptic_files(tmp_path):
    rng = np.random.default_rng(0)
    images = [_random_image(rng, large_ids=i % 2 == 0) for i in range(10)]
    images += _edge_images() + [_empty_prediction_image(rng), _void_ground_truth_image()]
    return _write_coco_panoptic(tmp_path, images, CATEGORIES)


def test_pq_equals_panopticapi_on_the_same_files(panoptic_files, capsys):
    stat, theirs = _panopticapi_single_core(*panoptic_files)
    ours = _ours_from_files(PanopticMetrics(CATEGORIES), *panoptic_files).compute()
    _assert_same_as_panopticapi(ours, stat, theirs, CATEGORIES, ["All", "Things", "Stuff"])
    # The fixture exercises what it claims to: matches, misses, false positives, ignored predictions.
    totals = {k: sum(e[k] for e in ours["per_class"]) for k in ("TP", "FP", "FN")}
    assert min(totals.values()) >= 5
    assert math.isnan(ours["per_class"][-1]["PQ"]) and math.isnan(ours["per_class"][-2]["PQ"])


def test_pq_stuff_on_an_all_ignore_image():
    """PQ-stuff of an image whose ground truth is all ignore label: the predictions are on void, ignored."""
    m = PQStuffMetrics(3, ignore_label=255)
    m.update(torch.tensor([[0, 1], [2, 2]]), torch.full((2, 2), 255))
    m.update(torch.tensor([[0, 0], [1, 1]]), torch.tensor([[0, 0], [1, 255]]))
    out = m.compute()
    assert [(r["TP_stuff"], r["FP_stuff"], r["FN_stuff"]) for r in out["per_class"]] == [(1, 0, 0), (1, 0, 0), (0, 0, 0)]


def test_pq_edge_cases_by_hand(tmp_path, capsys):
    images = _edge_images()
    counts = []
    for gt, gt_segments, pred, pred_segments in images:
        m = PanopticMetrics(CATEGORIES)
        m.update(torch.from_numpy(pred), pred_segments, torch.from_numpy(gt), gt_segments)
        counts.append({e["id"]: (e["TP"], e["FP"], e["FN"]) for e in m.compute()["per_class"]})
        if len(counts) == 1:
            per = {e["id"]: e for e in m.compute()["per_class"]}
            assert per[3]["SQ"] == 100.0 and per[15]["SQ"] == 100.0
    assert (counts[0][1], counts[0][3], counts[0][15]) == ((0, 3, 1), (1, 0, 0), (1, 0, 0))
    assert (counts[1][1], counts[1][3], counts[1][7], counts[1][10], counts[1][15]) == (
        (1, 0, 0),
        (0, 0, 0),
        (0, 1, 0),
        (0, 0, 1),
        (0, 1, 0),
    )
    stat, theirs = _panopticapi_single_core(*_write_coco_panoptic(tmp_path, images, CATEGORIES))
    both = PanopticMetrics(CATEGORIES)
    for gt, gs, pred, ps in images:
        both.update(torch.from_numpy(pred), ps, torch.from_numpy(gt), gs)
    _assert_same_as_panopticapi(both.compute(), stat, theirs, CATEGORIES, ["All"])


def test_pq_full_pq_compute_with_its_process_pool(panoptic_files, monkeypatch, capsys):
    monkeypatch.setattr(pq_eval.multiprocessing, "cpu_count", lambda: 2)
    theirs = pq_eval.pq_compute(*(str(p) for p in panoptic_files))
    ours = _ours_from_files(PanopticMetrics(CATEGORIES), *panoptic_files).compute()
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for m in ("pq", "sq", "rq"):
            assert ours[f"{m.upper()}{suffix}"] / 100 == pytest.approx(theirs[group][m], abs=1e-9, rel=0)


def test_pq_merge_and_state_equal_one_pass(panoptic_files):
    one = _ours_from_files(PanopticMetrics(CATEGORIES), *panoptic_files)
    gt = json.loads(panoptic_files[0].read_text())
    a, b = PanopticMetrics(CATEGORIES), PanopticMetrics(CATEGORIES)
    pred = {x["image_id"]: x for x in json.loads(panoptic_files[1].read_text())["annotations"]}
    for i, ann in enumerate(gt["annotations"]):
        gt_map = rgb2id(np.array(Image.open(panoptic_files[2] / ann["file_name"]), dtype=np.uint8))
        pred_map = rgb2id(np.array(Image.open(panoptic_files[3] / ann["file_name"]), dtype=np.uint8))
        (a if i % 3 else b).update(
            torch.from_numpy(pred_map),
            pred[ann["image_id"]]["segments_info"],
            torch.from_numpy(gt_map),
            ann["segments_info"],
        )
    reduced = a.state() + b.state()  # what all_reduce(SUM) does across two ranks
    a.merge(b)
    c = PanopticMetrics(CATEGORIES)
    c.load_state(reduced)
    ref = one.compute()
    for m in (a, c):
        res = m.compute()
        for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
            assert res[key] == pytest.approx(ref[key], abs=1e-12)
    assert torch.equal(a.state()[1:], one.state()[1:])  # counts: exactly equal


def test_pq_contiguous_ids_and_bad_input():
    m = PanopticMetrics(thing_ids=[1], num_classes=2)
    gt = torch.tensor([[5, 5], [6, 0]])
    pred = torch.tensor([[1, 1], [2, 2]], dtype=torch.int32)
    m.update(
        pred,
        [{"id": 1, "category_id": 0}, {"id": 2, "category_id": 1}],
        gt,
        [{"id": 5, "category_id": 0}, {"id": 6, "category_id": 1}],
    )
    res = m.compute()
    # Segment 2 covers gt segment 6 (1 px) and one void pixel: the union leaves the void out -> IoU 1.
    assert res["PQ"] == 100.0 and res["n_th"] == 1 and res["n_st"] == 1
    with pytest.raises(ValueError, match="not in pred_segments"):
        m.update(pred, [{"id": 1, "category_id": 0}], gt, [])
    with pytest.raises(ValueError, match="absent"):
        m.update(
            pred,
            [{"id": 1, "category_id": 0}, {"id": 2, "category_id": 1}, {"id": 3, "category_id": 1}],
            gt,
            [],
        )
    with pytest.raises(ValueError, match="unknown category"):
        m.update(pred, [{"id": 1, "category_id": 0}, {"id": 2, "category_id": 9}], gt, [])


# ------------------------------------------------------------------------------------------- PQ-stuff


def test_pq_stuff_equals_panopticapi_on_converted_files(tmp_path, capsys):
    k, ignore = 6, 255  # class 5 never appears
    rng = np.random.default_rng(1)
    ours = PQStuffMetrics(k, ignore)
    images = []
    for _ in range(8):
        h, w = int(rng.integers(16, 40)), int(rng.integers(16, 40))
        gt = np.full((h, w), int(rng.integers(0, 5)), np.int64)
        for _ in range(4):
            gt[_rect(rng, h, w)] = int(rng.integers(0, 5))
        gt[_rect(rng, h, w, 0.3)] = ignore
        pred = np.where(rng.random((h, w)) < 0.15, rng.integers(0, 5, (h, w)), gt)
        pred[gt == ignore] = rng.integers(0, 5)
        pred = np.roll(pred, int(rng.integers(-4, 5)), axis=1)
        pred[_rect(rng, h, w, 0.2)] = ignore  # predicted void (e.g. general inference kept nothing)
        ours.update(torch.from_numpy(pred), torch.from_numpy(gt))

        # The reference gets an independent panoptic encoding: arbitrary segment and category ids.
        def to_pan(sem, salt):
            pan = np.zeros_like(sem)
            segs = []
            for c in np.unique(sem):
                if c == ignore:
                    continue
                pan[sem == c] = int(c) * 37 + salt
                segs.append(
                    {
                        "id": int(c) * 37 + salt,
                        "category_id": 100 + int(c),
                        "iscrowd": 0,
                        "area": int((sem == c).sum()),
                    }
                )
            return pan, segs

        g, gs = to_pan(gt, 11)
        p, ps = to_pan(pred, 5)
        images.append((g, gs, p, [{"id": s["id"], "category_id": s["category_id"]} for s in ps]))
    cats = [{"id": 100 + c, "name": str(c), "isthing": 0} for c in range(k)]
    stat, theirs = _panopticapi_single_core(*_write_coco_panoptic(tmp_path, images, cats))
    res = ours.compute()
    assert res["n_stuff"] == theirs["Stuff"]["n"] == 5
    for m in ("pq", "sq", "rq"):
        assert res[f"{m.upper()}_stuff"] / 100 == pytest.approx(theirs["All"][m], abs=1e-9, rel=0)
    for entry, cat in zip(res["per_class"], cats, strict=True):
        s = stat.pq_per_cat[cat["id"]]
        assert (entry["TP_stuff"], entry["FP_stuff"], entry["FN_stuff"]) == (s.tp, s.fp, s.fn)
    assert 0 < res["PQ_stuff"] < 100


# ----------------------------------------------------------------------------------------------- mIoU


def _numpy_reference(preds, gts, k, ignore, count_pred_only=True):
    """Per-class boolean-mask counts, no confusion matrix; means as detectron2 (<= v0.6 or later)."""
    tp, gt_n, pred_n = np.zeros(k), np.zeros(k), np.zeros(k)
    for pred, gt in zip(preds, gts, strict=True):
        valid = gt != ignore
        for c in range(k):
            tp[c] += np.sum((gt == c) & (pred == c))
            gt_n[c] += np.sum(gt == c)
            pred_n[c] += np.sum((pred == c) & valid)
    union = gt_n + pred_n - tp
    acc_valid = gt_n > 0
    iou_valid = union > 0 if count_pred_only else acc_valid
    iou = [tp[c] / union[c] for c in range(k) if iou_valid[c]]
    acc = [tp[c] / gt_n[c] for c in range(k) if acc_valid[c]]
    fw = sum(tp[c] / union[c] * gt_n[c] / gt_n.sum() for c in range(k) if acc_valid[c])
    return {
        "mIoU": 100 * np.mean(iou),
        "mAcc": 100 * np.mean(acc),
        "fwIoU": 100 * fw,
        "pAcc": 100 * tp.sum() / gt_n.sum(),
    }


def _detectron2_v05_reference(preds, gts, k, ignore):
    """detectron2 <= 0.6 SemSegEvaluator arithmetic, written out with numpy (predictions in 0..K-1)."""
    conf = np.zeros((k + 1, k + 1), np.int64)
    for pred, gt in zip(preds, gts, strict=True):
        gt = gt.copy()
        gt[gt == ignore] = k
        conf += np.bincount((k + 1) * pred.reshape(-1) + gt.reshape(-1), minlength=conf.size).reshape(
            conf.shape
        )
    tp = conf.diagonal()[:-1].astype(float)
    pos_gt = conf[:-1, :-1].sum(0).astype(float)
    pos_pred = conf[:-1, :-1].sum(1).astype(float)
    acc_valid = pos_gt > 0
    iou_valid = (pos_gt + pos_pred) > 0
    iou = np.full(k, np.nan)
    iou[acc_valid] = tp[acc_valid] / (pos_gt + pos_pred - tp)[acc_valid]
    return {"mIoU": 100 * np.sum(iou[acc_valid]) / np.sum(iou_valid), "pAcc": 100 * tp.sum() / pos_gt.sum()}


def _semantic_samples(k, ignore, n=5, void_preds=False, seed=0):
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for _ in range(n):
        h, w = int(rng.integers(8, 30)), int(rng.integers(8, 30))
        gt = rng.integers(0, k - 2, (h, w))  # the last two classes never appear in the ground truth
        gt[rng.random((h, w)) < 0.1] = ignore
        pred = np.where(rng.random((h, w)) < 0.6, gt, rng.integers(0, k - 1, (h, w)))  # class k-2 pred-only
        pred[gt == ignore] = rng.integers(0, k - 1, int((gt == ignore).sum()))
        if void_preds:
            pred[rng.random((h, w)) < 0.1] = ignore
        preds.append(pred)
        gts.append(gt)
    return preds, gts


@pytest.mark.parametrize("count_pred_only", [True, False])
def test_miou_equals_numpy_reference(count_pred_only):
    k, ignore = 7, 255
    preds, gts = _semantic_samples(k, ignore)
    m = SemanticMetrics(k, ignore, count_pred_only_classes=count_pred_only)
    for pred, gt in zip(preds, gts, strict=True):
        m.update(torch.from_numpy(pred), torch.from_numpy(gt).to(torch.uint8))
    res = m.compute()
    ref = _numpy_reference(preds, gts, k, ignore, count_pred_only)
    for key in ("mIoU", "mAcc", "fwIoU", "pAcc"):
        assert res[key] == pytest.approx(ref[key], abs=1e-9)
    if count_pred_only:
        d2 = _detectron2_v05_reference(preds, gts, k, ignore)
        assert res["mIoU"] == pytest.approx(d2["mIoU"], abs=1e-9) and res["pAcc"] == pytest.approx(d2["pAcc"])
        assert res["IoU-5"] == 0.0  # predicted, never in the ground truth
    else:
        assert math.isnan(res["IoU-5"])
    assert math.isnan(res["IoU-6"]) and math.isnan(res["Acc-6"]) and math.isnan(res["Acc-5"])


def test_miou_void_predictions_count_as_misses():
    k, ignore = 5, 255
    preds, gts = _semantic_samples(k, ignore, void_preds=True, seed=3)
    m = SemanticMetrics(k, ignore, class_names=[f"c{i}" for i in range(k)])
    for pred, gt in zip(preds, gts, strict=True):
        m.update(torch.from_numpy(pred), torch.from_numpy(gt))
    res, ref = m.compute(), _numpy_reference(preds, gts, k, ignore)
    for key in ("mIoU", "mAcc", "fwIoU", "pAcc"):
        assert res[key] == pytest.approx(ref[key], abs=1e-9)
    assert "IoU-c0" in res and res["per_class"][0]["name"] == "c0"


def test_miou_merge_and_all_reduce_state_equal_one_pass():
    k, ignore = 6, 255
    preds, gts = _semantic_samples(k, ignore, n=6, seed=5)
    one, a, b = (SemanticMetrics(k, ignore) for _ in range(3))
    for i, (pred, gt) in enumerate(zip(preds, gts, strict=True)):
        one.update(torch.from_numpy(pred), torch.from_numpy(gt))
        (a if i < 3 else b).update(torch.from_numpy(pred), torch.from_numpy(gt))
    summed = a.state() + b.state()
    a.merge(b)
    c = SemanticMetrics(k, ignore)
    c.load_state(summed)
    assert torch.equal(a.state(), one.state()) and torch.equal(c.state(), one.state())
    assert a.compute()["mIoU"] == one.compute()["mIoU"]


def test_miou_rejects_bad_labels():
    m = SemanticMetrics(3, 255)
    with pytest.raises(ValueError, match="outside"):
        m.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 7))
    with pytest.raises(ValueError, match="shape"):
        m.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    gt = torch.full((2, 2), 255)
    gt[0, 0] = 7  # an invalid label hidden next to the ignore label
    with pytest.raises(ValueError, match="outside"):
        m.update(torch.zeros(2, 2, dtype=torch.long), gt)
    assert m.state().sum() == 0
    assert math.isnan(SemanticMetrics(3).compute()["mIoU"])


@pytest.mark.parametrize("ignore", [-1, 65535])
def test_miou_other_ignore_labels_and_negative_predictions(ignore):
    k = 5
    preds, gts = _semantic_samples(k, 255, void_preds=True, seed=7)
    a, b = SemanticMetrics(k, 255), SemanticMetrics(k, ignore)
    for pred, gt in zip(preds, gts, strict=True):
        a.update(torch.from_numpy(pred), torch.from_numpy(gt))
        b.update(
            torch.from_numpy(np.where(pred == 255, -3, pred)),
            torch.from_numpy(np.where(gt == 255, ignore, gt)),
        )
    assert torch.equal(a.state(), b.state())
    with pytest.raises(ValueError, match="outside"):
        b.update(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[ignore, 6], [0, 1]]))


@pytest.mark.parametrize("id_range", [1 << 10, 1 << 24, 1 << 30, 1 << 40])
@pytest.mark.parametrize("with_unknown", [False, True])
def test_segment_id_compaction_equals_dict_lookup(id_range, with_unknown):
    """Every lookup path (dense table, packed hash, two-table hash, sorted search) against a dict."""
    from maskformer_cli.metrics_panoptic import _compact_ids

    rng = np.random.default_rng(id_range % 1000 + with_unknown)
    ids = [int(v) for v in rng.choice(np.arange(1, id_range, max(1, id_range // 10**6)), 12, replace=False)]
    known, unknown = ids[:9], ids[9:]
    pool = np.array([0, *known, *(unknown if with_unknown else [])], dtype=np.int64)
    id_map = pool[rng.integers(0, len(pool), (17, 23))]
    out = _compact_ids(torch.from_numpy(id_map), known)
    code = {0: 0, **{sid: i + 1 for i, sid in enumerate(known)}}
    ref = [code.get(int(v), len(known) + 1) for v in id_map.reshape(-1)]
    assert out.dtype == torch.int32 and out.tolist() == ref
    assert (out == len(known) + 1).any() == with_unknown


def test_pq_only_per_class_rows_carry_class_names():
    """`evaluate --metric pq --per-class` names classes, as `--metric all` does (rows keyed by id, not class)."""
    import torch

    from maskformer_cli.engine import Evaluator

    ev = Evaluator(("pq",), num_classes=2, thing_ids=(1,), class_names=["sky", "car"])
    ids = torch.tensor([[1, 1], [2, 2]])
    segs = [{"id": 1, "category_id": 0}, {"id": 2, "category_id": 1}]
    ev.update_panoptic(ids, segs, ids, segs)
    rows = ev.compute()["per_class"]
    assert [r["name"] for r in rows] == ["sky", "car"] and [r["PQ"] for r in rows] == [100.0, 100.0]
