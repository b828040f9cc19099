"""Load released MaskFormer weights into our model: our own .pt, Hugging Face directories, official .pkl files.

Every path ends in our state-dict layout (documented in models/maskformer.py and models/swin.py) plus the
ModelConfig fields that layout implies, so `build_model(ModelConfig(**meta["model"]), meta["num_classes"])`
followed by `load_into(model, state)` reproduces the released network. Loading is strict: a key that does
not map, or a tensor of the wrong shape, is a UserError naming it, never silently dropped.

Formats:
  ours      a .pt with "model" and "recipe" keys (torch.load with weights_only=True)
  hf        a `save_pretrained` directory of MaskFormerForInstanceSegmentation (config.json + model.safetensors
            or pytorch_model.bin), ResNet or Swin backbone
  official  detectron2 model-zoo .pkl: {"model": {name: ndarray}, "__author__": ...}, read with a restricted
            unpickler (arrays and plain containers only); both head layouts (sem_seg_head.layer_4 ... before
            the pixel decoder became a submodule, sem_seg_head.pixel_decoder.* after)
"""

from __future__ import annotations

import _compat_pickle
import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskformer_cli.errors import UserError

# ------------------------------------------------------------------------------------ restricted unpickling

# Exactly what a detectron2 .pkl of numpy arrays needs. Anything else (os.system, builtins.eval, ...) is a
# global the file has no business importing.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol-5 arrays
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # how protocol-2 pickles carry bytes (the array buffers)
}
_SAFE_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes",
                  "bytearray", "bool"}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str) -> None:
        super().__init__(file, encoding="latin1")  # as detectron2 reads them (Python-2-era pickles)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        # Judge the name Python 3 will actually import (protocol-2 files say __builtin__, copy_reg, ...).
        mod, nm = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        mod = _compat_pickle.IMPORT_MAPPING.get(mod, mod)
        if (mod, nm) in _SAFE_GLOBALS or (mod == "builtins" and nm in _SAFE_BUILTINS):
            return super().find_class(module, name)
        if mod.startswith("numpy") and nm.endswith("DType") and "." not in nm:  # numpy 2 dtype classes
            return super().find_class(module, name)
        raise UserError(
            f"{self.source}: refusing to load '{mod}.{nm}': a weights .pkl should hold only arrays and "
            f"plain containers (this file could run code when unpickled)"
        )


def load_pickle_restricted(path: str | Path) -> Any:
    """Unpickle a detectron2-style .pkl allowing only numpy arrays and plain containers (see _SAFE_GLOBALS)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, str(path)).load()
        except UserError:
            raise
        except Exception as e:  # truncated or not a pickle at all
            raise UserError(f"{path}: not a readable .pkl ({e.__class__.__name__}: {e})") from None


# ------------------------------------------------------------------------------------------- strict load


def _preview(keys: list[str], n: int = 20) -> str:
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_into(model: torch.nn.Module, state_dict: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Copy `state_dict` into `model`, strictly: any missing or unexpected key, or a shape mismatch, raises
    a UserError listing the offending keys (the first 20 and the count). Numpy arrays are accepted."""
    own = model.state_dict()
    # BatchNorm's step counter is bookkeeping, not a weight (it only matters with momentum=None), and
    # most released checkpoints omit it: keep the model's own value when it is absent.
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_preview(unexpected)}")
    tensors = {}
    wrong = []
    for k, v in state_dict.items():
        if k not in own:
            continue
        t = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
        if tuple(t.shape) != tuple(own[k].shape):
            wrong.append(f"{k} {tuple(t.shape)} vs model {tuple(own[k].shape)}")
        tensors[k] = t
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {_preview(wrong)}")
    if problems:
        raise UserError(f"{source}: the weights do not fit the model: " + "; ".join(problems))
    for k in own:
        if k not in tensors and k.endswith("num_batches_tracked"):
            tensors[k] = own[k]
    model.load_state_dict(tensors, strict=True)


# ----------------------------------------------------------------------------------------- entry point


