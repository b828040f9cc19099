"""Prediction overlays: the ground truth is drawn beside the prediction when the dataset has it."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from maskformer_cli.reporting import save_prediction_overlay

CLASSES = ["sky", "road", "car"]
COLORS = [(0, 0, 255), (128, 128, 128), (255, 0, 0)]


def _image(tmp_path, h=32, w=48):
    path = tmp_path / "img.jpg"
    Image.fromarray(np.full((h, w, 3), 200, np.uint8)).save(path)
    return path


def test_semantic_overlay_puts_ground_truth_left_of_prediction(tmp_path):
    img = _image(tmp_path)
    gt = np.zeros((32, 48), np.uint8)  # all sky in the ground truth
    Image.fromarray(gt).save(tmp_path / "gt.png")
    pred = {"sem_seg": torch.full((32, 48), 2)}  # all car predicted
    with_gt, alone = tmp_path / "with_gt.png", tmp_path / "alone.png"
    save_prediction_overlay(pred, {"file_name": str(img), "sem_seg_file": str(tmp_path / "gt.png")},
                            CLASSES, COLORS, with_gt)
    save_prediction_overlay(pred, {"file_name": str(img)}, CLASSES, COLORS, alone)
    w_alone = Image.open(alone).width
    w_both = Image.open(with_gt).width
    assert w_both > 2 * w_alone - 40  # two panels (each with its legend)
    # the blend of grey 200 with blue vs red: the left panel is bluish, the right reddish
    left = np.array(Image.open(with_gt)).astype(int)[40:100, 10:100].reshape(-1, 3).mean(0)
    right = np.array(Image.open(with_gt)).astype(int)[40:100, w_both - w_alone + 10: w_both - w_alone + 100].reshape(-1, 3).mean(0)
    assert left[2] > left[0] + 50
    assert right[0] > right[2] + 50


def test_panoptic_overlay_draws_ground_truth_segments(tmp_path):
    img = _image(tmp_path)
    ids = np.zeros((32, 48), np.int64)
    ids[:, 24:] = 7  # two ground-truth segments: road (id 0 -> category 1) and car (id 7)
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "pan.png")
    meta = {"file_name": str(img), "pan_seg_file": str(tmp_path / "pan.png"),
            "segments_info": [{"id": 0, "category_id": 1}, {"id": 7, "category_id": 2}]}
    pred = {"sem_seg": torch.zeros(32, 48, dtype=torch.long),
            "panoptic": (torch.full((32, 48), 1), [{"id": 1, "category_id": 0}])}
    out = tmp_path / "pan_overlay.png"
    save_prediction_overlay(pred, meta, CLASSES, COLORS, out)
    a = np.array(Image.open(out))
    gt_panel = a[20:200, :380].astype(int).reshape(-1, 3)  # the 48 px image is drawn 8x: 384 px
    # both ground-truth categories' blends appear in the left panel: red-dominant (car) and grey (road)
    assert (gt_panel[:, 0] > gt_panel[:, 2] + 50).any()
    assert ((np.abs(gt_panel[:, 0] - gt_panel[:, 2]) < 10) & (gt_panel[:, 0] < 190)).any()


def test_unreadable_ground_truth_still_draws_the_prediction(tmp_path):
    img = _image(tmp_path)
    (tmp_path / "gt.png").write_bytes(b"not a png")
    out = tmp_path / "o.png"
    save_prediction_overlay({"sem_seg": torch.zeros(32, 48, dtype=torch.long)},
                            {"file_name": str(img), "sem_seg_file": str(tmp_path / "gt.png")}, CLASSES, COLORS, out)
    assert out.exists()
