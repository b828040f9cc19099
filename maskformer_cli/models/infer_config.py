"""The architecture a state dict in our layout describes: ModelConfig kwargs and the number of classes.

Released checkpoints carry weights, not configs; the keys and shapes tell the backbone, the pixel decoder,
queries, layers and widths. What weights cannot tell is taken as the paper's values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from maskformer_cli.errors import UserError


def _count(state: Mapping[str, Any], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m[1] for k in state if (m := rx.match(k))})


def infer_model_config(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], int]:
    """Our-layout state dict -> (ModelConfig kwargs that rebuild it, number of classes K).

    Not recoverable from weights (taken as the paper's values): nheads=8, pre_norm=False, dropout=0.1.
    """
    from maskformer_cli.models.swin import SWIN_VARIANTS

    kw: dict[str, Any] = {}
    if "backbone.patch_embed.proj.weight" in state:
        embed = state["backbone.patch_embed.proj.weight"].shape[0]
        depths = tuple(_count(state, rf"backbone\.layers\.{i}\.blocks\.(\d+)\.") for i in range(4))
        tables = [state.get(f"backbone.layers.{i}.blocks.0.attn.relative_position_bias_table") for i in range(4)]
        if any(t is None for t in tables):
            raise UserError("Swin weights without relative position bias tables: cannot tell the architecture")
        heads = tuple(t.shape[1] for t in tables)
        window = (round(tables[0].shape[0] ** 0.5) + 1) // 2
        name = next((n for n, (e, d, h, _) in SWIN_VARIANTS.items() if (e, d, h) == (embed, depths, heads)), None)
        if name is None:
            raise UserError(f"Swin with embed_dim={embed}, depths={depths}, heads={heads} is not one of "
                            f"{', '.join(SWIN_VARIANTS)}")
        kw["backbone"] = name
        if window != SWIN_VARIANTS[name][3]:
            kw["swin_window_size"] = window
    elif "backbone.stem.conv1.weight" in state:
        deep_stem = "backbone.stem.conv2.weight" in state
        res4 = _count(state, r"backbone\.res4\.(\d+)\.")
        names = {(False, 6): "resnet50", (False, 23): "resnet101", (True, 23): "resnet101c"}
        if (deep_stem, res4) not in names:
            raise UserError(f"ResNet with {res4} res4 blocks{' and a deep stem' if deep_stem else ''} is not "
                            f"one of resnet50, resnet101, resnet101c")
        kw["backbone"] = names[(deep_stem, res4)]
    elif any(k.startswith("backbone.body.") for k in state):
        raise UserError("weights of a timm backbone: the timm model name is not recorded in the weights")
    else:
        raise UserError("no backbone weights found (expected backbone.patch_embed.* or backbone.stem.*)")

    if "pixel_decoder.mask_features.weight" not in state:
        raise UserError("no pixel decoder weights found (pixel_decoder.mask_features.*)")
    mf = state["pixel_decoder.mask_features.weight"]
    kw.update(mask_dim=mf.shape[0], conv_dim=mf.shape[1], mask_feature_kernel=mf.shape[-1])
    if "pixel_decoder.input_proj.weight" in state:
        kw["pixel_decoder"] = "transformer_encoder_fpn"
        kw["encoder_layers"] = _count(state, r"pixel_decoder\.encoder\.layers\.(\d+)\.")
        enc_ffn = state.get("pixel_decoder.encoder.layers.0.linear1.weight")
        if enc_ffn is not None:
            kw["dim_feedforward"] = enc_ffn.shape[0]
    else:
        kw["pixel_decoder"] = "fpn"

    if "classifier.weight" in state:
        kw["meta_architecture"] = "per_pixel_baseline"
        return kw, state["classifier.weight"].shape[0]
    if "query_pos.weight" not in state:
        raise UserError("no transformer decoder weights found (query_pos.weight)")
    n, c = state["query_pos.weight"].shape
    kw.update(num_queries=n, hidden_dim=c, dec_layers=_count(state, r"decoder\.layers\.(\d+)\."))
    ffn = state.get("decoder.layers.0.linear1.weight")
    if ffn is not None:
        kw["dim_feedforward"] = ffn.shape[0]
    kw["dec_self_attn"] = "decoder.layers.0.self_attn.in_proj_weight" in state
    proj = state.get("input_proj.weight")
    kw["enforce_input_project"] = proj is not None and proj.shape[1] == c
    kw["box_head"] = "box_embed.layers.0.weight" in state
    if "class_embed.weight" not in state:
        kw["meta_architecture"] = "per_pixel_baseline_plus"
        return kw, n
    kw["meta_architecture"] = "maskformer"
    return kw, state["class_embed.weight"].shape[0] - 1
