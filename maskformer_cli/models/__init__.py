"""The network of the paper's Fig. 2: backbone -> pixel decoder -> transformer decoder -> segmentation module.

`build_model(model_cfg, num_classes)` is the only reader of ModelConfig. Models take images that are
already normalised with `normalize` (ImageNet mean/std on the 0-255 scale, as the reference).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from maskformer_cli.models.layers import PIXEL_MEAN, PIXEL_STD  # the models' input contract, re-exported

if TYPE_CHECKING:
    from torch import nn

    from maskformer_cli.config import ModelConfig



def normalize(images: torch.Tensor) -> torch.Tensor:
    """images: [3, H, W] or [B, 3, H, W], uint8 or float in 0..255 (RGB) -> float32 (x - mean) / std."""
    x = images.float()
    mean = torch.tensor(PIXEL_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def build_model(model_cfg: ModelConfig, num_classes: int) -> nn.Module:
    """MaskFormer (-> MaskFormerOutput) or a per-pixel baseline (-> PerPixelOutput) for K = num_classes."""
    from maskformer_cli.errors import UserError
    from maskformer_cli.models.backbone import build_backbone
    from maskformer_cli.models.maskformer import MaskFormer
    from maskformer_cli.models.per_pixel import PerPixelBaseline, PerPixelBaselinePlus
    from maskformer_cli.models.pixel_decoder import FPNPixelDecoder, TransformerEncoderPixelDecoder

    c = model_cfg
    if num_classes < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}")
    if c.meta_architecture == "per_pixel_baseline_plus" and c.num_queries != num_classes:
        # its queries are the K class embeddings by construction: another N would be ignored
        raise UserError(f"model.num_queries: PerPixelBaseline+ has one query per class; set it to {num_classes} "
                        f"(got {c.num_queries})")
    backbone = build_backbone(
        c.backbone, pretrained=c.pretrained, norm=c.backbone_norm, freeze_at=c.freeze_at,
        window_size=c.swin_window_size, drop_path_rate=c.drop_path_rate, output_stride=c.output_stride,
    )
    in_channels = {k: backbone.out_channels[k] for k in ("res2", "res3", "res4", "res5")}
    if c.pixel_decoder == "transformer_encoder_fpn":
        pixel_decoder = TransformerEncoderPixelDecoder(
            in_channels, c.conv_dim, c.mask_dim, "gn", c.mask_feature_kernel, nheads=c.nheads,
            dim_feedforward=c.dim_feedforward, dropout=c.dropout, enc_layers=c.encoder_layers, pre_norm=c.pre_norm,
        )
        transformer_in_channels = c.conv_dim
    else:
        pixel_decoder = FPNPixelDecoder(in_channels, c.conv_dim, c.mask_dim, "gn", c.mask_feature_kernel)
        transformer_in_channels = in_channels["res5"]
    if c.meta_architecture == "per_pixel_baseline":
        return PerPixelBaseline(backbone, pixel_decoder, mask_dim=c.mask_dim, num_classes=num_classes)
    transformer_kwargs = dict(
        transformer_in_channels=transformer_in_channels, mask_dim=c.mask_dim, hidden_dim=c.hidden_dim,
        nheads=c.nheads, dim_feedforward=c.dim_feedforward, dec_layers=c.dec_layers, dropout=c.dropout,
        pre_norm=c.pre_norm, dec_self_attn=c.dec_self_attn, enforce_input_project=c.enforce_input_project,
        deep_supervision=c.deep_supervision,
    )
    if c.meta_architecture == "per_pixel_baseline_plus":
        return PerPixelBaselinePlus(backbone, pixel_decoder, num_classes=num_classes, **transformer_kwargs)
    return MaskFormer(
        backbone, pixel_decoder, num_classes=num_classes, num_queries=c.num_queries, box_head=c.box_head,
        **transformer_kwargs,
    )
