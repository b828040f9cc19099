"""Rebuild a ready-to-run model from any checkpoint a user has: ours (.pt), official (.pkl), or a HF directory.

Our checkpoints carry the resolved recipe and class names, so `evaluate` and `predict` need nothing else.
Official and HF weights carry the architecture in their keys / config.json; class names come from the
HF config or from `--dataset`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from maskformer_cli.config import ModelConfig, Recipe, from_dict, recipe_from_dict
from maskformer_cli.data.catalog import DatasetInfo, default_palette, get_dataset_info
from maskformer_cli.errors import UserError
from maskformer_cli.models import build_model


@dataclass
class LoadedModel:
    model: torch.nn.Module
    recipe: Recipe
    classes: tuple[str, ...]
    thing_ids: tuple[int, ...]
    ignore_label: int
    dataset: str | None
    sha256: str

    def info(self) -> DatasetInfo:
        return DatasetInfo(name=self.dataset or "custom", classes=self.classes, ignore_label=self.ignore_label,
                           thing_ids=self.thing_ids, colors=default_palette(len(self.classes)))


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_for_inference(path: Path, device: torch.device, dataset: str | None = None) -> LoadedModel:
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_file() and path.suffix == ".pt":
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file
            raise UserError(f"{path}: not a readable maskformer checkpoint ({e.__class__.__name__}: {e})") from None
        if not isinstance(ckpt, dict) or "model" not in ckpt or "recipe" not in ckpt:
            raise UserError(f"{path}: not a maskformer checkpoint (expected keys 'model' and 'recipe')")
        recipe = recipe_from_dict(ckpt["recipe"])
        classes = tuple(ckpt.get("classes") or ())
        model = build_model(recipe.model, len(classes))
        model.load_state_dict(ckpt["model"])
        thing_ids = tuple(ckpt.get("thing_ids") or ())
        ignore = int(ckpt.get("ignore_label", 255))
        ds_name = dataset or ckpt.get("dataset")
        if dataset is not None:
            recipe = replace(recipe, data=replace(recipe.data, dataset=dataset))
    else:
        from maskformer_cli.models.convert import load_checkpoint_weights

        state, meta = load_checkpoint_weights(path)
        model_kwargs = dict(meta.get("model", {}))
        num_classes = int(meta["num_classes"])
        mcfg = from_dict(ModelConfig, model_kwargs)
        info = get_dataset_info(dataset) if dataset else None
        classes = tuple(meta.get("classes") or (info.classes if info else ()))
        if not classes:
            classes = tuple(f"class_{i}" for i in range(num_classes))
        if len(classes) != num_classes:
            raise UserError(f"{path} predicts {num_classes} classes but dataset '{dataset}' has {len(classes)}")
        model = build_model(mcfg, num_classes)
        from maskformer_cli.models.convert import load_into

        load_into(model, state)
        recipe = Recipe(model=mcfg)
        if dataset:
            recipe = replace(recipe, data=replace(recipe.data, dataset=dataset))
        thing_ids = tuple(info.thing_ids) if info else tuple(meta.get("thing_ids") or ())
        ignore = info.ignore_label if info else 255
        ds_name = dataset
    model.to(device).eval()
    return LoadedModel(model=model, recipe=recipe, classes=classes, thing_ids=thing_ids, ignore_label=ignore,
                       dataset=ds_name, sha256=file_hash(path))
