"""Fixed sine positional encoding of a feature map (DETR's, as MaskFormer uses it for the transformer).

For a [B, C, H, W] map, position (y, x) = (i + 1, j + 1), normalised to (0, 2*pi] by dividing by the last
position (+ eps = 1e-6, no half-pixel offset) and scaled by `scale`. Each coordinate gets `num_pos_feats`
features: sin on even and cos on odd channels of pos / temperature^(2 * floor(k / 2) / num_pos_feats).
The y features come first, then the x features: 2 * num_pos_feats channels in all.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """x: [B, C, H, W] (only its shape, device and dtype are used) -> pos: [B, 2 * num_pos_feats, H, W]."""

    def __init__(
        self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
        scale: float = 2 * math.pi,
    ) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        # Computed in float32 whatever the feature dtype: positions up to ~1000 lose precision in half.
        y = torch.arange(1, h + 1, dtype=torch.float32, device=x.device)
        xs = torch.arange(1, w + 1, dtype=torch.float32, device=x.device)
        if self.normalize:
            y = y / (y[-1] + self.eps) * self.scale
            xs = xs / (xs[-1] + self.eps) * self.scale
        k = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / self.num_pos_feats)

        def encode(p: torch.Tensor) -> torch.Tensor:  # [n] -> [n, num_pos_feats], sin/cos interleaved
            a = p[:, None] / dim_t
            return torch.stack((a[:, 0::2].sin(), a[:, 1::2].cos()), dim=2).flatten(1)

        pos_y = encode(y)[:, None, :].expand(h, w, -1)
        pos_x = encode(xs)[None, :, :].expand(h, w, -1)
        pos = torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)  # [2F, H, W]
        return pos.unsqueeze(0).expand(b, -1, -1, -1).to(x.dtype)
