"""MaskFormer (paper Fig. 2): pixel-level module, transformer module, segmentation module.

State-dict key layout (the checkpoint converters in convert.py map onto exactly these names; keep true):

  backbone.*                  see below (ResNet follows detectron2's names; swin/timm their own)
  pixel_decoder.*             see below
  query_pos.weight            [N, C_Q]  learnable positional embeddings of the N queries (the queries
                              themselves start at zero, as in DETR)
  input_proj.{weight,bias}    [C_Q, C_in, 1, 1] 1x1 conv on the transformer input; absent (Identity) when
                              C_in == C_Q and enforce_input_project is False
  decoder.layers.{i}.self_attn.{in_proj_weight [3C, C], in_proj_bias [3C], out_proj.weight, out_proj.bias}
                              (nn.MultiheadAttention; q,k,v stacked in that order; absent if dec_self_attn=False)
  decoder.layers.{i}.self_attn_norm.{weight,bias}        (absent if dec_self_attn=False)
  decoder.layers.{i}.cross_attn.{in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias}
  decoder.layers.{i}.cross_attn_norm.{weight,bias}
  decoder.layers.{i}.linear1.{weight [F, C], bias}       FFN
  decoder.layers.{i}.linear2.{weight [C, F], bias}
  decoder.layers.{i}.ffn_norm.{weight,bias}
  decoder.norm.{weight,bias}  the final LayerNorm, applied to every layer's output
  class_embed.{weight,bias}   [K+1, C_Q] (index K = no object)
  mask_embed.layers.{0,1,2}.{weight,bias}   MLP C_Q -> C_Q -> C_Q -> C_E
  box_embed.layers.{0,1,2}.{weight,bias}    MLP C_Q -> C_Q -> C_Q -> 4 (only with box_head)

  ResNet backbone (resnet50 / resnet101 / resnet101c; detectron2 names; norm = FrozenBatchNorm2d by default,
  keys weight/bias/running_mean/running_var, plus num_batches_tracked with backbone_norm='bn'):
    backbone.stem.conv1.weight, backbone.stem.conv1.norm.*            (7x7, 64)
    resnet101c (DeepLab deep stem): backbone.stem.conv{1,2,3}.weight + .norm.*   (3x3: 64, 64, 128)
    backbone.res{2,3,4,5}.{j}.conv{1,2,3}.weight + .conv{k}.norm.*   (1x1, 3x3 with the stride, 1x1)
    backbone.res{s}.0.shortcut.weight + .shortcut.norm.*              (first block of each stage)
  timm backbone: backbone.body.<timm's own feature-extractor names>
  Swin backbone: defined in swin.py (its module docstring).

  Pixel decoder 'fpn' (norm = GroupNorm(32); convs followed by a norm have no bias):
    pixel_decoder.lateral_convs.{res2,res3,res4}.weight  [D, C_res, 1, 1], .norm.{weight,bias}
    pixel_decoder.output_convs.{res2,res3,res4,res5}.weight [D, D|C_res5, 3, 3], .norm.{weight,bias}
        (output_convs.res5 is the 3x3 conv on res5 itself: there is no lateral conv on res5)
    pixel_decoder.mask_features.{weight,bias}  [C_E, D, k, k] (k = mask_feature_kernel)
  Pixel decoder 'transformer_encoder_fpn' ("+6 Enc"): the same keys, plus
    pixel_decoder.input_proj.{weight,bias}  [D, C_res5, 1, 1]
    pixel_decoder.encoder.layers.{i}.self_attn.*, .self_attn_norm.*, .linear1.*, .linear2.*, .ffn_norm.*
    pixel_decoder.encoder.norm.*  (only with pre_norm, as DETR)
    and output_convs.res5 is then [D, D, 3, 3] (applied to the encoder output).

  PerPixelBaseline:  backbone.*, pixel_decoder.*, classifier.{weight,bias} [K, C_E, 1, 1]
  PerPixelBaseline+: backbone.*, pixel_decoder.*, query_pos (N = K), input_proj, decoder.*, mask_embed.*
                     (no class_embed)
"""

from __future__ import annotations

import torch
from torch import nn

