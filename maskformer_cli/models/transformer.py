"""DETR's transformer layers as MaskFormer uses them (paper Sec. 3.3 "Transformer module").

Decoder layer (post-norm by default): self-attention among the queries (query = key = tgt + query_pos,
value = tgt), cross-attention to the image features (query = tgt + query_pos, key = memory + pos,
value = memory), then a ReLU FFN; each sub-layer is residual with dropout and a LayerNorm after it (before
it with pre_norm). The decoder's final LayerNorm is applied to every layer's output for prediction, while
the next layer continues from the un-normalised output. Encoder layers (for the "+6 Enc" pixel decoder) are
the same without cross-attention. Tensors are batch-first: [B, L, C].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _with_pos(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return x if pos is None else x + pos


class DecoderLayer(nn.Module):
    """tgt [B, Q, C], memory [B, S, C], pos [B, S, C], query_pos [B, Q, C] -> tgt [B, Q, C]."""

    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
        pre_norm: bool = False, self_attn: bool = True,
    ) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        if self_attn:
            self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
            self.self_attn_norm = nn.LayerNorm(d_model)
        else:
            self.self_attn = None
        self.cross_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.cross_attn_norm = nn.LayerNorm(d_model)
        # FFN layers live directly on the layer (linear1, linear2) to keep DETR's flat key layout.
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)  # on every sub-layer output and inside the FFN

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(
        self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor | None = None,
        query_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.pre_norm:
            if self.self_attn is not None:
                t = self.self_attn_norm(tgt)
                q = _with_pos(t, query_pos)
                tgt = tgt + self.dropout(self.self_attn(q, q, t, need_weights=False)[0])
            t = self.cross_attn_norm(tgt)
            attn = self.cross_attn(_with_pos(t, query_pos), _with_pos(memory, pos), memory, need_weights=False)[0]
            tgt = tgt + self.dropout(attn)
            return tgt + self.dropout(self._ffn(self.ffn_norm(tgt)))
        if self.self_attn is not None:
            q = _with_pos(tgt, query_pos)
            tgt = self.self_attn_norm(tgt + self.dropout(self.self_attn(q, q, tgt, need_weights=False)[0]))
        attn = self.cross_attn(_with_pos(tgt, query_pos), _with_pos(memory, pos), memory, need_weights=False)[0]
        tgt = self.cross_attn_norm(tgt + self.dropout(attn))
        return self.ffn_norm(tgt + self.dropout(self._ffn(tgt)))


class TransformerDecoder(nn.Module):
    """`num_layers` DecoderLayers and the final LayerNorm.

    forward(tgt [B, Q, C], memory [B, S, C], pos [B, S, C], query_pos [B, Q, C]) -> [L, B, Q, C]: the output
    of every layer after the final norm (the last one is the prediction, the others feed deep supervision).
    """

    def __init__(
        self, d_model: int = 256, nhead: int = 8, num_layers: int = 6, dim_feedforward: int = 2048,
        dropout: float = 0.1, pre_norm: bool = False, self_attn: bool = True,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm, self_attn) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        xavier_init(self)

    def forward(
        self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor | None = None,
        query_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


class EncoderLayer(nn.Module):
    """src [B, S, C], pos [B, S, C] -> [B, S, C]: self-attention (query = key = src + pos) and FFN."""

    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1, pre_norm: bool = False
    ) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.self_attn_norm = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, src: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_norm:
            s = self.self_attn_norm(src)
            q = _with_pos(s, pos)
            src = src + self.dropout(self.self_attn(q, q, s, need_weights=False)[0])
            return src + self.dropout(self._ffn(self.ffn_norm(src)))
        q = _with_pos(src, pos)
        src = self.self_attn_norm(src + self.dropout(self.self_attn(q, q, src, need_weights=False)[0]))
        return self.ffn_norm(src + self.dropout(self._ffn(src)))


class TransformerEncoder(nn.Module):
    """`num_layers` EncoderLayers; a final LayerNorm only with pre_norm (as DETR).

    forward(src [B, S, C], pos [B, S, C]) -> [B, S, C].
    """

    def __init__(
        self, d_model: int = 256, nhead: int = 8, num_layers: int = 6, dim_feedforward: int = 2048,
        dropout: float = 0.1, pre_norm: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model) if pre_norm else None
        xavier_init(self)

    def forward(self, src: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            src = layer(src, pos)
        return src if self.norm is None else self.norm(src)


class MLP(nn.Module):
    """DETR's prediction MLP: `num_layers` Linear layers (in -> hidden -> ... -> out), ReLU between them.

    x: [..., in_dim] -> [..., out_dim]. Keys: layers.{i}.weight / bias.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def xavier_init(module: nn.Module) -> None:
    """DETR's transformer init: Xavier-uniform on every matrix (attention projections, FFN weights)."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
