"""Official (detectron2) MaskFormer weights -> our layout: a renaming, key by key.

Both head layouts are read: `sem_seg_head.layer_4 ...` (before the pixel decoder became a submodule) and
`sem_seg_head.pixel_decoder.*` (after).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

_DEC_LAYER = {"self_attn": "self_attn", "multihead_attn": "cross_attn", "norm1": "self_attn_norm",
              "norm2": "cross_attn_norm", "norm3": "ffn_norm", "linear1": "linear1", "linear2": "linear2"}
_ENC_LAYER = {"self_attn": "self_attn", "norm1": "self_attn_norm", "norm2": "ffn_norm",
              "linear1": "linear1", "linear2": "linear2"}


def official_to_maskformer(pkl_model_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The "model" dict of an official MaskFormer .pkl/.pth -> our state dict (tensors).

    Keys that have no counterpart stay under their official name, so `load_into` reports them.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in pkl_model_dict.items():
        t = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(v))
        if k.startswith("criterion.") or k in ("pixel_mean", "pixel_std") or k.endswith(
            ("relative_position_index", "attn_mask", "num_batches_tracked")
        ):
            continue  # loss buffers and derived buffers, rebuilt by our modules
        out[_official_name(k)] = t
    return out


def _official_name(k: str) -> str:
    if k.startswith("backbone."):
        return k
    if k.startswith("sem_seg_head.predictor."):
        return _predictor_name(k[len("sem_seg_head.predictor."):], k)
    if k.startswith("sem_seg_head."):
        rest = k[len("sem_seg_head."):]
        if rest.startswith("pixel_decoder."):
            rest = rest[len("pixel_decoder."):]
        return _pixel_decoder_name(rest, k)
    return k


def _pixel_decoder_name(rest: str, original: str) -> str:
    if m := re.fullmatch(r"adapter_(\d)\.(.+)", rest):
        return f"pixel_decoder.lateral_convs.res{int(m[1]) + 1}.{m[2]}"
    if m := re.fullmatch(r"layer_(\d)\.(.+)", rest):
        return f"pixel_decoder.output_convs.res{int(m[1]) + 1}.{m[2]}"
    if m := re.fullmatch(r"(mask_features|input_proj)\.(.+)", rest):
        return f"pixel_decoder.{m[1]}.{m[2]}"
    return _transformer_name(rest, "encoder", _ENC_LAYER, "pixel_decoder.encoder") or original


def _predictor_name(rest: str, original: str) -> str:
    if rest in ("weight", "bias"):  # PerPixelBaselineHead: the predictor is a 1x1 conv classifier
        return f"classifier.{rest}"
    if rest == "query_embed.weight":
        return "query_pos.weight"
    if m := re.fullmatch(r"(input_proj|class_embed)\.(.+)", rest):
        return f"{m[1]}.{m[2]}"
    if m := re.fullmatch(r"mask_embed\.layers\.(\d)\.(.+)", rest):
        return f"mask_embed.layers.{m[1]}.{m[2]}"
    return _transformer_name(rest, "decoder", _DEC_LAYER, "decoder") or original


def _transformer_name(rest: str, part: str, layer_names: Mapping[str, str], ours: str) -> str | None:
    """transformer.{part}.layers.i.<module>.* and transformer.{part}.norm.* under our prefix `ours`."""
    if m := re.fullmatch(rf"transformer\.{part}\.layers\.(\d+)\.([a-z_0-9]+)\.(.+)", rest):
        if m[2] in layer_names:
            return f"{ours}.layers.{m[1]}.{layer_names[m[2]]}.{m[3]}"
    if m := re.fullmatch(rf"transformer\.{part}\.norm\.(.+)", rest):
        return f"{ours}.norm.{m[1]}"
    return None