def load_checkpoint_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read any supported checkpoint -> (state dict in our layout, meta).

    meta: {"format": "ours" | "hf" | "official", "model": ModelConfig kwargs, "num_classes": K,
    "classes": [names] or None, and for ours also "recipe" and the checkpoint's other metadata}.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"weights not found: {path}")
    if path.is_dir():
        return _load_hf_dir(path)
    if path.suffix == ".pkl":
        return _load_official(load_pickle_restricted(path), str(path))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
        if _looks_official(state):
            return _load_official({"model": state}, str(path))
        raise UserError(f"{path}: a bare .safetensors file without config; pass its Hugging Face directory")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a readable weights-only torch file ({e.__class__.__name__}: {e})") from None
    if isinstance(ckpt, dict) and "model" in ckpt and "recipe" in ckpt:
        return _load_ours(ckpt, str(path))
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and _looks_official(ckpt["model"]):
        return _load_official(ckpt, str(path))  # a detectron2 training checkpoint (.pth)
    raise UserError(f"{path}: neither a maskformer checkpoint ('model' + 'recipe') nor detectron2 MaskFormer weights")


def _load_ours(ckpt: dict, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = ckpt["model"]
    classes = list(ckpt.get("classes") or [])
    num_classes = len(classes) if classes else infer_model_config(state)[1]
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "scheduler", "scaler", "rng")}
    meta.update(format="ours", model=dict(ckpt["recipe"].get("model", {})), num_classes=num_classes,
                classes=classes or None)
    return state, meta


def _looks_official(state: Mapping[str, Any]) -> bool:
    return any(k.startswith("sem_seg_head.") for k in state)


def _load_official(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise UserError(f"{source}: expected a detectron2 weights file {{'model': {{name: array}}}}")
    if not _looks_official(obj["model"]):
        raise UserError(
            f"{source}: has no 'sem_seg_head.*' weights: it is a backbone-only file (e.g. ImageNet weights); "
            f"use it as model.pretrained=<file> instead"
        )
    state = official_to_maskformer(obj["model"])
    kwargs, num_classes = infer_model_config(state)
    return state, {"format": "official", "model": kwargs, "num_classes": num_classes, "classes": None,
                   "author": obj.get("__author__")}


def _load_hf_dir(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_file}: invalid JSON ({e})") from None
    state = _read_hf_weights(path)
    ours, kwargs, classes = hf_to_maskformer(state, config)
    return ours, {"format": "hf", "model": kwargs, "num_classes": len(classes), "classes": classes}


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    def torch_file(p: Path) -> dict[str, torch.Tensor]:
        try:
            return torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{p}: not a readable weights-only torch file ({e.__class__.__name__}: {e})") from None

    for name, reader in (("model.safetensors", lambda p: load_file(str(p))), ("pytorch_model.bin", torch_file)):
        if (path / name).is_file():
            return reader(path / name)
        index = path / f"{name}.index.json"
        if index.is_file():  # sharded
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(reader(path / shard))
            return state
    raise UserError(f"{path}: no model.safetensors or pytorch_model.bin")


# ----------------------------------------------------------------------------------- Hugging Face -> ours


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


# ------------------------------------------------------------------------------------- official -> ours

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
    if m := re.fullmatch(r"transformer\.encoder\.layers\.(\d+)\.([a-z_0-9]+)\.(.+)", rest):
        if m[2] in _ENC_LAYER:
            return f"pixel_decoder.encoder.layers.{m[1]}.{_ENC_LAYER[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"transformer\.encoder\.norm\.(.+)", rest):
        return f"pixel_decoder.encoder.norm.{m[1]}"
    return original


def _predictor_name(rest: str, original: str) -> str:
    if rest in ("weight", "bias"):  # PerPixelBaselineHead: the predictor is a 1x1 conv classifier
        return f"classifier.{rest}"
    if rest == "query_embed.weight":
        return "query_pos.weight"
    if m := re.fullmatch(r"(input_proj|class_embed)\.(.+)", rest):
        return f"{m[1]}.{m[2]}"
    if m := re.fullmatch(r"mask_embed\.layers\.(\d)\.(.+)", rest):
        return f"mask_embed.layers.{m[1]}.{m[2]}"
    if m := re.fullmatch(r"transformer\.decoder\.layers\.(\d+)\.([a-z_0-9]+)\.(.+)", rest):
        if m[2] in _DEC_LAYER:
            return f"decoder.layers.{m[1]}.{_DEC_LAYER[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"transformer\.decoder\.norm\.(.+)", rest):
        return f"decoder.norm.{m[1]}"
    return original


# ------------------------------------------------------------------------------ architecture from keys


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
