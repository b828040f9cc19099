"""Training losses: the mask-classification loss L_mask-cls (paper Eq. 1) and the per-pixel baselines' loss.

SetCriterion matches predictions to ground-truth segments, then sums, for the matched pairs,
cross-entropy over K+1 classes ("no object" weighted 0.1 for the unmatched queries), focal x20 and
dice x1 on the masks; the same loss follows every decoder layer (deep supervision, keys suffixed _0,
_1, ... for aux_outputs in order). All losses are computed in fp32 even under autocast.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from maskformer_cli.config import LossConfig
from maskformer_cli.losses import (
    box_cxcywh_to_xyxy,
    generalized_box_iou,
    masks_to_boxes,
    point_sample,
    uncertain_point_coords,
)
from maskformer_cli.losses_fused import focal_dice_loss
from maskformer_cli.matcher import (
    BoxMatcher,
    Indices,
    Matcher,
    build_matcher,
    common_size,
    match_layers,
    matchable,
    pad_masks,
)
from maskformer_cli.structures import MaskFormerOutput, PerPixelOutput, Target

_AUX_SUFFIX = re.compile(r"_\d+$")


def weighted_sum(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Sum of `loss_*` entries times the weight of their base name (aux suffix `_i` stripped).

    A `loss_*` key without a weight is an error (a silently unweighted loss is a silent bug); other keys
    (logged statistics) are skipped.
    """
    total: torch.Tensor | None = None
    for key, value in losses.items():
        if not key.startswith("loss_"):
            continue
        base = _AUX_SUFFIX.sub("", key)
        if base not in weights:
            raise KeyError(f"no weight for loss '{key}' (known: {', '.join(sorted(weights))})")
        term = weights[base] * value
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no losses to sum")
    return total


def count_masks(targets: Sequence[Target], device: torch.device) -> float:
    """Average number of (non-crowd) gt masks per rank, summed over DDP ranks, clamped >= 1.

    Normalising by the global count keeps the loss scale independent of how segments fall on ranks.
    """
    n = torch.tensor([float(sum(int(matchable(t).numel()) for t in targets))], device=device)
    world = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(n)
        world = torch.distributed.get_world_size()
    return max(float(n.item()) / world, 1.0)


