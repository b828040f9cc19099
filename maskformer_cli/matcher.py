"""Assignments between the N predicted segments and the ground-truth segments (paper Sec. 3.2).

Every matcher maps (MaskFormerOutput, list[Target]) to one (pred_idx, tgt_idx) pair of int64 CPU tensors
per image: prediction pred_idx[k] is matched to target segment tgt_idx[k] (an index into that Target's
segments); unmatched predictions are "no object".

- HungarianMatcher: bipartite matching on -p_i(c_j) + lambda_focal * focal + lambda_dice * dice (the paper).
- FixedMatcher: N = K, prediction i <-> class i (MaskFormer-fixed, Table 4).
- BoxMatcher: DETR's box cost on an added box head (Table 5).

Crowd segments (Target.is_crowd) are never matched. Targets of different sizes are zero-padded at the
bottom/right to the largest size in the batch, the frame the batched image tensor and so the predicted
masks live in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from maskformer_cli.config import LossConfig
from maskformer_cli.losses import (
    box_cxcywh_to_xyxy,
    generalized_box_iou,
    masks_to_boxes,
    pairwise_dice_cost,
    pairwise_focal_cost,
    point_sample,
)
from maskformer_cli.structures import MaskFormerOutput, Target

Indices = list[tuple[torch.Tensor, torch.Tensor]]

# Replaces NaN/inf in a cost matrix: scipy refuses non-finite entries, and a diverged prediction should
# lose every comparison rather than stop training.
_BAD_COST = 1e8


def common_size(targets: Sequence[Target]) -> tuple[int, int]:
    """(H, W): the largest target size in the batch, what every target is padded to."""
    if not targets:
        raise ValueError("empty batch of targets")
    return max(int(t.masks.shape[-2]) for t in targets), max(int(t.masks.shape[-1]) for t in targets)


def pad_masks(masks: torch.Tensor, size: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[M, H, W] -> [M, size[0], size[1]] in `dtype`, zero-padded at the bottom and right."""
    h, w = masks.shape[-2:]
    out = masks.to(dtype)
    if (h, w) != tuple(size):
        out = F.pad(out, (0, size[1] - w, 0, size[0] - h))
    return out


def matchable(target: Target) -> torch.Tensor:
    """[M'] int64 indices of the segments that take part in matching (all but crowd regions)."""
    m = target.num_segments
    if target.is_crowd is None:
        return torch.arange(m, dtype=torch.int64)
    return torch.nonzero(~target.is_crowd.bool().cpu(), as_tuple=False)[:, 0]


def _empty() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)


def _check_batch(outputs: MaskFormerOutput, targets: Sequence[Target]) -> None:
    if outputs.pred_logits.shape[0] != len(targets):
        raise ValueError(f"{outputs.pred_logits.shape[0]} predictions but {len(targets)} targets")


def _match_each_image(
    outputs: MaskFormerOutput, targets: Sequence[Target],
    cost: Callable[[int, Target, torch.Tensor], torch.Tensor],
) -> Indices:
    """Hungarian matching image by image: `cost(b, target, kept)` is the [Q, M] cost of image b against the
    target segments at indices `kept` (the matchable ones, on the target's device); autocast is off."""
    indices: Indices = []
    with torch.autocast(device_type=outputs.pred_logits.device.type, enabled=False):
        for b, target in enumerate(targets):
            keep = matchable(target)
            if keep.numel() == 0:
                indices.append(_empty())
                continue
            matrix = _finite(cost(b, target, keep.to(target.classes.device)))
            indices.append(_solve(matrix.cpu().double().numpy(), keep))
    return indices


def _finite(cost: torch.Tensor) -> torch.Tensor:
    """fp32 costs with NaN / inf replaced (see _BAD_COST)."""
    return torch.nan_to_num(cost.float(), nan=_BAD_COST, posinf=_BAD_COST, neginf=-_BAD_COST)


