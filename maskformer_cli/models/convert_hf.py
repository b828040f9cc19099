"""Hugging Face MaskFormerForInstanceSegmentation state dicts -> our layout (ResNet or Swin backbone).

`hf_to_maskformer` maps every key (names that do not map stay under `hf-unmapped.*`, so the strict
`load_into` reports them), stacks HF's separate q/k/v projections as nn.MultiheadAttention expects, and
checks config.json against the weights and against what our modules compute.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from maskformer_cli.errors import UserError
from maskformer_cli.models.infer_config import infer_model_config


def hf_swin_to_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF MaskFormerSwinBackbone state dict (no prefix) -> official Swin names (our swin.py).

    HF splits the attention input projection into query/key/value; the official qkv Linear stacks them in
    that order along the output dimension. Derived buffers and the unused final LayerNorm are dropped.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    block = re.compile(r"model\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)")
    simple = {
        "layernorm_before": "norm1", "layernorm_after": "norm2",
        "attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
        "attention.self.relative_position_bias_table": "attn.relative_position_bias_table",
    }
    for k, v in sd.items():
        if k.endswith("relative_position_index") or k.startswith("model.layernorm."):
            continue
        if k.startswith("model.embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("model.embeddings.norm."):
            out["patch_embed.norm." + k.rsplit(".", 1)[1]] = v
        elif m := re.fullmatch(r"hidden_states_norms\.(\d+)\.(weight|bias)", k):
            out[f"norm{m[1]}.{m[2]}"] = v
        elif m := re.fullmatch(r"model\.encoder\.layers\.(\d+)\.downsample\.(.+)", k):
            out[f"layers.{m[1]}.downsample.{m[2]}"] = v
        elif m := block.fullmatch(k):
            prefix, rest = f"layers.{m[1]}.blocks.{m[2]}.", m[3]
            if q := re.fullmatch(r"attention\.self\.(query|key|value)\.(weight|bias)", rest):
                qkv.setdefault(f"{prefix}attn.qkv.{q[2]}", {})[q[1]] = v
                continue
            module, _, leaf = rest.rpartition(".")
            if module in simple:
                out[f"{prefix}{simple[module]}.{leaf}"] = v
            elif rest in simple:
                out[f"{prefix}{simple[rest]}"] = v
            else:
                out["hf-unmapped." + k] = v
        else:
            out["hf-unmapped." + k] = v
    for name, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise UserError(f"incomplete attention weights for {name}: have {sorted(parts)}")
        out[name] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def _hf_resnet_to_ours(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        if m := re.fullmatch(r"embedder\.embedder\.(convolution|normalization)\.(.+)", k):
            out["stem.conv1." + ("" if m[1] == "convolution" else "norm.") + m[2]] = v
        elif m := re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(shortcut|layer\.(\d))\.(convolution|normalization)\.(.+)", k):
            conv = "shortcut" if m[3] == "shortcut" else f"conv{int(m[4]) + 1}"
            out[f"res{int(m[1]) + 2}.{m[2]}.{conv}." + ("" if m[5] == "convolution" else "norm.") + m[6]] = v
        else:
            out["hf-unmapped." + k] = v
    return out


def _attention(prefix: str, parts: dict[str, torch.Tensor], into: dict[str, torch.Tensor]) -> None:
    """q/k/v projections -> nn.MultiheadAttention's stacked in_proj (order q, k, v)."""
    for leaf in ("weight", "bias"):
        need = [f"{p}.{leaf}" for p in ("q_proj", "k_proj", "v_proj")]
        if not all(n in parts for n in need):
            raise UserError(f"incomplete attention weights under {prefix}: have {sorted(parts)}")
        into[f"{prefix}.in_proj_{leaf}"] = torch.cat([parts[n] for n in need], dim=0)
    for leaf in ("weight", "bias"):
        src = parts.get(f"o_proj.{leaf}", parts.get(f"out_proj.{leaf}"))
        if src is None:
            raise UserError(f"missing output projection under {prefix}")
        into[f"{prefix}.out_proj.{leaf}"] = src