from maskformer_cli.models.box_head import BoxHead
from maskformer_cli.models.layers import c2_xavier_fill
from maskformer_cli.models.position_encoding import PositionEmbeddingSine
from maskformer_cli.models.transformer import MLP, TransformerDecoder
from maskformer_cli.structures import MaskFormerOutput


class MaskFormer(nn.Module):
    """images [B, 3, H, W] (normalised) -> MaskFormerOutput.

    pred_logits [B, N, K+1], pred_masks [B, N, H/4, W/4] mask logits (sizes rounded up), aux_outputs: the
    same for decoder layers 1..L-1 when deep_supervision, pred_boxes [B, N, 4] with box_head.

    backbone: {"res2".."res5"} feature extractor; pixel_decoder: features -> (per-pixel embeddings
    [B, C_E, H/4, W/4], transformer input [B, transformer_in_channels, H/32, W/32]).
    num_classes None builds no class head (PerPixelBaseline+ reuses this module that way).
    """

    def __init__(
        self,
        backbone: nn.Module,
        pixel_decoder: nn.Module,
        *,
        transformer_in_channels: int,
        num_classes: int | None,
        mask_dim: int = 256,
        hidden_dim: int = 256,
        num_queries: int = 100,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        dec_layers: int = 6,
        dropout: float = 0.1,
        pre_norm: bool = False,
        dec_self_attn: bool = True,
        enforce_input_project: bool = False,
        box_head: bool = False,
        deep_supervision: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.num_queries = num_queries
        self.deep_supervision = deep_supervision
        self.pos_embed = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.query_pos = nn.Embedding(num_queries, hidden_dim)
        if transformer_in_channels != hidden_dim or enforce_input_project:
            self.input_proj: nn.Module = nn.Conv2d(transformer_in_channels, hidden_dim, 1)
            c2_xavier_fill(self.input_proj)
        else:
            self.input_proj = nn.Identity()
        self.decoder = TransformerDecoder(
            hidden_dim, nheads, dec_layers, dim_feedforward, dropout, pre_norm, self_attn=dec_self_attn
        )
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1) if num_classes is not None else None
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, num_layers=3)
        self.box_embed = BoxHead(hidden_dim) if box_head else None

    def decode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel-level and transformer modules: images -> (per-segment embeddings Q [L, B, N, C_Q] of every
        decoder layer, per-pixel embeddings [B, C_E, H/4, W/4])."""
        features = self.backbone(images)
        mask_features, transformer_input = self.pixel_decoder(features)
        x = self.input_proj(transformer_input)
        pos = self.pos_embed(x).flatten(2).transpose(1, 2)  # [B, S, C_Q]
        memory = x.flatten(2).transpose(1, 2)
        query_pos = self.query_pos.weight.unsqueeze(0).repeat(x.shape[0], 1, 1)
        # DETR starts the queries at zero; what distinguishes them is their learned positional embedding.
        tgt = torch.zeros_like(query_pos)
        return self.decoder(tgt, memory, pos, query_pos), mask_features

    def forward(self, images: torch.Tensor, deep_supervision: bool | None = None) -> MaskFormerOutput:
        """deep_supervision: None = the model's setting; False = the last layer only (inference needs no
        aux_outputs: the post-processor passes False and skips L-1 mask products)."""
        hs, mask_features = self.decode(images)
        if not (self.deep_supervision if deep_supervision is None else deep_supervision):
            hs = hs[-1:]
        logits = self.class_embed(hs)
        masks = torch.einsum("lbqc,bchw->lbqhw", self.mask_embed(hs), mask_features)
        boxes = self.box_embed(hs) if self.box_embed is not None else None
        # unbind, not masks[i]: the backward of indexing zero-fills a full [L, B, Q, H/4, W/4] gradient per
        # layer (6 x 78 MB at 512x512); unbind's backward stacks the L per-layer gradients once.
        logits_l, masks_l = logits.unbind(0), masks.unbind(0)
        boxes_l = boxes.unbind(0) if boxes is not None else [None] * len(masks_l)
        outs = [MaskFormerOutput(pred_logits=c, pred_masks=m, pred_boxes=b)
                for c, m, b in zip(logits_l, masks_l, boxes_l, strict=True)]
        out = outs[-1]
        out.aux_outputs = outs[:-1]
        return out