def _solve(cost: np.ndarray, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost assignment of a [Q, M'] float64 cost matrix (min(Q, M') pairs) against the target
    segments at indices `keep` [M']: (prediction indices, target segment indices), int64."""
    rows, cols = linear_sum_assignment(cost)
    return torch.as_tensor(rows, dtype=torch.int64), keep[torch.as_tensor(cols)]


def match_layers(matcher: Callable, layers: Sequence[MaskFormerOutput], targets: Sequence[Target]
                 ) -> list[Indices] | None:
    """Every decoder layer's matching at once (deep supervision), equal to [matcher(o, targets) for o in
    layers], where the matcher can do that (HungarianMatcher on dense masks); None where layers are matched
    one at a time by the caller: with point sampling the matcher's random draws interleave with the loss's,
    layer by layer, and that order is kept (same points for the same seed as before)."""
    batched = getattr(matcher, "match_layers", None)
    if batched is None or getattr(matcher, "num_points", 0) > 0:
        return None
    return batched(layers, targets)


class HungarianMatcher:
    """Bipartite matching on class and mask costs (paper Sec. 3.2): -p_i(c_j) + w_f * focal + w_d * dice.

    cost_class, cost_focal, cost_dice: weights of the three terms (paper: 1, 20, 1, the loss weights).
    num_points: 0 compares masks on every pixel of the mask-logit grid, the targets nearest-downsampled to
        it (the paper); > 0 compares them on that many uniform random points shared by all masks of an
        image, the targets read at full resolution (Mask2Former).
    Costs are computed in fp32 whatever autocast says, without gradients.
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_focal: float = 20.0,
        cost_dice: float = 1.0,
        num_points: int = 0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        if cost_class == 0 and cost_focal == 0 and cost_dice == 0:
            raise ValueError("all matching cost weights are 0")
        self.cost_class = cost_class
        self.cost_focal = cost_focal
        self.cost_dice = cost_dice
        self.num_points = num_points
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def __repr__(self) -> str:
        return (
            f"HungarianMatcher(cost_class={self.cost_class}, cost_focal={self.cost_focal}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points})"
        )

    def cost_matrix(
        self,
        pred_logits: torch.Tensor,
        pred_masks: torch.Tensor,
        tgt_classes: torch.Tensor,
        tgt_masks: torch.Tensor,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """The [Q, M] matching cost of one image.

        pred_logits: [Q, K+1] class logits; pred_masks: [Q, h, w] mask logits;
        tgt_classes: [M] int64; tgt_masks: [M, H, W] bool, zero-padded to `size` (default their own size).
        """
        size = size or (int(tgt_masks.shape[-2]), int(tgt_masks.shape[-1]))
        logits = pred_logits.float()
        out_masks = pred_masks.float()
        tgt = pad_masks(tgt_masks.to(out_masks.device), size)
        # 1 - p(c) approximates the NLL; the constant 1 does not change the assignment.
        cost_class = -logits.softmax(-1)[:, tgt_classes.to(logits.device)]
        if self.num_points > 0:
            coords = torch.rand(1, self.num_points, 2, device=out_masks.device)
            out_flat = point_sample(out_masks[:, None], coords.expand(out_masks.shape[0], -1, -1))[:, 0]
            tgt_flat = point_sample(tgt[:, None], coords.expand(tgt.shape[0], -1, -1))[:, 0]
        else:
            # Downsampled targets (not upsampled predictions) keep matching cheap, as the reference.
            tgt = F.interpolate(tgt[:, None], size=out_masks.shape[-2:], mode="nearest")[:, 0]
            out_flat, tgt_flat = out_masks.flatten(1), tgt.flatten(1)
        cost_focal = pairwise_focal_cost(out_flat, tgt_flat, self.focal_alpha, self.focal_gamma)
        cost_dice = pairwise_dice_cost(out_flat, tgt_flat)
        return self.cost_class * cost_class + self.cost_focal * cost_focal + self.cost_dice * cost_dice

    @torch.no_grad()
    def __call__(self, outputs: MaskFormerOutput, targets: Sequence[Target]) -> Indices:
        """outputs.pred_logits [B, Q, K+1], outputs.pred_masks [B, Q, h, w]; one Target per image."""
        _check_batch(outputs, targets)
        size = common_size(targets)
        return _match_each_image(outputs, targets, lambda b, target, kd: self.cost_matrix(
            outputs.pred_logits[b], outputs.pred_masks[b], target.classes[kd], target.masks[kd], size))

    @torch.no_grad()
    def match_layers(self, layers: Sequence[MaskFormerOutput], targets: Sequence[Target]) -> list[Indices]:
        """[self(o, targets) for o in layers], computed together: per image, one cost matrix [L*Q, M] for
        the L layers (the targets are downsampled once, one product per term), and one device-to-host copy
        for the whole batch. On a GPU the per-layer path waits for the device L x B times; this once.
        With point sampling each layer keeps its own random points, so that path stays per layer."""
        if self.num_points > 0 or len(layers) < 2:
            return [self(o, targets) for o in layers]
        for o in layers:
            _check_batch(o, targets)
        size = common_size(targets)
        num_layers, q = len(layers), layers[0].pred_logits.shape[1]
        keeps, costs = [], []
        with torch.autocast(device_type=layers[0].pred_logits.device.type, enabled=False):
            for b, target in enumerate(targets):
                keep = matchable(target)
                keeps.append(keep)
                if keep.numel():
                    kd = keep.to(target.classes.device)
                    logits = torch.cat([o.pred_logits[b] for o in layers])  # [L*Q, K+1]
                    masks = torch.cat([o.pred_masks[b] for o in layers])  # [L*Q, h, w]
                    costs.append(self.cost_matrix(logits, masks, target.classes[kd], target.masks[kd], size))
            host = _finite(torch.cat([c.flatten() for c in costs]) if costs else torch.zeros(0)).cpu().double()
        out: list[Indices] = [[] for _ in layers]
        start = 0
        for keep in keeps:
            if keep.numel() == 0:
                for indices in out:
                    indices.append(_empty())
                continue
            m = keep.numel()
            per_image = host[start : start + num_layers * q * m].view(num_layers, q, m).numpy()
            start += num_layers * q * m
            for layer, indices in enumerate(out):
                indices.append(_solve(per_image[layer], keep))
        return out


class FixedMatcher:
    """MaskFormer-fixed (paper Sec. 3.2, Table 4): N = K and prediction i always stands for class i.

    Each target segment of class c is matched to query c; queries of absent classes are "no object".
    Needs at most one (non-crowd) segment per class, i.e. semantic targets.
    """

    def __repr__(self) -> str:
        return "FixedMatcher()"

    @torch.no_grad()
    def __call__(self, outputs: MaskFormerOutput, targets: Sequence[Target]) -> Indices:
        _check_batch(outputs, targets)
        num_queries, num_classes = outputs.pred_logits.shape[1], outputs.pred_logits.shape[2] - 1
        if num_queries != num_classes:
            raise ValueError(
                f"fixed matching needs one query per class: {num_queries} queries, {num_classes} classes"
            )
        indices: Indices = []
        for target in targets:
            keep = matchable(target)
            classes = target.classes.cpu()[keep]
            if classes.unique().numel() != classes.numel():
                raise ValueError("fixed matching needs at most one segment per class (semantic targets)")
            order = torch.argsort(classes)
            indices.append((classes[order].to(torch.int64), keep[order]))
        return indices


class BoxMatcher:
    """DETR's matching (Table 5 ablation): -p_i(c_j) + w_l1 * |b_i - b_j|_1 - w_giou * GIoU(b_i, b_j).

    Uses outputs.pred_boxes [B, Q, 4] (normalised cxcywh); the target boxes are the tight boxes of the
    target masks, normalised by the padded batch size (the frame of the predictions).
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> None:
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching cost weights are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    def __repr__(self) -> str:
        costs = f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}"
        return f"BoxMatcher({costs})"

    def cost_matrix(
        self,
        pred_logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        tgt_classes: torch.Tensor,
        tgt_boxes: torch.Tensor,
    ) -> torch.Tensor:
        """[Q, K+1] logits, [Q, 4] and [M, 4] cxcywh boxes, [M] classes -> [Q, M] cost."""
        logits, boxes, tgt_boxes = (
            pred_logits.float(),
            pred_boxes.float(),
            tgt_boxes.float().to(pred_boxes.device),
        )
        cost_class = -logits.softmax(-1)[:, tgt_classes.to(logits.device)]
        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        return self.cost_class * cost_class + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou

    @torch.no_grad()
    def __call__(self, outputs: MaskFormerOutput, targets: Sequence[Target]) -> Indices:
        _check_batch(outputs, targets)
        if outputs.pred_boxes is None:
            raise ValueError("box matching needs pred_boxes: build the model with model.box_head=true")
        size = common_size(targets)
        return _match_each_image(outputs, targets, lambda b, target, kd: self.cost_matrix(
            outputs.pred_logits[b], outputs.pred_boxes[b], target.classes[kd],
            masks_to_boxes(target.masks[kd], size=size)))


Matcher = HungarianMatcher | FixedMatcher | BoxMatcher


def build_matcher(loss_cfg: LossConfig) -> Matcher:
    """The matcher of a recipe's `loss` section; the cost weights are the loss weights (as the paper)."""
    if loss_cfg.matcher == "hungarian":
        return HungarianMatcher(
            cost_class=loss_cfg.class_weight,
            cost_focal=loss_cfg.focal_weight,
            cost_dice=loss_cfg.dice_weight,
            num_points=loss_cfg.num_points,
            focal_alpha=loss_cfg.focal_alpha,
            focal_gamma=loss_cfg.focal_gamma,
        )
    if loss_cfg.matcher == "fixed":
        return FixedMatcher()
    if loss_cfg.matcher == "box":
        return BoxMatcher(
            cost_class=loss_cfg.class_weight,
            cost_bbox=loss_cfg.box_l1_weight,
            cost_giou=loss_cfg.box_giou_weight,
        )
    raise ValueError(f"unknown matcher {loss_cfg.matcher!r}")