def _permutation(indices: Indices, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch index, prediction index) of every matched pair, image by image."""
    batch = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
    src = torch.cat([src for src, _ in indices])
    return batch.to(device), src.to(device)


def _zero(t: torch.Tensor) -> torch.Tensor:
    # A zero that still depends on the output: backward works and DDP sees every parameter used.
    return t.float().sum() * 0.0


class SetCriterion(nn.Module):
    """L_mask-cls (paper Eq. 1) with deep supervision.

    num_classes: K (the no-object class is index K of pred_logits).
    matcher: HungarianMatcher (paper), FixedMatcher (Table 4) or BoxMatcher (Table 5; adds loss_bbox and
        loss_giou on outputs.pred_boxes, masks still trained with focal + dice).
    num_points: 0 = dense mask losses on predictions upsampled (bilinear) to the target size (paper;
        computed by losses_fused.focal_dice_loss without storing the upsampled logits);
        > 0 = losses on that many points per mask, chosen by uncertainty (Mask2Former).
    forward(outputs, targets) -> {loss_ce, loss_focal, loss_dice[, loss_bbox, loss_giou]} and the same
    keys with suffix _i for outputs.aux_outputs[i]; `weighted_total` turns them into the training loss.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: Matcher,
        class_weight: float = 1.0,
        focal_weight: float = 20.0,
        dice_weight: float = 1.0,
        no_object_weight: float = 0.1,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        num_points: int = 0,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        box_l1_weight: float = 5.0,
        box_giou_weight: float = 2.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.use_boxes = isinstance(matcher, BoxMatcher)
        class_weights = torch.ones(num_classes + 1)
        class_weights[-1] = no_object_weight
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.weight_dict: dict[str, float] = {
            "loss_ce": class_weight,
            "loss_focal": focal_weight,
            "loss_dice": dice_weight,
        }
        if self.use_boxes:
            self.weight_dict.update(loss_bbox=box_l1_weight, loss_giou=box_giou_weight)

    # ------------------------------------------------------------------------------------------- losses

    def loss_labels(
        self, outputs: MaskFormerOutput, targets: Sequence[Target], indices: Indices
    ) -> torch.Tensor:
        """Weighted CE over K+1 classes; unmatched queries are labelled "no object" (index K)."""
        logits = outputs.pred_logits.float()
        batch, src = _permutation(indices, logits.device)
        labels = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        if batch.numel():
            matched = [
                t.classes.to(logits.device)[tgt.to(logits.device)]
                for t, (_, tgt) in zip(targets, indices, strict=True)
            ]
            labels[batch, src] = torch.cat(matched)
        return F.cross_entropy(logits.transpose(1, 2), labels, weight=self.class_weights.to(logits.device))

    def _matched_masks(
        self, outputs: MaskFormerOutput, targets: Sequence[Target], indices: Indices, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """([n, h, w] matched mask logits in fp32, [n, H, W] their targets in `dtype` padded to the batch size)."""
        device = outputs.pred_masks.device
        batch, src = _permutation(indices, device)
        pred = outputs.pred_masks[batch, src].float()
        size = common_size(targets)
        tgt = torch.cat(
            [
                pad_masks(t.masks[j.to(t.masks.device)], size, dtype).to(device)
                for t, (_, j) in zip(targets, indices, strict=True)
            ]
        )
        return pred, tgt

    def loss_masks(
        self, outputs: MaskFormerOutput, targets: Sequence[Target], indices: Indices, num_masks: float
    ) -> dict[str, torch.Tensor]:
        """Focal and dice losses of the matched masks (divided by num_masks)."""
        if sum(int(src.numel()) for src, _ in indices) == 0:
            zero = _zero(outputs.pred_masks)
            return {"loss_focal": zero, "loss_dice": zero.clone()}
        if self.num_points == 0:
            # The paper's dense loss on logits upsampled to the target size, fused: the full-size
            # logits and their intermediates are never stored (see losses_fused); targets stay bool.
            pred, tgt = self._matched_masks(outputs, targets, indices, torch.bool)
        else:
            pred, tgt = self._matched_masks(outputs, targets, indices, torch.float32)
            with torch.no_grad():
                coords = uncertain_point_coords(
                    pred[:, None], self.num_points, self.oversample_ratio, self.importance_sample_ratio
                )
                tgt = point_sample(tgt[:, None], coords)[:, 0]
            pred = point_sample(pred[:, None], coords)[:, 0]
        focal, dice = focal_dice_loss(pred, tgt, self.focal_alpha, self.focal_gamma)
        return {"loss_focal": focal.sum() / num_masks, "loss_dice": dice.sum() / num_masks}

    def loss_boxes(
        self, outputs: MaskFormerOutput, targets: Sequence[Target], indices: Indices, num_masks: float
    ) -> dict[str, torch.Tensor]:
        """DETR's L1 and GIoU losses of matched boxes against the boxes of the target masks."""
        if outputs.pred_boxes is None:
            raise ValueError("box losses need pred_boxes: build the model with model.box_head=true")
        if sum(int(src.numel()) for src, _ in indices) == 0:
            zero = _zero(outputs.pred_boxes)
            return {"loss_bbox": zero, "loss_giou": zero.clone()}
        device = outputs.pred_boxes.device
        batch, src = _permutation(indices, device)
        pred = outputs.pred_boxes[batch, src].float()
        size = common_size(targets)
        tgt = torch.cat(
            [
                masks_to_boxes(t.masks[j.to(t.masks.device)], size).to(device)
                for t, (_, j) in zip(targets, indices, strict=True)
            ]
        )
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(tgt)))
        return {
            "loss_bbox": F.l1_loss(pred, tgt, reduction="none").sum() / num_masks,
            "loss_giou": (1 - giou).sum() / num_masks,
        }

    def layer_losses(
        self, outputs: MaskFormerOutput, targets: Sequence[Target], num_masks: float,
        indices: Indices | None = None,
    ) -> dict[str, torch.Tensor]:
        """Match (unless `indices` are given), then every loss, for one decoder layer's output."""
        if indices is None:
            indices = self.matcher(outputs, targets)
        losses = {"loss_ce": self.loss_labels(outputs, targets, indices)}
        losses.update(self.loss_masks(outputs, targets, indices, num_masks))
        if self.use_boxes:
            losses.update(self.loss_boxes(outputs, targets, indices, num_masks))
        return losses

    def forward(self, outputs: MaskFormerOutput, targets: Sequence[Target]) -> dict[str, torch.Tensor]:
        """outputs: pred_logits [B, Q, K+1], pred_masks [B, Q, H/4, W/4]; targets: one per image."""
        if outputs.pred_logits.shape[0] != len(targets):
            raise ValueError(f"{outputs.pred_logits.shape[0]} predictions but {len(targets)} targets")
        device = outputs.pred_logits.device
        num_masks = count_masks(targets, device)
        with torch.autocast(device_type=device.type, enabled=False):
            # Each decoder layer is matched anew (its queries need not agree with the last layer's), all
            # layers in one go: see HungarianMatcher.match_layers.
            layers = [outputs, *outputs.aux_outputs]
            last, *aux = match_layers(self.matcher, layers, targets) or [None] * len(layers)
            losses = self.layer_losses(outputs, targets, num_masks, last)
            for i, (out_i, indices) in enumerate(zip(outputs.aux_outputs, aux, strict=True)):
                losses.update({f"{k}_{i}": v for k, v in self.layer_losses(out_i, targets, num_masks, indices).items()})
        return losses

    def weighted_total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss: sum of weight * loss over every layer's losses."""
        return weighted_sum(losses, self.weight_dict)


