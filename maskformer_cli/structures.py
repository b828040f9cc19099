"""The typed structures every stage passes along: ground-truth targets and model outputs.

Shapes use B = batch, Q = queries (N in the paper), K = classes, M = ground-truth segments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Target:
    """Ground truth of one image, as mask classification sees it (paper Sec. 3.1).

    classes: [M] int64 in 0..K-1, one per segment.
    masks:   [M, H, W] bool, one binary mask per segment; pixels labelled ignore are False in every mask.
    ignore:  [H, W] bool or None; True where the label is the ignore value (or padding). The per-pixel
             baselines and the metrics need it; the mask losses do not (they see only `masks`).
    is_crowd: [M] bool or None; panoptic crowd regions (excluded from matching, counted as void by PQ).
    segment_ids: [M] int64 or None; the panoptic segment id of each mask (for PQ on the original ids).
    """

    classes: torch.Tensor
    masks: torch.Tensor
    ignore: torch.Tensor | None = None
    is_crowd: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Target:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Target(
            classes=self.classes.to(device, non_blocking=True),
            masks=self.masks.to(device, non_blocking=True),
            ignore=mv(self.ignore),
            is_crowd=mv(self.is_crowd),
            segment_ids=mv(self.segment_ids),
        )

    @property
    def num_segments(self) -> int:
        return int(self.classes.numel())

    def semantic_map(self, ignore_label: int = 255) -> torch.Tensor:
        """[H, W] int64 label map: the class of each pixel, `ignore_label` where no mask covers it."""
        h, w = self.masks.shape[-2:]
        out = torch.full((h, w), ignore_label, dtype=torch.int64, device=self.masks.device)
        for cls, m in zip(self.classes.tolist(), self.masks, strict=True):
            out[m] = cls
        return out


@dataclass
class MaskFormerOutput:
    """What the segmentation module returns (paper Fig. 2).

    pred_logits: [B, Q, K+1] class logits; index K is "no object".
    pred_masks:  [B, Q, H/4, W/4] mask logits (sigmoid gives m_i).
    aux_outputs: one MaskFormerOutput per earlier decoder layer (deep supervision), without aux of its own.
    pred_boxes:  [B, Q, 4] normalised (cx, cy, w, h) in [0, 1], only with the DETR box head (Table 5).
    """

    pred_logits: torch.Tensor
    pred_masks: torch.Tensor
    aux_outputs: list[MaskFormerOutput] = field(default_factory=list)
    pred_boxes: torch.Tensor | None = None


@dataclass
class PerPixelOutput:
    """What the per-pixel baselines return.

    sem_seg_logits: [B, K, H/4, W/4] per-pixel class logits (no "no object" class).
    aux_outputs: PerPixelBaseline+ with deep supervision: one PerPixelOutput per earlier decoder layer.
    """

    sem_seg_logits: torch.Tensor
    aux_outputs: list[PerPixelOutput] = field(default_factory=list)
