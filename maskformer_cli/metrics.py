"""Semantic segmentation metrics: mIoU, fwIoU, mAcc, pAcc from one streaming confusion matrix.

The numbers follow detectron2's SemSegEvaluator (in percent). Panoptic quality (PQ, SQ, RQ) and PQ-stuff
live in `metrics_panoptic.py`, which builds on `confusion_matrix` here.

Every metric object is streaming and mergeable: `update` per image, `merge(other)` or, across DDP ranks,
`t = m.state(); dist.all_reduce(t); m.load_state(t)`, then `compute()` on any rank. Sums of integer
counts are exact, so sharding the images never changes the result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

# Largest bincount with one row per raw ground-truth value (256 x 151 for ADE20K); beyond it (e.g. ignore
# label 65535) the ignore label is remapped with torch.where instead.
_MAX_RAW_BINS = 1 << 17


def confusion_matrix(
    pred: torch.Tensor, gt: torch.Tensor, num_classes: int, ignore_label: int
) -> torch.Tensor:
    """[K+1, K+1] int64 pixel counts of one image: rows = ground truth (row K: the ignore label), columns =
    prediction (column K: predictions outside 0..K-1). pred, gt: [H, W] integer maps on one device.

    Raises ValueError on ground-truth labels outside 0..K-1 that are not the ignore label.
    int32 arithmetic, no torch.where and in-place steps on fresh copies: on CPU this is several times
    faster than the int64 one-liner (fresh large temporaries also cost page faults).
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != ground-truth shape {tuple(gt.shape)}")
    k = num_classes
    g = gt.reshape(-1).to(torch.int32, copy=True)
    p = pred.reshape(-1).to(torch.int32, copy=True)
    if g.numel() == 0:
        return torch.zeros((k + 1, k + 1), dtype=torch.int64, device=g.device)
    g_lo, g_hi = (int(v) for v in torch.aminmax(g))
    if int(p.min()) < 0:
        p = torch.where(p < 0, k, p)
    p.clamp_(max=k)  # predictions outside 0..K-1 -> column K
    rows = max(g_hi + 1, k)
    if g_lo >= 0 and rows * (k + 1) <= _MAX_RAW_BINS:
        # One row per raw label value (e.g. 0..255): ignore and invalid labels separate for free.
        raw = torch.bincount(g.mul_(k + 1).add_(p), minlength=rows * (k + 1)).view(rows, k + 1)
        has_ignore = k <= ignore_label < rows
        invalid = int(raw[k:].sum()) - (int(raw[ignore_label].sum()) if has_ignore else 0)
        if invalid:
            raise ValueError(_bad_labels_message(k, ignore_label, g_lo, g_hi))
        counts = raw.new_zeros((k + 1, k + 1))
        counts[:k] = raw[:k]
        if has_ignore:
            counts[k] = raw[ignore_label]
        return counts
    g = torch.where(g == ignore_label, k, g)
    g_lo, g_hi = (int(v) for v in torch.aminmax(g))
    if g_lo < 0 or g_hi > k:
        raise ValueError(_bad_labels_message(k, ignore_label, g_lo, g_hi))
    return torch.bincount(g.mul_(k + 1).add_(p), minlength=(k + 1) ** 2).view(k + 1, k + 1)


def _bad_labels_message(k: int, ignore_label: int, lo: int, hi: int) -> str:
    return (
        f"ground truth has labels outside 0..{k - 1} that are not the ignore label {ignore_label} "
        f"(min {lo}, max {hi})"
    )