def hf_to_maskformer(
    hf_state_dict: Mapping[str, torch.Tensor], hf_config: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """A HF MaskFormerForInstanceSegmentation state dict and its config.json (as a dict) ->
    (our state dict, ModelConfig kwargs, class names). Both the current (q_proj/o_proj, mlp.fc1) and the
    older (out_proj, fc1) HF decoder names are accepted."""
    bb_cfg = dict(hf_config.get("backbone_config") or {})
    bb_type = bb_cfg.get("model_type")
    if bb_type not in ("swin", "maskformer-swin", "resnet"):
        raise UserError(f"HF MaskFormer with backbone type '{bb_type}' is not supported (Swin or ResNet only)")
    dec_cfg = dict(hf_config.get("decoder_config") or {})

    backbone, head = {}, {}
    for k, v in hf_state_dict.items():
        if k.startswith("model.pixel_level_module.encoder."):
            backbone[k[len("model.pixel_level_module.encoder."):]] = v
        elif not k.startswith("criterion."):
            head[k] = v
    bb = hf_swin_to_official(backbone) if bb_type != "resnet" else _hf_resnet_to_ours(backbone)
    out = {f"backbone.{k}": v for k, v in bb.items()}

    attn: dict[str, dict[str, torch.Tensor]] = {}
    fpn = {"stem.0": "output_convs.res5", "stem.1": "output_convs.res5.norm"}
    layer_norms = {"self_attn_layer_norm": "self_attn_norm", "encoder_attn_layer_norm": "cross_attn_norm",
                   "final_layer_norm": "ffn_norm", "fc1": "linear1", "fc2": "linear2",
                   "mlp.fc1": "linear1", "mlp.fc2": "linear2"}
    for k, v in head.items():
        module, _, leaf = k.rpartition(".")
        if m := re.fullmatch(r"model\.pixel_level_module\.decoder\.fpn\.(stem\.[01])", module):
            out[f"pixel_decoder.{fpn[m[1]]}.{leaf}"] = v
        elif m := re.fullmatch(r"model\.pixel_level_module\.decoder\.fpn\.layers\.(\d+)\.(proj|block)\.([01])", module):
            # HF lists FPN layers top-down (res4, res3, res2): layer t is the lateral of res(4 - t).
            res = f"res{4 - int(m[1])}"
            kind = "lateral_convs" if m[2] == "proj" else "output_convs"
            out[f"pixel_decoder.{kind}.{res}{'.norm' if m[3] == '1' else ''}.{leaf}"] = v
        elif module == "model.pixel_level_module.decoder.mask_projection":
            out[f"pixel_decoder.mask_features.{leaf}"] = v
        elif module == "model.transformer_module.queries_embedder":
            out[f"query_pos.{leaf}"] = v
        elif module == "model.transformer_module.input_projection":
            out[f"input_proj.{leaf}"] = v
        elif module == "model.transformer_module.decoder.layernorm":
            out[f"decoder.norm.{leaf}"] = v
        elif m := re.fullmatch(r"model\.transformer_module\.decoder\.layers\.(\d+)\.(.+)", module):
            i, sub = m[1], m[2]
            if a := re.fullmatch(r"(self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|o_proj|out_proj)", sub):
                name = "self_attn" if a[1] == "self_attn" else "cross_attn"
                attn.setdefault(f"decoder.layers.{i}.{name}", {})[f"{a[2]}.{leaf}"] = v
            elif sub in layer_norms:
                out[f"decoder.layers.{i}.{layer_norms[sub]}.{leaf}"] = v
            else:
                out["hf-unmapped." + k] = v
        elif module == "class_predictor":
            out[f"class_embed.{leaf}"] = v
        elif m := re.fullmatch(r"mask_embedder\.(\d+)\.0", module):
            out[f"mask_embed.layers.{m[1]}.{leaf}"] = v
        else:
            out["hf-unmapped." + k] = v
    for prefix, parts in attn.items():
        _attention(prefix, parts, out)

    kwargs, num_classes = infer_model_config(out)
    kwargs.update(
        nheads=int(dec_cfg.get("decoder_attention_heads", 8)),
        dropout=float(dec_cfg.get("dropout", 0.1)),
        pre_norm=False,  # HF's DETR decoder is post-norm only
    )
    id2label = hf_config.get("id2label") or {}
    classes = [str(id2label[k]) for k in sorted(id2label, key=int)] if id2label else []
    _check_hf_config(hf_config, bb_cfg, dec_cfg, kwargs, num_classes, len(classes) if classes else None)
    return out, kwargs, classes or [f"class_{i}" for i in range(num_classes)]


def _check_hf_config(
    cfg: Mapping[str, Any], bb: Mapping[str, Any], dec: Mapping[str, Any], kw: Mapping[str, Any],
    num_classes: int, num_labels: int | None,
) -> None:
    """config.json must agree with the weights, and describe a network we compute identically."""
    from maskformer_cli.models.swin import SWIN_VARIANTS

    said = {"num_labels": (num_labels, num_classes),
            "decoder_config.num_queries": (dec.get("num_queries"), kw.get("num_queries")),
            "decoder_config.decoder_layers": (dec.get("decoder_layers"), kw.get("dec_layers")),
            "decoder_config.d_model": (dec.get("d_model"), kw.get("hidden_dim")),
            "decoder_config.decoder_ffn_dim": (dec.get("decoder_ffn_dim"), kw.get("dim_feedforward")),
            "fpn_feature_size": (cfg.get("fpn_feature_size"), kw.get("conv_dim")),
            "mask_feature_size": (cfg.get("mask_feature_size"), kw.get("mask_dim"))}
    if bb.get("model_type") == "resnet":
        depths = {"resnet50": [3, 4, 6, 3], "resnet101": [3, 4, 23, 3]}.get(kw["backbone"])
        said["backbone_config.depths"] = (bb.get("depths"), depths)
    else:
        embed, depths, _, _ = SWIN_VARIANTS[kw["backbone"]]
        said["backbone_config.depths"] = (bb.get("depths"), list(depths))
        said["backbone_config.embed_dim"] = (bb.get("embed_dim"), embed)
    wrong = [f"{k}={a} but the weights have {b}" for k, (a, b) in said.items()
             if a is not None and b is not None and list(np.atleast_1d(a)) != list(np.atleast_1d(b))]
    # Settings our modules do not reproduce: refuse rather than compute something else.
    unsupported = {"backbone_config.layer_type": (bb.get("layer_type", "bottleneck"), "bottleneck"),
                   "backbone_config.downsample_in_bottleneck": (bb.get("downsample_in_bottleneck", False), False),
                   "backbone_config.downsample_in_first_stage": (bb.get("downsample_in_first_stage", False), False),
                   "backbone_config.hidden_act": (bb.get("hidden_act", "relu" if bb.get("model_type") == "resnet"
                                                                else "gelu"),
                                                   "relu" if bb.get("model_type") == "resnet" else "gelu"),
                   "backbone_config.layer_norm_eps": (bb.get("layer_norm_eps", 1e-5), 1e-5),
                   "decoder_config.activation_function": (dec.get("activation_function", "relu"), "relu"),
                   "decoder_config.position_embedding_type": (dec.get("position_embedding_type", "sine"), "sine")}
    wrong += [f"{k}={a!r} is not supported (only {b!r})" for k, (a, b) in unsupported.items() if a != b]
    if wrong:
        raise UserError("Hugging Face config.json: " + "; ".join(wrong))
