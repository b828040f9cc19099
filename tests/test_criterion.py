"""SetCriterion and PerPixelCriterion against numpy references with known matchings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskformer_cli.config import ConfigError, load_recipe
from maskformer_cli.criterion import (
    PerPixelCriterion,
    SetCriterion,
    build_criterion,
    count_masks,
    weighted_sum,
)
from maskformer_cli.matcher import BoxMatcher, FixedMatcher, HungarianMatcher
from maskformer_cli.structures import MaskFormerOutput, PerPixelOutput, Target

K = 5


class StubMatcher:
    """Returns a fixed assignment, so the losses can be checked on known pairs."""

    def __init__(self, indices):
        self.indices = [
            (torch.tensor(r, dtype=torch.int64), torch.tensor(c, dtype=torch.int64)) for r, c in indices
        ]

    def __call__(self, outputs, targets):
        return self.indices


class StubBoxMatcher(BoxMatcher):
    def __init__(self, indices):
        super().__init__()
        self.stub = StubMatcher(indices)

    def __call__(self, outputs, targets):
        return self.stub(outputs, targets)


def _np_bilinear(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (align_corners=False), source index clamped at 0."""
    in_h, in_w = x.shape

    def taps(n_out: int, n_in: int):
        res = []
        for o in range(n_out):
            s = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = min(int(math.floor(s)), n_in - 1)
            i1 = min(i0 + 1, n_in - 1)
            res.append((i0, i1, s - i0))
        return res

    out = np.zeros((out_h, out_w))
    for oy, (y0, y1, ly) in enumerate(taps(out_h, in_h)):
        for ox, (x0, x1, lx) in enumerate(taps(out_w, in_w)):
            top = x[y0, x0] * (1 - lx) + x[y0, x1] * lx
            bot = x[y1, x0] * (1 - lx) + x[y1, x1] * lx
            out[oy, ox] = top * (1 - ly) + bot * ly
    return out


