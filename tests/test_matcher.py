"""Matchers against brute-force searches over assignments with independently computed costs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from maskformer_cli.config import LossConfig
from maskformer_cli.matcher import BoxMatcher, FixedMatcher, HungarianMatcher, build_matcher, match_layers
from maskformer_cli.structures import MaskFormerOutput, Target

K = 6  # classes


def _target(
    m: int, size: tuple[int, int] = (16, 16), seed: int = 0, crowd: list[bool] | None = None
) -> Target:
    g = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, K, (m,), generator=g)
    masks = torch.rand(m, *size, generator=g) > 0.5
    is_crowd = torch.tensor(crowd) if crowd is not None else None
    return Target(classes=classes, masks=masks, is_crowd=is_crowd)


def _outputs(b: int, q: int, h: int = 4, w: int = 4, seed: int = 0, boxes: bool = False) -> MaskFormerOutput:
    g = torch.Generator().manual_seed(100 + seed)
    logits = torch.randn(b, q, K + 1, generator=g) * 2
    masks = torch.randn(b, q, h, w, generator=g) * 2
    pb = torch.rand(b, q, 4, generator=g) * 0.5 + 0.2 if boxes else None
    return MaskFormerOutput(pred_logits=logits, pred_masks=masks, pred_boxes=pb)


def _slow_mask_cost(logits, masks, target: Target, wc=1.0, wf=20.0, wd=1.0) -> np.ndarray:
    """[Q, M] cost by explicit loops in float64; targets downsampled by taking every (H/h)-th pixel."""
    q = logits.shape[0]
    h, w = masks.shape[-2:]
    big_h, big_w = target.masks.shape[-2:]
    sy, sx = big_h // h, big_w // w
    out = np.zeros((q, target.num_segments))
    for i in range(q):
        lg = logits[i].double().tolist()
        z = sum(math.exp(v) for v in lg)
        x = masks[i].double().flatten().tolist()
        for j in range(target.num_segments):
            c = int(target.classes[j])
            t = target.masks[j, ::sy, ::sx].double().flatten().tolist()
            focal, sp, st, spt = 0.0, 0.0, 0.0, 0.0
            for xi, ti in zip(x, t, strict=True):
                p = 1 / (1 + math.exp(-xi))
                focal += -0.25 * (1 - p) ** 2 * math.log(p) if ti else -0.75 * p**2 * math.log(1 - p)
                sp, st, spt = sp + p, st + ti, spt + p * ti
            dice = 1 - (2 * spt + 1) / (sp + st + 1)
            out[i, j] = -wc * math.exp(lg[c]) / z + wf * focal / len(x) + wd * dice
    return out


def _brute_force(cost: np.ndarray) -> float:
    q, m = cost.shape
    if m <= q:
        return min(sum(cost[p[j], j] for j in range(m)) for p in itertools.permutations(range(q), m))
    return min(sum(cost[i, p[i]] for i in range(q)) for p in itertools.permutations(range(m), q))


def _check_valid(rows: torch.Tensor, cols: torch.Tensor, q: int, m: int) -> None:
    assert rows.dtype == torch.int64 and cols.dtype == torch.int64
    assert len(rows) == len(cols) == min(q, m)
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    assert all(0 <= r < q for r in rows.tolist()) and all(0 <= c < m for c in cols.tolist())


def test_cost_matrix_equals_slow_loop():
    out = _outputs(1, 5)
    tgt = _target(3)
    matcher = HungarianMatcher()
    cost = matcher.cost_matrix(out.pred_logits[0], out.pred_masks[0], tgt.classes, tgt.masks)
    ref = _slow_mask_cost(out.pred_logits[0], out.pred_masks[0], tgt)
    assert np.allclose(cost.numpy(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("q,m,seed", [(5, 3, 0), (4, 3, 1), (3, 3, 2), (5, 1, 3), (2, 3, 4)])
def test_hungarian_equals_brute_force(q, m, seed):
    out = _outputs(1, q, seed=seed)
    tgt = _target(m, seed=seed)
    rows, cols = HungarianMatcher()(out, [tgt])[0]
    _check_valid(rows, cols, q, m)
    ref = _slow_mask_cost(out.pred_logits[0], out.pred_masks[0], tgt)
    got = sum(ref[r, c] for r, c in zip(rows.tolist(), cols.tolist(), strict=True))
    assert got == pytest.approx(_brute_force(ref), abs=1e-4)


def test_other_weights_follow_brute_force():
    out = _outputs(1, 4, seed=7)
    tgt = _target(3, seed=7)
    matcher = HungarianMatcher(cost_class=2.0, cost_focal=5.0, cost_dice=3.0)
    rows, cols = matcher(out, [tgt])[0]
    ref = _slow_mask_cost(out.pred_logits[0], out.pred_masks[0], tgt, 2.0, 5.0, 3.0)
    got = sum(ref[r, c] for r, c in zip(rows.tolist(), cols.tolist(), strict=True))
    assert got == pytest.approx(_brute_force(ref), abs=1e-4)


def test_batched_equals_per_image_including_empty_image():
    out = _outputs(3, 5, seed=1)
    targets = [_target(3, seed=1), _target(0, seed=2), _target(2, seed=3)]
    batched = HungarianMatcher()(out, targets)
    for b, tgt in enumerate(targets):
        single = MaskFormerOutput(
            pred_logits=out.pred_logits[b : b + 1], pred_masks=out.pred_masks[b : b + 1]
        )
        (r1, c1), (r2, c2) = batched[b], HungarianMatcher()(single, [tgt])[0]
        assert torch.equal(r1, r2) and torch.equal(c1, c2)
    assert batched[1][0].numel() == 0 and batched[1][1].numel() == 0
    assert batched[1][0].dtype == torch.int64


def test_all_layers_at_once_equal_one_layer_at_a_time():
    """Deep supervision's matching of L layers in one go (one cost product per image, one device-to-host copy)
    gives each layer the assignment of matching it alone: crowd, empty and differently sized targets, NaN."""
    layers = [_outputs(3, 5, seed=s) for s in range(4)]
    layers[2].pred_masks[2, 3] = float("nan")
    targets = [_target(3, seed=1, crowd=[False, True, False]), _target(0, seed=2),
               _target(4, size=(12, 16), seed=3)]
    together = match_layers(HungarianMatcher(), layers, targets)
    assert len(together) == len(layers)
    for layer, indices in zip(layers, together, strict=True):
        for (r1, c1), (r2, c2) in zip(indices, HungarianMatcher()(layer, targets), strict=True):
            assert torch.equal(r1, r2) and torch.equal(c1, c2) and r1.dtype == c1.dtype == torch.int64
    assert together[0][1][0].numel() == 0 and 1 not in together[0][0][1].tolist()
    assert 3 not in together[2][2][0].tolist()  # the NaN query of layer 2, image 2 loses
    # matchers that match one layer at a time leave it to the caller
    assert match_layers(HungarianMatcher(num_points=16), layers, targets) is None
    assert match_layers(FixedMatcher(), layers, targets) is None


def test_targets_of_different_sizes_are_padded_to_the_batch_size():
    out = _outputs(2, 4, seed=5)
    small = _target(2, size=(12, 16), seed=5)
    big = _target(2, size=(16, 16), seed=6)
    batched = HungarianMatcher()(out, [big, small])
    padded = torch.zeros(2, 16, 16, dtype=torch.bool)
    padded[:, :12] = small.masks
    manual = Target(classes=small.classes, masks=padded)
    single = MaskFormerOutput(pred_logits=out.pred_logits[1:], pred_masks=out.pred_masks[1:])
    r, c = HungarianMatcher()(single, [manual])[0]
    assert torch.equal(batched[1][0], r) and torch.equal(batched[1][1], c)


def test_nan_and_inf_do_not_crash_the_matcher():
    out = _outputs(2, 5)
    out.pred_logits[0, 1] = float("nan")
    out.pred_masks[0, 2] = float("nan")
    out.pred_masks[1] = float("inf")
    out.pred_logits[1, 0, 0] = float("-inf")
    targets = [_target(3), _target(2, seed=1)]
    for rows, cols, m in [
        (*ix, t.num_segments) for ix, t in zip(HungarianMatcher()(out, targets), targets, strict=True)
    ]:
        _check_valid(rows, cols, 5, m)
    # the NaN queries lose to healthy ones
    rows0 = HungarianMatcher()(out, targets)[0][0].tolist()
    assert 1 not in rows0 and 2 not in rows0


def test_crowd_segments_are_never_matched():
    out = _outputs(1, 5)
    tgt = _target(4, crowd=[False, True, False, True])
    rows, cols = HungarianMatcher()(out, [tgt])[0]
    assert sorted(cols.tolist()) == [0, 2]
    # same assignment as matching the two non-crowd segments alone
    alone = Target(classes=tgt.classes[[0, 2]], masks=tgt.masks[[0, 2]])
    r2, c2 = HungarianMatcher()(out, [alone])[0]
    assert torch.equal(rows, r2) and cols.tolist() == [[0, 2][i] for i in c2.tolist()]
    all_crowd = _target(2, crowd=[True, True])
    assert HungarianMatcher()(out, [all_crowd])[0][0].numel() == 0


def test_autocast_costs_are_fp32():
    out = _outputs(1, 5, seed=3)
    tgt = _target(3, seed=3)
    low = MaskFormerOutput(pred_logits=out.pred_logits.bfloat16(), pred_masks=out.pred_masks.bfloat16())
    ref = MaskFormerOutput(pred_logits=low.pred_logits.float(), pred_masks=low.pred_masks.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r1, c1 = HungarianMatcher()(low, [tgt])[0]
        cost = HungarianMatcher().cost_matrix(low.pred_logits[0], low.pred_masks[0], tgt.classes, tgt.masks)
    r2, c2 = HungarianMatcher()(ref, [tgt])[0]
    assert cost.dtype == torch.float32
    assert torch.equal(r1, r2) and torch.equal(c1, c2)


def test_matching_runs_without_grad():
    out = _outputs(1, 4)
    out.pred_masks.requires_grad_(True)
    HungarianMatcher()(out, [_target(2)])
    assert out.pred_masks.grad is None


def test_point_sampled_matching_is_valid_and_finds_the_obvious_match():
    # query i predicts exactly target i (large logits): any cost must pick the diagonal
    blocks = torch.zeros(3, 8, 8, dtype=torch.bool)
    blocks[0, :4, :4], blocks[1, 4:, :], blocks[2, :4, 4:] = True, True, True
    tgt = Target(
        classes=torch.tensor([0, 1, 2]), masks=blocks.repeat_interleave(4, 1).repeat_interleave(4, 2)
    )
    logits = torch.full((1, 4, K + 1), -5.0)
    masks = torch.full((1, 4, 8, 8), -10.0)
    for i in range(3):
        logits[0, i, i] = 5.0
    small = torch.nn.functional.interpolate(tgt.masks[None].float(), size=(8, 8), mode="nearest")[0]
    masks[0, :3] = torch.where(small > 0, 10.0, -10.0)
    out = MaskFormerOutput(pred_logits=logits, pred_masks=masks)
    rows, cols = HungarianMatcher(num_points=256)(out, [tgt])[0]
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == [0, 1, 2]


# ----------------------------------------------------------------------------------------------- fixed


def test_fixed_matcher_matches_query_c_to_class_c():
    out = _outputs(2, K)
    t0 = Target(classes=torch.tensor([3, 0, 5]), masks=torch.zeros(3, 8, 8, dtype=torch.bool))
    t1 = Target(classes=torch.zeros(0, dtype=torch.int64), masks=torch.zeros(0, 8, 8, dtype=torch.bool))
    (r0, c0), (r1, c1) = FixedMatcher()(out, [t0, t1])
    assert r0.tolist() == [0, 3, 5] and c0.tolist() == [1, 0, 2]
    assert r1.numel() == 0 and c1.numel() == 0
    crowd = Target(classes=torch.tensor([1, 1]), masks=torch.zeros(2, 8, 8, dtype=torch.bool),
                   is_crowd=torch.tensor([True, False]))  # fmt: skip
    (rc, cc), _ = FixedMatcher()(out, [crowd, t1])
    assert rc.tolist() == [1] and cc.tolist() == [1]


def test_fixed_matcher_errors():
    t = Target(classes=torch.tensor([1]), masks=torch.zeros(1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="one query per class"):
        FixedMatcher()(_outputs(1, K + 1), [t])
    dup = Target(classes=torch.tensor([1, 1]), masks=torch.zeros(2, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="one segment per class"):
        FixedMatcher()(_outputs(1, K), [dup])


# ----------------------------------------------------------------------------------------------- boxes


def _np_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    x0, x1, y0, y1 = xs.min() / w, (xs.max() + 1) / w, ys.min() / h, (ys.max() + 1) / h
    return [x0, y0, x1, y1]


def _slow_box_cost(logits, boxes, target: Target, wc=1.0, wb=5.0, wg=2.0) -> np.ndarray:
    q, m = logits.shape[0], target.num_segments
    out = np.zeros((q, m))
    for i in range(q):
        lg = logits[i].double().tolist()
        prob = [math.exp(v) / sum(math.exp(u) for u in lg) for v in lg]
        cx, cy, w, h = boxes[i].double().tolist()
        pb = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        for j in range(m):
            tb = _np_box(target.masks[j].numpy())
            tc = [(tb[0] + tb[2]) / 2, (tb[1] + tb[3]) / 2, tb[2] - tb[0], tb[3] - tb[1]]
            l1 = abs(cx - tc[0]) + abs(cy - tc[1]) + abs(w - tc[2]) + abs(h - tc[3])
            ix = max(0.0, min(pb[2], tb[2]) - max(pb[0], tb[0]))
            iy = max(0.0, min(pb[3], tb[3]) - max(pb[1], tb[1]))
            inter = ix * iy
            union = (pb[2] - pb[0]) * (pb[3] - pb[1]) + (tb[2] - tb[0]) * (tb[3] - tb[1]) - inter
            hull = (max(pb[2], tb[2]) - min(pb[0], tb[0])) * (max(pb[3], tb[3]) - min(pb[1], tb[1]))
            giou = inter / union - (hull - union) / hull
            out[i, j] = -wc * prob[int(target.classes[j])] + wb * l1 - wg * giou
    return out


@pytest.mark.parametrize("q,m,seed", [(5, 3, 0), (4, 2, 1), (3, 3, 2)])
def test_box_matcher_equals_brute_force(q, m, seed):
    out = _outputs(1, q, seed=seed, boxes=True)
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(m, 16, 16, dtype=torch.bool)
    for j in range(m):  # random rectangles, so boxes differ clearly
        y0, x0 = torch.randint(0, 8, (2,), generator=g).tolist()
        y1, x1 = (
            y0 + torch.randint(2, 8, (1,), generator=g).item(),
            x0 + torch.randint(2, 8, (1,), generator=g).item(),
        )
        masks[j, y0:y1, x0:x1] = True
    tgt = Target(classes=torch.randint(0, K, (m,), generator=g), masks=masks)
    rows, cols = BoxMatcher()(out, [tgt])[0]
    _check_valid(rows, cols, q, m)
    ref = _slow_box_cost(out.pred_logits[0], out.pred_boxes[0], tgt)
    got = sum(ref[r, c] for r, c in zip(rows.tolist(), cols.tolist(), strict=True))
    assert got == pytest.approx(_brute_force(ref), abs=1e-4)


def test_box_matcher_needs_boxes():
    with pytest.raises(ValueError, match="pred_boxes"):
        BoxMatcher()(_outputs(1, 3), [_target(1)])


def test_build_matcher():
    m = build_matcher(LossConfig())
    assert isinstance(m, HungarianMatcher)
    assert (m.cost_class, m.cost_focal, m.cost_dice, m.num_points) == (1.0, 20.0, 1.0, 0)
    assert isinstance(build_matcher(LossConfig(matcher="fixed")), FixedMatcher)
    b = build_matcher(LossConfig(matcher="box", box_l1_weight=4.0))
    assert isinstance(b, BoxMatcher) and b.cost_bbox == 4.0 and b.cost_giou == 2.0
