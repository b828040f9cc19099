"""Pixel decoders: backbone features -> per-pixel embeddings at stride 4 (paper Sec. 3.3 and Sec. 4).

FPN pixel decoder (the paper's default, as the released models): starting from res5, a 3x3 conv + GN +
ReLU (no lateral conv on res5); then for res4, res3, res2: a 1x1 lateral conv + GN on the backbone feature,
plus the coarser map upsampled 2x (nearest, to the lateral's exact size), then a 3x3 conv + GN + ReLU. Every
map has `conv_dim` channels; convs followed by GN have no bias. The last map (stride 4) goes through the
mask-features conv (kernel `mask_feature_kernel`, with bias) giving the per-pixel embeddings E_pixel.

Transformer-encoder pixel decoder (the "+6 Enc" variant, paper Table 3): res5 is first projected to
`conv_dim` (1x1 conv with bias), then refined by post-norm DETR encoder layers with sine positions; the 3x3
conv + GN + ReLU on res5 then runs on the encoder output, and the encoder output itself is the transformer
decoder's input (the reference's `transformer_in_feature: transformer_encoder`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from maskformer_cli.models.layers import ConvNorm, c2_xavier_fill, get_norm
from maskformer_cli.models.position_encoding import PositionEmbeddingSine
from maskformer_cli.models.transformer import TransformerEncoder


class FPNPixelDecoder(nn.Module):
    """features {"res2": [B, C2, H/4, W/4], ..., "res5": [B, C5, H/32, W/32]} ->
    (mask_features [B, mask_dim, H/4, W/4], transformer_input = res5 [B, C5, H/32, W/32]).

    in_channels: channels of each input feature, ordered from the finest (res2) to the coarsest (res5).
    norm: 'gn' (GroupNorm(32), the reference) or 'none' (then the convs get biases).
    """

    def __init__(
        self, in_channels: dict[str, int], conv_dim: int = 256, mask_dim: int = 256, norm: str = "gn",
        mask_feature_kernel: int = 3,
    ) -> None:
        super().__init__()
        self.in_features = list(in_channels)
        self.conv_dim = conv_dim
        self.mask_dim = mask_dim
        bias = norm == "none"
        coarsest = self.in_features[-1]
        self.lateral_convs = nn.ModuleDict()
        self.output_convs = nn.ModuleDict()
        for name, channels in in_channels.items():
            if name != coarsest:
                self.lateral_convs[name] = ConvNorm(channels, conv_dim, 1, bias=bias, norm=get_norm(norm, conv_dim))
            self.output_convs[name] = ConvNorm(
                channels if name == coarsest else conv_dim, conv_dim, 3, padding=1, bias=bias,
                norm=get_norm(norm, conv_dim), relu=True,
            )
        self.mask_features = nn.Conv2d(
            conv_dim, mask_dim, mask_feature_kernel, padding=mask_feature_kernel // 2
        )
        for m in [*self.lateral_convs.values(), *self.output_convs.values(), self.mask_features]:
            c2_xavier_fill(m)

    def _coarsest(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """res5 -> (the top of the pyramid, the transformer decoder's input)."""
        return self.output_convs[self.in_features[-1]](x), x

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        y, transformer_input = self._coarsest(features[self.in_features[-1]])
        for name in reversed(self.in_features[:-1]):
            lateral = self.lateral_convs[name](features[name])
            y = lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest")
            y = self.output_convs[name](y)
        return self.mask_features(y), transformer_input


class TransformerEncoderPixelDecoder(FPNPixelDecoder):
    """The FPN pixel decoder with a transformer encoder on res5 ("+6 Enc").

    Same contract as FPNPixelDecoder, but transformer_input is the encoder output [B, conv_dim, H/32, W/32].
    """

    def __init__(
        self, in_channels: dict[str, int], conv_dim: int = 256, mask_dim: int = 256, norm: str = "gn",
        mask_feature_kernel: int = 3, *, nheads: int = 8, dim_feedforward: int = 2048, dropout: float = 0.1,
        enc_layers: int = 6, pre_norm: bool = False,
    ) -> None:
        # The parent builds output_convs[res5] on conv_dim inputs: here it reads the encoder output.
        coarsest = list(in_channels)[-1]
        super().__init__(
            {**in_channels, coarsest: conv_dim}, conv_dim, mask_dim, norm, mask_feature_kernel
        )
        self.input_proj = nn.Conv2d(in_channels[coarsest], conv_dim, 1)
        c2_xavier_fill(self.input_proj)
        self.encoder = TransformerEncoder(conv_dim, nheads, enc_layers, dim_feedforward, dropout, pre_norm)
        self.pos_embed = PositionEmbeddingSine(conv_dim // 2, normalize=True)

    def _coarsest(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        src = self.input_proj(x)
        b, c, h, w = src.shape
        pos = self.pos_embed(src).flatten(2).transpose(1, 2)
        memory = self.encoder(src.flatten(2).transpose(1, 2), pos)
        memory = memory.transpose(1, 2).reshape(b, c, h, w)
        return self.output_convs[self.in_features[-1]](memory), memory