def _np_focal_dice(x: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    p = 1 / (1 + np.exp(-x))
    focal = np.where(t > 0, -0.25 * (1 - p) ** 2 * np.log(p), -0.75 * p**2 * np.log(1 - p)).mean()
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    return float(focal), float(dice)


def _target(classes, size=(16, 16), seed=0, crowd=None) -> Target:
    g = torch.Generator().manual_seed(seed)
    m = len(classes)
    masks = torch.zeros(m, *size, dtype=torch.bool)
    for j in range(m):  # blobs: random rectangles
        y0, x0 = (
            torch.randint(0, size[0] // 2, (1,), generator=g).item(),
            torch.randint(0, size[1] // 2, (1,), generator=g).item(),
        )
        masks[j, y0 : y0 + size[0] // 2, x0 : x0 + size[1] // 3] = True
    return Target(
        classes=torch.tensor(classes, dtype=torch.int64),
        masks=masks,
        is_crowd=None if crowd is None else torch.tensor(crowd),
    )


def _outputs(b, q, h=4, w=4, aux=0, boxes=False, seed=0, grad=False) -> MaskFormerOutput:
    g = torch.Generator().manual_seed(seed)

    def one():
        return MaskFormerOutput(
            pred_logits=torch.randn(b, q, K + 1, generator=g).requires_grad_(grad),
            pred_masks=(torch.randn(b, q, h, w, generator=g) * 2).requires_grad_(grad),
            pred_boxes=(torch.rand(b, q, 4, generator=g) * 0.5 + 0.2).requires_grad_(grad) if boxes else None,
        )

    out = one()
    out.aux_outputs = [one() for _ in range(aux)]
    return out


# ----------------------------------------------------------------------------------------------- SetCriterion


def test_ce_with_no_object_weight_against_numpy_and_torch():
    out = _outputs(2, 4)
    targets = [_target([2, 4]), _target([1], seed=1)]
    indices = [([3, 0], [0, 1]), ([2], [0])]
    crit = SetCriterion(K, StubMatcher(indices))
    got = crit(out, targets)["loss_ce"]
    labels = np.full((2, 4), K)
    labels[0, 3], labels[0, 0], labels[1, 2] = 2, 4, 1
    weights = np.ones(K + 1)
    weights[K] = 0.1
    logits = out.pred_logits.double().numpy()
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    w = weights[labels]
    ref = -(w * np.take_along_axis(logp, labels[..., None], -1)[..., 0]).sum() / w.sum()
    assert got.item() == pytest.approx(ref, rel=1e-5)
    torch_ref = F.cross_entropy(
        out.pred_logits.transpose(1, 2),
        torch.from_numpy(labels),
        weight=torch.tensor(weights, dtype=torch.float32),
    )
    assert got.item() == pytest.approx(torch_ref.item(), rel=1e-6)


def test_dense_mask_losses_against_numpy_upsampling_and_losses():
    out = _outputs(2, 3, h=4, w=4)
    targets = [_target([0, 3], size=(16, 16)), _target([2], size=(12, 16), seed=1)]  # padded to 16x16
    indices = [([1, 2], [1, 0]), ([0], [0])]
    losses = SetCriterion(K, StubMatcher(indices))(out, targets)
    focal_sum, dice_sum = 0.0, 0.0
    for b, (rows, cols) in enumerate(indices):
        for r, c in zip(rows, cols, strict=True):
            up = _np_bilinear(out.pred_masks[b, r].double().numpy(), 16, 16)
            t = np.zeros((16, 16))
            m = targets[b].masks[c].numpy()
            t[: m.shape[0], : m.shape[1]] = m
            f, d = _np_focal_dice(up.ravel(), t.ravel())
            focal_sum, dice_sum = focal_sum + f, dice_sum + d
    num_masks = 3.0
    assert losses["loss_focal"].item() == pytest.approx(focal_sum / num_masks, rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(dice_sum / num_masks, rel=1e-5)


def test_deep_supervision_keys_and_weighted_total():
    out = _outputs(2, 6, aux=3)
    targets = [_target([0, 1]), _target([3], seed=2)]
    crit = SetCriterion(K, HungarianMatcher())
    losses = crit(out, targets)
    names = ["loss_ce", "loss_focal", "loss_dice"]
    expected = set(names) | {f"{n}_{i}" for n in names for i in range(3)}
    assert set(losses) == expected
    w = {"loss_ce": 1.0, "loss_focal": 20.0, "loss_dice": 1.0}
    manual = sum(w[k.rsplit("_", 1)[0] if k[-1].isdigit() else k] * v.item() for k, v in losses.items())
    assert crit.weighted_total(losses).item() == pytest.approx(manual, rel=1e-6)
    # each layer gets the same loss as if it were the last one
    alone = crit(out.aux_outputs[1], targets)
    for n in names:
        assert losses[f"{n}_1"].item() == pytest.approx(alone[n].item(), rel=1e-6)


def test_per_pixel_deep_supervision_is_the_same_loss_after_every_layer():
    """PerPixelBaseline+ (reference: PerPixelBaselinePlusHead): loss_ce of the last layer plus loss_ce_i of
    each earlier one, each equal to the loss of that layer alone, all at weight 1."""
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(2, 3, 4, 4, generator=g, requires_grad=True) for _ in range(3)]
    out = PerPixelOutput(layers[-1], aux_outputs=[PerPixelOutput(x) for x in layers[:-1]])
    targets = [_target([0, 2], seed=1), _target([1], seed=2)]
    crit = PerPixelCriterion(3)
    losses = crit(out, targets)
    assert set(losses) == {"loss_ce", "loss_ce_0", "loss_ce_1"}
    for key, x in (("loss_ce", layers[2]), ("loss_ce_0", layers[0]), ("loss_ce_1", layers[1])):
        torch.testing.assert_close(losses[key], crit(PerPixelOutput(x), targets)["loss_ce"])
    crit.weighted_total(losses).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in layers)
    torch.testing.assert_close(crit.weighted_total(losses), sum(losses.values()))


def test_weighted_sum_rejects_an_unweighted_loss():
    with pytest.raises(KeyError, match="loss_mystery"):
        weighted_sum({"loss_ce": torch.tensor(1.0), "loss_mystery_0": torch.tensor(1.0)}, {"loss_ce": 1.0})
    assert (
        weighted_sum({"loss_ce": torch.tensor(2.0), "num_masks": torch.tensor(9.0)}, {"loss_ce": 0.5}) == 1.0
    )


def test_gradient_reaches_every_output():
    out = _outputs(2, 4, aux=2, grad=True, boxes=True)
    targets = [_target([0, 1]), _target([2], seed=1)]
    crit = SetCriterion(K, BoxMatcher())
    losses = crit(out, targets)
    assert {"loss_bbox", "loss_giou", "loss_bbox_1", "loss_giou_1"} <= set(losses)
    crit.weighted_total(losses).backward()
    for o in [out, *out.aux_outputs]:
        for t in (o.pred_logits, o.pred_masks, o.pred_boxes):
            assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_box_losses_against_hand_computation():
    out = _outputs(1, 3, boxes=True)
    masks = torch.zeros(1, 16, 16, dtype=torch.bool)
    masks[0, 4:12, 0:8] = True  # box cxcywh = (0.25, 0.5, 0.5, 0.5)
    tgt = Target(classes=torch.tensor([1]), masks=masks)
    losses = SetCriterion(K, StubBoxMatcher([([2], [0])]))(out, [tgt])
    cx, cy, w, h = out.pred_boxes[0, 2].double().tolist()
    ref_l1 = abs(cx - 0.25) + abs(cy - 0.5) + abs(w - 0.5) + abs(h - 0.5)
    assert losses["loss_bbox"].item() == pytest.approx(ref_l1, rel=1e-5)
    a, b = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], [0.0, 0.25, 0.5, 0.75]
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = w * h + 0.25 - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    assert losses["loss_giou"].item() == pytest.approx(1 - (inter / union - (hull - union) / hull), rel=1e-5)


def test_zero_segment_batch_trains():
    out = _outputs(2, 4, aux=1, grad=True)
    empty = Target(classes=torch.zeros(0, dtype=torch.int64), masks=torch.zeros(0, 16, 16, dtype=torch.bool))
    crit = SetCriterion(K, HungarianMatcher())
    losses = crit(out, [empty, empty])
    assert losses["loss_focal"].item() == 0.0 and losses["loss_dice"].item() == 0.0
    assert losses["loss_focal"].requires_grad and losses["loss_dice"].requires_grad
    # all queries are "no object": plain (weighted, but uniform) CE on class K
    ref = F.cross_entropy(out.pred_logits.detach().reshape(-1, K + 1), torch.full((8,), K))
    assert losses["loss_ce"].item() == pytest.approx(ref.item(), rel=1e-6)
    crit.weighted_total(losses).backward()
    assert out.pred_logits.grad is not None and out.pred_masks.grad is not None
    assert torch.all(out.pred_masks.grad == 0)


def test_one_empty_image_in_a_batch():
    out = _outputs(2, 4, grad=True)
    empty = Target(classes=torch.zeros(0, dtype=torch.int64), masks=torch.zeros(0, 16, 16, dtype=torch.bool))
    crit = SetCriterion(K, HungarianMatcher())
    losses = crit(out, [empty, _target([1, 2])])
    assert all(torch.isfinite(v) for v in losses.values())
    crit.weighted_total(losses).backward()
    assert out.pred_masks.grad[0].abs().sum() == 0 and out.pred_masks.grad[1].abs().sum() > 0


def test_num_masks_counts_non_crowd_segments_and_is_at_least_one():
    targets = [_target([0, 1, 2], crowd=[False, True, False]), _target([3])]
    assert count_masks(targets, torch.device("cpu")) == 3.0
    empty = Target(classes=torch.zeros(0, dtype=torch.int64), masks=torch.zeros(0, 4, 4, dtype=torch.bool))
    assert count_masks([empty], torch.device("cpu")) == 1.0


def test_num_masks_under_an_initialised_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert count_masks([_target([0, 1]), _target([2])], torch.device("cpu")) == 3.0
    finally:
        dist.destroy_process_group()


def test_fixed_matching_criterion_supervises_query_of_each_class():
    out = _outputs(1, K)
    tgt = _target([3, 1])
    losses = SetCriterion(K, FixedMatcher())(out, [tgt])
    labels = torch.full((1, K), K)
    labels[0, 3], labels[0, 1] = 3, 1
    weight = torch.ones(K + 1)
    weight[K] = 0.1
    ref = F.cross_entropy(out.pred_logits.transpose(1, 2), labels, weight=weight)
    assert losses["loss_ce"].item() == pytest.approx(ref.item(), rel=1e-6)


def test_losses_are_fp32_under_autocast():
    out = _outputs(1, 4)
    low = MaskFormerOutput(pred_logits=out.pred_logits.bfloat16(), pred_masks=out.pred_masks.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = SetCriterion(K, HungarianMatcher())(low, [_target([0, 2])])
    assert all(v.dtype == torch.float32 for v in losses.values())


def test_point_sampled_losses_approximate_the_dense_ones():
    torch.manual_seed(0)
    h = 64  # large enough that edge pixels (soft point-sampled labels) are a small share
    out = _outputs(1, 3, h=h // 4, w=h // 4, seed=3)
    targets = [_target([0, 2], size=(h, h), seed=4)]
    indices = [([0, 2], [1, 0])]
    dense = SetCriterion(K, StubMatcher(indices))(out, targets)
    # uniform points (importance 0) give an unbiased estimate of the focal mean; dice is a ratio of means
    sampled = SetCriterion(K, StubMatcher(indices), num_points=8192, importance_sample_ratio=0.0)(
        out, targets
    )
    assert sampled["loss_focal"].item() == pytest.approx(dense["loss_focal"].item(), rel=0.1)
    assert sampled["loss_dice"].item() == pytest.approx(dense["loss_dice"].item(), rel=0.1)
    # importance sampling runs, weights uncertain points more, stays in a sane range
    imp = SetCriterion(K, StubMatcher(indices), num_points=256)(out, targets)
    assert 0 < imp["loss_focal"].item() < 10 * dense["loss_focal"].item() + 1
    assert 0 <= imp["loss_dice"].item() <= 1


def test_point_sampled_hungarian_end_to_end_gets_gradients():
    out = _outputs(2, 4, aux=1, grad=True)
    crit = SetCriterion(K, HungarianMatcher(num_points=64), num_points=64)
    losses = crit(out, [_target([1, 2]), _target([0], seed=3)])
    crit.weighted_total(losses).backward()
    assert out.pred_masks.grad.abs().sum() > 0 and out.aux_outputs[0].pred_masks.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------- per-pixel


def _per_pixel_case():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, K, 4, 4, generator=g)
    t0 = _target([0, 3], size=(16, 16))
    ignore = torch.zeros(16, 16, dtype=torch.bool)
    ignore[:2] = True
    t0.masks[:, :2] = False
    t0.ignore = ignore
    t1 = _target([1], size=(12, 16), seed=1)  # padded rows are ignored
    return logits, [t0, t1]


def _np_labels(targets, ignore=-1):
    labels = np.full((2, 16, 16), ignore)
    for b, t in enumerate(targets):
        for c, m in zip(t.classes.tolist(), t.masks.numpy(), strict=True):
            labels[b, : m.shape[0], : m.shape[1]][m] = c
    return labels


def test_per_pixel_ce_honours_ignore_and_padding():
    logits, targets = _per_pixel_case()
    got = PerPixelCriterion(K, ignore_label=255)(PerPixelOutput(sem_seg_logits=logits), targets)["loss_ce"]
    labels = _np_labels(targets)
    total, count = 0.0, 0
    for b in range(2):
        up = np.stack([_np_bilinear(logits[b, k].double().numpy(), 16, 16) for k in range(K)])
        logp = up - np.log(np.exp(up).sum(0, keepdims=True))
        for y in range(16):
            for x in range(16):
                if labels[b, y, x] >= 0:
                    total -= logp[labels[b, y, x], y, x]
                    count += 1
    assert count < 2 * 256  # the case does contain ignored pixels
    assert got.item() == pytest.approx(total / count, rel=1e-5)


def test_per_pixel_focal_dice_against_loops():
    logits, targets = _per_pixel_case()
    crit = PerPixelCriterion(K, loss="focal_dice")
    losses = crit(PerPixelOutput(sem_seg_logits=logits), targets)
    labels = _np_labels(targets)
    focal, dice, present = 0.0, 0.0, 0
    for b in range(2):
        valid = labels[b] >= 0
        for k in range(K):
            up = _np_bilinear(logits[b, k].double().numpy(), 16, 16)[valid]
            t = (labels[b][valid] == k).astype(np.float64)
            present += int(t.any())
            f, d = _np_focal_dice(up, t)
            focal, dice = focal + f, dice + d
    assert losses["loss_focal"].item() == pytest.approx(focal / present, rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(dice / present, rel=1e-5)
    assert crit.weighted_total(losses).item() == pytest.approx(
        20 * focal / present + dice / present, rel=1e-5
    )


def test_per_pixel_all_ignored_is_finite_and_rejects_a_class_as_ignore():
    logits = torch.randn(1, K, 4, 4, requires_grad=True)
    t = Target(classes=torch.zeros(0, dtype=torch.int64), masks=torch.zeros(0, 16, 16, dtype=torch.bool))
    for loss in ("ce", "focal_dice"):
        crit = PerPixelCriterion(K, loss=loss)
        out = crit(PerPixelOutput(sem_seg_logits=logits), [t])
        assert all(torch.isfinite(v) for v in out.values())
        crit.weighted_total(out).backward()
    with pytest.raises(ValueError):
        PerPixelCriterion(K, ignore_label=2)


# ----------------------------------------------------------------------------------------------- build


def test_build_criterion_from_recipes():
    crit = build_criterion(load_recipe().loss, num_classes=K)
    assert isinstance(crit, SetCriterion) and isinstance(crit.matcher, HungarianMatcher)
    assert crit.weight_dict == {"loss_ce": 1.0, "loss_focal": 20.0, "loss_dice": 1.0}
    assert crit.class_weights[-1].item() == pytest.approx(0.1)
    pp = build_criterion(load_recipe(overrides=["model.meta_architecture=per_pixel_baseline"]).loss, num_classes=K,
                         mask_classification=False)
    assert isinstance(pp, PerPixelCriterion) and pp.loss == "ce"
    fixed_recipe = load_recipe(overrides=["loss.matcher=fixed", f"model.num_queries={K}",
                                          f"data.synthetic_num_classes={K}"])
    fixed = build_criterion(fixed_recipe.loss, K)
    assert isinstance(fixed.matcher, FixedMatcher)
    # the cross-section checks are the recipe's, at load time
    with pytest.raises(ConfigError, match="num_queries equal to the number of classes of synthetic"):
        load_recipe(overrides=["loss.matcher=fixed", f"model.num_queries={K + 1}"])
    with pytest.raises(ConfigError, match="box_head"):
        build_criterion(load_recipe(overrides=["loss.matcher=box"]).loss, K)
    box = build_criterion(load_recipe(overrides=["loss.matcher=box", "model.box_head=true"]).loss, K)
    assert box.use_boxes and box.weight_dict["loss_bbox"] == 5.0 and box.weight_dict["loss_giou"] == 2.0
