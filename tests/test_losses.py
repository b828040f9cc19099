"""Mask losses, pairwise costs, box utilities and point sampling against hand values and plain loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from maskformer_cli.losses import (
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    dice_loss,
    generalized_box_iou,
    masks_to_boxes,
    pairwise_dice_cost,
    pairwise_focal_cost,
    point_sample,
    sigmoid_focal_loss,
    uncertain_point_coords,
)

LN3 = math.log(3.0)


def _np_focal(x: np.ndarray, t: np.ndarray, alpha: float = 0.25, gamma: float = 2.0) -> float:
    """Mean focal loss of one mask, pixel by pixel in float64."""
    total = 0.0
    for xi, ti in zip(x.tolist(), t.tolist(), strict=True):
        p = 1.0 / (1.0 + math.exp(-xi))
        if ti == 1:
            total += -alpha * (1 - p) ** gamma * math.log(p)
        else:
            total += -(1 - alpha) * p**gamma * math.log(1 - p)
    return total / len(x)


def _np_dice(x: np.ndarray, t: np.ndarray) -> float:
    p = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
    return 1.0 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)


# ----------------------------------------------------------------------------------------------- hand values


def test_focal_and_dice_on_a_2x2_mask_by_hand():
    # p = sigmoid(x) = [0.5, 0.5, 0.75, 0.25], t = [1, 0, 1, 0]
    x = torch.tensor([[0.0, 0.0, LN3, -LN3]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    # pixels: 0.25*0.25*ln2, 0.75*0.25*ln2, 0.25*(1/16)*ln(4/3), 0.75*(1/16)*ln(4/3); mean over 4
    focal = (math.log(2) / 4 + math.log(4 / 3) / 16) / 4
    assert sigmoid_focal_loss(x, t, 1.0).item() == pytest.approx(focal, rel=1e-12)
    # sum p = 2, sum t = 2, sum pt = 1.25 -> 1 - 3.5 / 5
    assert dice_loss(x, t, 1.0).item() == pytest.approx(0.3, rel=1e-12)


def test_losses_sum_over_masks_and_divide_by_num_masks():
    x = torch.tensor([[0.0, 0.0, LN3, -LN3], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    # second mask: p = 0.5 everywhere, t = 0: focal 0.75*0.25*ln2 per pixel; dice 1 - 1/(2+0+1)
    focal = (math.log(2) / 4 + math.log(4 / 3) / 16) / 4 + 0.75 * 0.25 * math.log(2)
    dice = 0.3 + (1 - 1 / 3)
    assert sigmoid_focal_loss(x, t, 4.0).item() == pytest.approx(focal / 4, rel=1e-12)
    assert dice_loss(x, t, 4.0).item() == pytest.approx(dice / 4, rel=1e-12)


def test_focal_without_alpha_and_other_gamma_matches_a_loop():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 20, generator=g, dtype=torch.float64) * 3
    t = (torch.rand(3, 20, generator=g) > 0.5).double()
    for alpha, gamma in [(-1.0, 2.0), (0.5, 0.0), (0.25, 1.5)]:
        got = sigmoid_focal_loss(x, t, 2.0, alpha=alpha, gamma=gamma).item()
        a = alpha if alpha >= 0 else None
        ref = 0.0
        for xi, ti in zip(x.numpy(), t.numpy(), strict=True):
            if a is None:  # no alpha: both terms weighted 1; emulate with alpha=0.5 times 2
                ref += 2 * _np_focal(xi, ti, 0.5, gamma)
            else:
                ref += _np_focal(xi, ti, a, gamma)
        assert got == pytest.approx(ref / 2.0, rel=1e-9)


def test_extreme_logits_stay_finite():
    x = torch.tensor([[100.0, -100.0, 100.0, -100.0]])
    t = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    assert torch.isfinite(sigmoid_focal_loss(x, t, 1.0))
    assert torch.isfinite(pairwise_focal_cost(x, t)).all()


# ----------------------------------------------------------------------------------------------- pairwise


def test_pairwise_costs_equal_the_per_pair_losses():
    g = torch.Generator().manual_seed(0)
    q, m, p = 5, 3, 64
    x = torch.randn(q, p, generator=g, dtype=torch.float64) * 2
    t = (torch.rand(m, p, generator=g) > 0.6).double()
    t[2] = 0  # an empty target
    focal = pairwise_focal_cost(x, t)
    dice = pairwise_dice_cost(x, t)
    assert focal.shape == dice.shape == (q, m)
    for i in range(q):
        for j in range(m):
            assert focal[i, j].item() == pytest.approx(
                sigmoid_focal_loss(x[i : i + 1], t[j : j + 1], 1.0).item()
            )
            assert dice[i, j].item() == pytest.approx(dice_loss(x[i : i + 1], t[j : j + 1], 1.0).item())
            assert focal[i, j].item() == pytest.approx(_np_focal(x[i].numpy(), t[j].numpy()), rel=1e-9)
            assert dice[i, j].item() == pytest.approx(_np_dice(x[i].numpy(), t[j].numpy()), rel=1e-9)


# ----------------------------------------------------------------------------------------------- boxes


def test_box_conversions_round_trip():
    b = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.2, 0.3, 0.1, 0.4]])
    xyxy = box_cxcywh_to_xyxy(b)
    assert torch.allclose(xyxy, torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.15, 0.1, 0.25, 0.5]]))
    assert torch.allclose(box_xyxy_to_cxcywh(xyxy), b)


def _giou_scalar(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def test_generalized_box_iou_against_scalar_formula():
    g = torch.Generator().manual_seed(3)
    b1 = box_cxcywh_to_xyxy(torch.rand(4, 4, generator=g, dtype=torch.float64) * 0.5 + 0.1)
    b2 = box_cxcywh_to_xyxy(torch.rand(3, 4, generator=g, dtype=torch.float64) * 0.5 + 0.1)
    got = generalized_box_iou(b1, b2)
    for i in range(4):
        for j in range(3):
            assert got[i, j].item() == pytest.approx(_giou_scalar(b1[i].tolist(), b2[j].tolist()), rel=1e-6)
    assert torch.allclose(torch.diag(generalized_box_iou(b1, b1)), torch.ones(4, dtype=torch.float64))
    # far apart boxes: IoU 0, GIoU tends to -1
    far = generalized_box_iou(torch.tensor([[0.0, 0.0, 0.01, 0.01]]), torch.tensor([[0.99, 0.99, 1.0, 1.0]]))
    assert -1.0 <= far.item() < -0.9


def test_generalized_box_iou_of_empty_boxes_is_finite():
    z = torch.zeros(2, 4)
    assert torch.isfinite(generalized_box_iou(z, z)).all()


def test_masks_to_boxes_by_hand_and_against_numpy():
    m = torch.zeros(3, 4, 8, dtype=torch.bool)
    m[0, 1:3, 2:6] = True  # rows 1..2, cols 2..5 -> x 2..6, y 1..3
    m[1] = True
    boxes = masks_to_boxes(m)
    assert torch.allclose(boxes[0], torch.tensor([4 / 8, 2 / 4, 4 / 8, 2 / 4]))
    assert torch.allclose(boxes[1], torch.tensor([0.5, 0.5, 1.0, 1.0]))
    assert torch.equal(boxes[2], torch.zeros(4))  # empty mask
    # normalised by a larger (padded) canvas
    padded = masks_to_boxes(m[:1], size=(8, 16))
    assert torch.allclose(padded[0], torch.tensor([4 / 16, 2 / 8, 4 / 16, 2 / 8]))
    g = torch.Generator().manual_seed(0)
    r = torch.rand(5, 7, 9, generator=g) > 0.8
    for mask, box in zip(r.numpy(), masks_to_boxes(r), strict=True):
        ys, xs = np.nonzero(mask)
        ref = [(xs.min() + xs.max() + 1) / 2 / 9, (ys.min() + ys.max() + 1) / 2 / 7,
               (xs.max() + 1 - xs.min()) / 9, (ys.max() + 1 - ys.min()) / 7]  # fmt: skip
        assert np.allclose(box.numpy(), ref, atol=1e-6)
    assert masks_to_boxes(torch.zeros(0, 4, 4, dtype=torch.bool)).shape == (0, 4)


# ----------------------------------------------------------------------------------------------- points


def test_point_sample_reads_pixel_centres_exactly_and_interpolates_between():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    ii, jj = torch.meshgrid(torch.arange(4), torch.arange(5), indexing="ij")
    coords = torch.stack([(jj.flatten() + 0.5) / 5, (ii.flatten() + 0.5) / 4], dim=-1)
    out = point_sample(x, coords[None].expand(2, -1, -1))
    assert out.shape == (2, 3, 20)
    assert torch.allclose(out, x.flatten(2))
    # halfway between two horizontal neighbours: their mean
    mid = point_sample(x[:1], torch.tensor([[[1.0 / 5, 0.5 / 4]]]))
    assert torch.allclose(mid[0, :, 0], (x[0, :, 0, 0] + x[0, :, 0, 1]) / 2)


def test_uncertain_points_shape_range_and_preference():
    # logits grow with distance from the vertical line x = 0.5: uncertain points lie near it
    xs = torch.linspace(-8, 8, 32)
    logits = xs.abs().expand(32, 32)[None, None].repeat(3, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    pts = uncertain_point_coords(logits, 200, oversample_ratio=3.0, importance_sample_ratio=1.0, generator=g)
    assert pts.shape == (3, 200, 2)
    assert (pts >= 0).all() and (pts <= 1).all()
    uniform = uncertain_point_coords(
        logits, 200, oversample_ratio=3.0, importance_sample_ratio=0.0, generator=g
    )
    d_imp = (pts[..., 0] - 0.5).abs().mean()
    d_uni = (uniform[..., 0] - 0.5).abs().mean()
    assert d_imp < 0.6 * d_uni  # uniform: 0.25 expected; importance: the nearest third, ~0.08
    mixed = uncertain_point_coords(logits, 100, 3.0, 0.75, generator=g)
    assert mixed.shape == (3, 100, 2)
