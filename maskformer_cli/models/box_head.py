"""DETR's box head, for the box-matching ablation (paper Table 5): per-segment embeddings -> boxes.

A 3-layer MLP (hidden -> hidden -> hidden -> 4, ReLU between) followed by a sigmoid, giving normalised
(cx, cy, w, h) in [0, 1] relative to the (padded) input image. Keys: layers.{0,1,2}.{weight,bias}.
"""

from __future__ import annotations

import torch

from maskformer_cli.models.transformer import MLP


class BoxHead(MLP):
    """q: [..., hidden_dim] -> boxes [..., 4] as sigmoid-normalised (cx, cy, w, h)."""

    def __init__(self, hidden_dim: int) -> None:
        super().__init__(hidden_dim, hidden_dim, 4, num_layers=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).sigmoid()
