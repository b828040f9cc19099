"""Load released MaskFormer weights into our model: our own .pt, Hugging Face directories, official .pkl files.

Every path ends in our state-dict layout (documented in models/maskformer.py and models/swin.py) plus the
ModelConfig fields that layout implies, so `build_model(ModelConfig(**meta["model"]), meta["num_classes"])`
followed by `strict_load.load_into(model, state)` reproduces the released network. Loading is strict: a key that does
not map, or a tensor of the wrong shape, is a UserError naming it, never silently dropped.

Formats:
  ours      a .pt with "model" and "recipe" keys (torch.load with weights_only=True)
  hf        a `save_pretrained` directory of MaskFormerForInstanceSegmentation (config.json + model.safetensors
            or pytorch_model.bin), ResNet or Swin backbone
  official  detectron2 model-zoo .pkl: {"model": {name: ndarray}, "__author__": ...}, read with a restricted
            unpickler (arrays and plain containers only); both head layouts (sem_seg_head.layer_4 ... before
            the pixel decoder became a submodule, sem_seg_head.pixel_decoder.* after)

This module reads files (strict_load.py loads them); the mappings live beside it: convert_hf.py (HF names),
convert_official.py (detectron2 names), infer_config.py (architecture from keys), pickle_safe.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from maskformer_cli.errors import UserError
from maskformer_cli.models.convert_hf import hf_to_maskformer
from maskformer_cli.models.convert_official import official_to_maskformer
from maskformer_cli.models.infer_config import infer_model_config
from maskformer_cli.models.pickle_safe import load_pickle_restricted, load_torch_weights_only

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
        if not (path / "config.json").is_file() and (path / "checkpoints").is_dir():
            raise UserError(f"{path} is a training run directory: pass one of its checkpoints, e.g. "
                            f"{path / 'checkpoints' / 'last.pt'} or best.pt")
        return _load_hf_dir(path)
    if path.suffix in (".json", ".yaml", ".yml", ".txt"):
        hint = (f"pass the Hugging Face directory {path.parent}" if path.name == "config.json"
                else "pass a checkpoint (.pt, .pth, .pkl) or a Hugging Face directory")
        raise UserError(f"{path} is a {path.suffix[1:]} file, not weights: {hint}")
    if path.suffix == ".pkl":
        return _load_official(load_pickle_restricted(path), str(path))
    if path.suffix == ".safetensors":
        state = _read_safetensors(path)
        if _looks_official(state):
            return _load_official({"model": state}, str(path))
        raise UserError(f"{path}: a bare .safetensors file without config; pass its Hugging Face directory")
    ckpt = _read_torch_file(path)
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


def _read_torch_file(path: Path) -> Any:
    return load_torch_weights_only(path, what="weights file")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError: truncated download, not a safetensors file
        raise UserError(f"{path}: not a readable safetensors file, possibly an incomplete download "
                        f"({e.__class__.__name__}: {e})") from None


def _looks_official(state: Mapping[str, Any]) -> bool:
    return any(k.startswith("sem_seg_head.") for k in state)


def _refuse_mask2former(keys: Any, source: str) -> None:
    """Mask2Former (the follow-up paper) shares MaskFormer's file formats; its weights otherwise fail the strict
    load with a list of dozens of keys. Its decoder has masked-attention layers that MaskFormer lacks."""
    if any("transformer_cross_attention_layers" in k or "masked_attention" in k or "mask2former" in k.lower()
           for k in keys):
        raise UserError(f"{source}: these are Mask2Former weights; this tool implements MaskFormer (its "
                        f"decoder has no masked attention). Use a MaskFormer checkpoint")


def _load_official(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise UserError(f"{source}: expected a detectron2 weights file {{'model': {{name: array}}}}")
    _refuse_mask2former(obj["model"].keys(), source)
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
    model_type = config.get("model_type")
    if model_type is not None and model_type != "maskformer":
        if model_type == "mask2former":
            _refuse_mask2former(["mask2former"], str(path))
        raise UserError(f"{path}: a Hugging Face '{model_type}' model; this tool loads MaskFormer "
                        f"(model_type 'maskformer') directories")
    state = _read_hf_weights(path)
    ours, kwargs, classes = hf_to_maskformer(state, config)
    return ours, {"format": "hf", "model": kwargs, "num_classes": len(classes), "classes": classes}


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    for name, reader in (("model.safetensors", _read_safetensors), ("pytorch_model.bin", _read_torch_file)):
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
