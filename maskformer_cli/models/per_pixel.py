"""The paper's per-pixel classification baselines (Table 1 and Table 4), as the reference's
PerPixelBaselineHead / PerPixelBaselinePlusHead.

PerPixelBaseline: backbone + FPN pixel decoder + a 1x1 conv classifier on the per-pixel embeddings.
PerPixelBaseline+: the same pixel-level module plus MaskFormer's transformer module and mask-embedding MLP
with N = K queries, one per class; the dot product of query k's mask embedding with the per-pixel
embeddings is the logit of class k at each pixel (no class head, no "no object"). Both are trained with
per-pixel cross-entropy on `sem_seg_logits`.
"""

from __future__ import annotations

import torch
from torch import nn

from maskformer_cli.models.layers import c2_msra_fill
from maskformer_cli.models.maskformer import MaskFormer
from maskformer_cli.structures import PerPixelOutput


class PerPixelBaseline(nn.Module):
    """images [B, 3, H, W] -> PerPixelOutput(sem_seg_logits [B, K, H/4, W/4])."""

    def __init__(self, backbone: nn.Module, pixel_decoder: nn.Module, *, mask_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.classifier = nn.Conv2d(mask_dim, num_classes, 1)
        c2_msra_fill(self.classifier)

    def forward(self, images: torch.Tensor, deep_supervision: bool | None = None) -> PerPixelOutput:
        mask_features, _ = self.pixel_decoder(self.backbone(images))
        return PerPixelOutput(sem_seg_logits=self.classifier(mask_features))


class PerPixelBaselinePlus(MaskFormer):
    """images [B, 3, H, W] -> PerPixelOutput(sem_seg_logits [B, K, H/4, W/4]).

    Takes MaskFormer's keyword arguments except num_classes / num_queries (both K here) and box_head.
    With deep_supervision every earlier decoder layer's logits come as `aux_outputs`, and the per-pixel loss
    is computed after each layer, as the reference's PerPixelBaselinePlusHead does.
    """

    def __init__(self, backbone: nn.Module, pixel_decoder: nn.Module, *, num_classes: int, **kwargs) -> None:
        kwargs.pop("num_queries", None)
        kwargs.pop("box_head", None)
        super().__init__(backbone, pixel_decoder, num_classes=None, num_queries=num_classes, **kwargs)

    def forward(self, images: torch.Tensor, deep_supervision: bool | None = None) -> PerPixelOutput:
        """deep_supervision: None = the model's setting; False = the last layer only (inference)."""
        hs, mask_features = self.decode(images)
        if not (self.deep_supervision if deep_supervision is None else deep_supervision):
            hs = hs[-1:]
        logits = torch.einsum("lbqc,bchw->lbqhw", self.mask_embed(hs), mask_features).unbind(0)
        return PerPixelOutput(sem_seg_logits=logits[-1],
                              aux_outputs=[PerPixelOutput(sem_seg_logits=x) for x in logits[:-1]])