class SemanticMetrics:
    """Confusion-matrix metrics of label maps.

    num_classes: K; labels 0..K-1. ignore_label: ground-truth pixels with this value are skipped.
    class_names: for the "IoU-<name>" / "Acc-<name>" keys (default: the class index).
    count_pred_only_classes: a class present in predictions but absent from the ground truth counts in
        mIoU with IoU 0 (True: detectron2 up to v0.6, which MaskFormer's numbers used, and mmseg; its
        per-class IoU is reported as 0) or is left out (False: later detectron2, `iou_valid = pos_gt > 0`;
        per-class IoU NaN). Classes absent from both are NaN and left out either way; accuracy is defined
        only for classes present in the ground truth.

    State: an int64 confusion matrix [K+1, K+1], rows = ground truth (row K: ignored pixels, discarded),
    columns = prediction (column K: predictions outside 0..K-1, e.g. the ignore value of general
    inference; they count as misses of the ground-truth class, never as a class).
    """

    def __init__(
        self,
        num_classes: int,
        ignore_label: int = 255,
        class_names: Sequence[str] | None = None,
        count_pred_only_classes: bool = True,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        if 0 <= ignore_label < num_classes:
            raise ValueError(f"ignore_label {ignore_label} is a class index (num_classes={num_classes})")
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.class_names = (
            list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        )
        self.count_pred_only_classes = count_pred_only_classes
        self.confusion = torch.zeros((num_classes + 1, num_classes + 1), dtype=torch.int64)

    def reset(self) -> None:
        self.confusion.zero_()

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """Add one image: pred [H, W] and gt [H, W] integer label maps (any integer dtype, any device)."""
        if self.confusion.device != pred.device:
            self.confusion = self.confusion.to(pred.device)
        self.confusion += confusion_matrix(pred, gt, self.num_classes, self.ignore_label)

    def merge(self, other: SemanticMetrics) -> None:
        if (other.num_classes, other.ignore_label) != (self.num_classes, self.ignore_label):
            raise ValueError("cannot merge SemanticMetrics with different classes or ignore label")
        self.confusion += other.confusion.to(self.confusion.device)

    def state(self) -> torch.Tensor:
        """A copy of the state as one int64 tensor: all_reduce(SUM) it across ranks, then `load_state`."""
        return self.confusion.clone()

    def load_state(self, state: torch.Tensor) -> None:
        if state.shape != self.confusion.shape:
            raise ValueError(f"state shape {tuple(state.shape)} != {tuple(self.confusion.shape)}")
        self.confusion = state.to(dtype=torch.int64).clone()

    def compute(self) -> dict[str, Any]:
        """Percent: mIoU, fwIoU, mAcc, pAcc, IoU-<name>, Acc-<name>, and `per_class` (a list of dicts)."""
        k = self.num_classes
        conf = self.confusion.cpu().double()
        tp = conf.diagonal()[:k]
        pos_gt = conf[:k, :].sum(1)  # includes predictions outside the classes
        pos_pred = conf[:k, :k].sum(0)  # predictions on ignored pixels do not count
        union = pos_gt + pos_pred - tp
        acc_valid = pos_gt > 0
        iou_valid = union > 0 if self.count_pred_only_classes else acc_valid
        nan = torch.full((k,), math.nan, dtype=torch.float64)
        acc = torch.where(acc_valid, tp / pos_gt.clamp(min=1), nan)
        iou = torch.where(iou_valid, tp / union.clamp(min=1), nan)
        total_gt = pos_gt.sum()
        res: dict[str, Any] = {
            "mIoU": 100 * _mean(iou[iou_valid]),
            "fwIoU": 100 * float((iou[acc_valid] * pos_gt[acc_valid]).sum() / total_gt)
            if total_gt > 0
            else math.nan,
            "mAcc": 100 * _mean(acc[acc_valid]),
            "pAcc": 100 * float(tp.sum() / total_gt) if total_gt > 0 else math.nan,
        }
        per_class = []
        for i, name in enumerate(self.class_names):
            res[f"IoU-{name}"] = 100 * float(iou[i])
            res[f"Acc-{name}"] = 100 * float(acc[i])
            per_class.append(
                {
                    "class": i,
                    "name": name,
                    "IoU": 100 * float(iou[i]),
                    "Acc": 100 * float(acc[i]),
                    "gt_pixels": int(pos_gt[i]),
                    "pred_pixels": int(pos_pred[i]),
                }
            )
        res["per_class"] = per_class
        return res


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else math.nan