class PerPixelCriterion(nn.Module):
    """Loss of the per-pixel baselines (paper Table 1 and Table 4).

    sem_seg_logits [B, K, H/4, W/4] are upsampled (bilinear) to the label size; labels come from the
    Targets (`semantic_map`, with Target.ignore and padding set to `ignore_label`, excluded from the loss).
    loss='ce': per-pixel cross-entropy (the paper's baselines) -> {loss_ce}.
    loss='focal_dice': each class channel is a mask logit trained with focal + dice against that class's
        region (empty for absent classes), divided by the number of present classes (Sec. 5.3's check that
        the loss is not the reason for the gains) -> {loss_focal, loss_dice}.
    ignore_label: an internal sentinel, any value outside 0..K-1.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_label: int = -1,
        loss: Literal["ce", "focal_dice"] = "ce",
        ce_weight: float = 1.0,
        focal_weight: float = 20.0,
        dice_weight: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if 0 <= ignore_label < num_classes:
            raise ValueError(f"ignore_label {ignore_label} is a class id (0..{num_classes - 1})")
        if loss not in ("ce", "focal_dice"):
            raise ValueError(f"unknown per-pixel loss {loss!r}")
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.loss = loss
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.weight_dict = (
            {"loss_ce": ce_weight} if loss == "ce" else {"loss_focal": focal_weight, "loss_dice": dice_weight}
        )

    def labels(self, targets: Sequence[Target], device: torch.device) -> torch.Tensor:
        """[B, H, W] int64 label maps, padded to the batch size with ignore_label."""
        size = common_size(targets)
        out = torch.full((len(targets), *size), self.ignore_label, dtype=torch.int64, device=device)
        for b, t in enumerate(targets):
            sem = t.semantic_map(self.ignore_label)
            if t.ignore is not None:
                sem[t.ignore.bool()] = self.ignore_label
            out[b, : sem.shape[0], : sem.shape[1]] = sem.to(device)
        return out

    def forward(self, outputs: PerPixelOutput, targets: Sequence[Target]) -> dict[str, torch.Tensor]:
        """The loss of the last layer, and with deep supervision (outputs.aux_outputs) the same loss of each
        earlier layer under the suffix _i, at the same weight (the reference's PerPixelBaselinePlusHead)."""
        labels = self.labels(targets, outputs.sem_seg_logits.device)
        losses = self.layer_losses(outputs, labels)
        for i, aux in enumerate(outputs.aux_outputs):
            losses.update({f"{k}_{i}": v for k, v in self.layer_losses(aux, labels).items()})
        return losses

    def layer_losses(self, outputs: PerPixelOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        device = labels.device
        with torch.autocast(device_type=device.type, enabled=False):
            logits = F.interpolate(
                outputs.sem_seg_logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False
            )
            valid = labels != self.ignore_label
            if self.loss == "ce":
                # sum / count rather than mean: an all-ignore batch gives 0, not NaN.
                ce = F.cross_entropy(logits, labels, ignore_index=self.ignore_label, reduction="sum")
                return {"loss_ce": ce / valid.sum().clamp(min=1)}
            return self._focal_dice(logits, labels, valid)

    def _focal_dice(
        self, logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        k = self.num_classes
        classes = torch.arange(k, device=labels.device)[:, None]
        # classes present per image (ignored pixels excluded), counted over the batch
        num_masks = max(float(sum(int(labels[b][valid[b]].unique().numel()) for b in range(len(labels)))), 1.0)
        focal, dice = _zero(logits), _zero(logits)
        for b in range(logits.shape[0]):
            keep = valid[b].flatten()
            if not keep.any():
                continue
            x = logits[b].flatten(1)[:, keep]
            t = labels[b].flatten()[keep][None, :] == classes  # [K, P] bool: one byte a pixel, not a float one-hot
            f, d = focal_dice_loss(x, t, self.focal_alpha, self.focal_gamma)
            focal = focal + f.sum() / num_masks
            dice = dice + d.sum() / num_masks
        return {"loss_focal": focal, "loss_dice": dice}

    def weighted_total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return weighted_sum(losses, self.weight_dict)


Criterion = SetCriterion | PerPixelCriterion


def build_criterion(loss: LossConfig, num_classes: int, *, mask_classification: bool = True) -> Criterion:
    """The criterion of a recipe's `loss` section: MaskFormer's set criterion, or with `mask_classification`
    False (the per-pixel baselines) the per-pixel loss.

    The recipe's load-time validation has checked what the loss needs of the other sections (fixed matching:
    semantic targets and one query per class; box matching: the box head)."""
    if not mask_classification:
        return PerPixelCriterion(
            num_classes,
            ignore_label=-1,
            loss=loss.per_pixel_loss,
            focal_weight=loss.focal_weight,
            dice_weight=loss.dice_weight,
            focal_alpha=loss.focal_alpha,
            focal_gamma=loss.focal_gamma,
        )
    return SetCriterion(
        num_classes,
        build_matcher(loss),
        class_weight=loss.class_weight,
        focal_weight=loss.focal_weight,
        dice_weight=loss.dice_weight,
        no_object_weight=loss.no_object_weight,
        focal_alpha=loss.focal_alpha,
        focal_gamma=loss.focal_gamma,
        num_points=loss.num_points,
        oversample_ratio=loss.oversample_ratio,
        importance_sample_ratio=loss.importance_sample_ratio,
        box_l1_weight=loss.box_l1_weight,
        box_giou_weight=loss.box_giou_weight,
    )
