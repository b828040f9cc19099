"""Mask and box losses as pure tensor functions (paper Sec. 3.2 and Sec. 4 "Loss weights").

L_mask = lambda_focal * focal + lambda_dice * dice, as DETR. Each loss exists twice: a per-pair form
(`sigmoid_focal_loss`, `dice_loss`: row i of the inputs against row i of the targets, summed over rows and
divided by the number of masks) for training, and a pairwise form (`pairwise_focal_cost`,
`pairwise_dice_cost`: every prediction against every target, [Q, M]) for the matching cost. The pairwise
forms are matrix products, so matching costs one pass over the pixels whatever Q and M are.

Box utilities serve the box-matching ablation (paper Table 5); point sampling serves the optional
point-based loss (`loss.num_points > 0`, Mask2Former's memory saver, not the paper's setting).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------- mask losses


def sigmoid_focal_loss(
    inputs: torch.Tensor, targets: torch.Tensor, num_masks: float, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Focal loss (RetinaNet) of M mask logits against their targets: mean over P, sum over M, / num_masks.

    inputs:  [M, P] mask logits (P pixels or points).
    targets: [M, P] float in [0, 1] (binary, or fractional where point-sampled at a mask edge).
    alpha < 0 disables the class-balance weighting. Returns a scalar.
    """
    prob = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_masks


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Dice loss 1 - (2 sum(p t) + 1) / (sum p + sum t + 1) per mask, summed over M, / num_masks.

    inputs: [M, P] mask logits (p = sigmoid); targets: [M, P] float. The +1 keeps empty masks finite.
    """
    prob = inputs.sigmoid().flatten(1)
    targets = targets.flatten(1)
    numerator = 2 * (prob * targets).sum(-1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def pairwise_focal_cost(
    inputs: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Focal loss of every prediction against every target, averaged over P: [Q, P] x [M, P] -> [Q, M].

    The loss at a pixel is the positive term where t = 1 and the negative term where t = 0, so for
    binary targets it is linear in t and the Q x M table is two matrix products. Entry (i, j) equals
    `sigmoid_focal_loss(inputs[i:i+1], targets[j:j+1], 1)` for binary targets.
    """
    p = inputs.shape[1]
    prob = inputs.sigmoid()
    # softplus(-x) = BCE(x, 1) and softplus(x) = BCE(x, 0), without forming log(sigmoid) explicitly.
    focal_pos = (1 - prob) ** gamma * F.softplus(-inputs)
    focal_neg = prob**gamma * F.softplus(inputs)
    if alpha >= 0:
        focal_pos = focal_pos * alpha
        focal_neg = focal_neg * (1 - alpha)
    cost = focal_pos @ targets.T + focal_neg @ (1 - targets).T
    return cost / max(p, 1)


def pairwise_dice_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss of every prediction against every target: [Q, P] logits x [M, P] -> [Q, M]."""
    prob = inputs.sigmoid()
    numerator = 2 * prob @ targets.T
    denominator = prob.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


# ----------------------------------------------------------------------------------------------- boxes


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] (x0, y0, x1, y1) -> [..., 4] (cx, cy, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] xyxy -> [...] area (0 for degenerate boxes)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(
    boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU and union of xyxy boxes: [N, 4] x [M, 4] -> ([N, M], [N, M])."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    # eps: two empty boxes (an empty target mask gives a zero box) must not give 0/0.
    return inter / union.clamp(min=eps), union


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of xyxy boxes: [N, 4] x [M, 4] -> [N, M]."""
    iou, union = box_iou(boxes1, boxes2, eps)
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull.clamp(min=eps)


def masks_to_boxes(masks: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Tight boxes of binary masks, normalised (cx, cy, w, h): [M, H, W] -> [M, 4]; an empty mask gives zeros.

    A box spans whole pixels: a mask covering columns a..b has x0 = a, x1 = b + 1, so a full mask is
    (0.5, 0.5, 1, 1). `size` = (height, width) to normalise by (default the mask's own H, W), e.g. the
    padded batch size when the masks sit in the top-left corner of a padded canvas.
    """
    m, h, w = masks.shape
    if m == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    norm_h, norm_w = size if size is not None else (h, w)
    masks = masks.bool()
    rows = masks.any(dim=2)  # [M, H]
    cols = masks.any(dim=1)  # [M, W]
    ys = torch.arange(h, device=masks.device, dtype=torch.float32)
    xs = torch.arange(w, device=masks.device, dtype=torch.float32)
    big = float(max(h, w) + 1)
    y0 = torch.where(rows, ys, big).amin(1)
    y1 = torch.where(rows, ys, -1.0).amax(1) + 1
    x0 = torch.where(cols, xs, big).amin(1)
    x1 = torch.where(cols, xs, -1.0).amax(1) + 1
    xyxy = torch.stack([x0 / norm_w, y0 / norm_h, x1 / norm_w, y1 / norm_h], dim=-1)
    boxes = box_xyxy_to_cxcywh(xyxy)
    return torch.where(rows.any(1)[:, None], boxes, torch.zeros_like(boxes))


# ----------------------------------------------------------------------------------------------- points


def point_sample(inputs: torch.Tensor, coords: torch.Tensor, align_corners: bool = False) -> torch.Tensor:
    """Bilinear values of feature maps at normalised points: [N, C, H, W] x [N, P, 2] -> [N, C, P].

    coords are (x, y) in [0, 1] over the whole map (0 = left/top edge, 1 = right/bottom edge), so
    the same points address a low-resolution logit map and a full-resolution target alike.
    """
    grid = 2.0 * coords[:, :, None, :] - 1.0  # [N, P, 1, 2] in grid_sample's [-1, 1]
    out = F.grid_sample(inputs, grid.to(inputs.dtype), mode="bilinear", align_corners=align_corners)
    return out[..., 0]


def logit_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of mask logits: -|logit|, highest where the prediction is closest to 0.5."""
    return -logits.abs()


def uncertain_point_coords(
    logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    uncertainty: Callable[[torch.Tensor], torch.Tensor] = logit_uncertainty,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PointRend's training points (as Mask2Former's loss): [N, 1, H, W] logits -> [N, P, 2] in [0, 1].

    Draws num_points * oversample_ratio uniform points, keeps the importance_sample_ratio * num_points most
    uncertain of them, and fills the rest with fresh uniform points so every pixel keeps some weight.
    """
    n = logits.shape[0]
    device = logits.device
    num_sampled = max(int(num_points * oversample_ratio), num_points)
    coords = torch.rand(n, num_sampled, 2, device=device, generator=generator)
    point_logits = point_sample(logits.float(), coords)  # [N, 1, S]
    num_uncertain = min(int(importance_sample_ratio * num_points), num_sampled)
    num_random = num_points - num_uncertain
    idx = torch.topk(uncertainty(point_logits)[:, 0, :], k=num_uncertain, dim=1).indices  # [N, U]
    chosen = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    if num_random > 0:
        fresh = torch.rand(n, num_random, 2, device=device, generator=generator)
        chosen = torch.cat([chosen, fresh], dim=1)
    return chosen
