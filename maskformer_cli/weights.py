"""Rebuild a ready-to-run model from any checkpoint a user has: ours (.pt), official (.pkl), or a HF directory.

Our checkpoints carry the resolved recipe and class names, so `evaluate` and `predict` need nothing else.
`load_init_weights` is `train --init-from`: weights only, tensors whose shape differs re-initialised.
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
    """Any checkpoint (ours, official .pkl/.pth/.pt, HF directory) -> an eval-mode model with its recipe.

    With `dataset`, the model's class count must equal the dataset's (a UserError otherwise, before any
    image is read), and class names, things and ignore label come from the dataset. Released weights carry
    no recipe: theirs gets the dataset's task and its single-scale test size (`DatasetInfo.test_size`).
    """
    from maskformer_cli.models.convert import load_checkpoint_weights
    from maskformer_cli.models.strict_load import load_into

    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    state, meta = load_checkpoint_weights(path)  # decides by content, not by file suffix
    info = get_dataset_info(dataset) if dataset else None
    num_classes = int(meta["num_classes"])
    if info is not None and info.num_classes != num_classes:
        raise UserError(f"{path} predicts {num_classes} classes but dataset '{dataset}' has {info.num_classes}: "
                        f"pass the dataset the weights were trained on, or fine-tune with --init-from")
    if meta["format"] == "ours":
        recipe = recipe_from_dict(meta["recipe"])
        classes = tuple(meta.get("classes") or ())
        thing_ids = tuple(meta.get("thing_ids") or ())
        ignore = int(meta.get("ignore_label", 255))
        ds_name = dataset or meta.get("dataset")
        if dataset is not None:
            recipe = replace(recipe, data=replace(recipe.data, dataset=dataset))
    else:
        recipe = Recipe(model=from_dict(ModelConfig, dict(meta.get("model", {}))))
        classes = tuple(meta.get("classes") or ())
        thing_ids = tuple(meta.get("thing_ids") or ())
        ignore, ds_name = 255, dataset
        if info is not None:
            short, long = info.test_size
            task = "panoptic" if info.task == "panoptic" and recipe.model.meta_architecture == "maskformer" \
                else "semantic"
            recipe = replace(recipe, data=replace(recipe.data, dataset=dataset, task=task, test_short_side=short,
                                                  test_max_long_side=long))
            if info.name == "synthetic":
                from maskformer_cli.data.build import with_synthetic_on_disk

                recipe = replace(recipe, data=with_synthetic_on_disk(
                    replace(recipe.data, synthetic_num_classes=info.num_classes)))
    if info is not None:
        classes, thing_ids, ignore = tuple(info.classes), tuple(info.thing_ids), info.ignore_label
    if not classes:
        classes = tuple(f"class_{i}" for i in range(num_classes))
    model = build_model(recipe.model, num_classes)
    load_into(model, state, source=str(path))
    model.to(device).eval()
    return LoadedModel(model=model, recipe=recipe, classes=classes, thing_ids=thing_ids, ignore_label=ignore,
                       dataset=ds_name, sha256=file_hash(path))


def load_for_evaluation(path: Path, device: torch.device, *, dataset: str | None = None,
                        overrides: list[str] | tuple[str, ...] = (), recipe: Recipe | None = None,
                        ) -> tuple[LoadedModel, Recipe, DatasetInfo]:
    """A checkpoint ready to evaluate: its model (`load_for_inference`), the recipe it is evaluated under
    (`recipe`, else its own with inference.* / data.* `overrides`) and that recipe's dataset facts, which
    must have the classes the model predicts."""
    from maskformer_cli.config import override_recipe
    from maskformer_cli.data.build import dataset_info

    loaded = load_for_inference(path, device, dataset=dataset)
    recipe = recipe if recipe is not None else override_recipe(loaded.recipe, overrides)
    if dataset is None and loaded.dataset is None:
        raise UserError(f"{path} does not record its dataset: pass --dataset")
    info = dataset_info(recipe.data)
    if info.num_classes != len(loaded.classes):
        raise UserError(f"the model predicts {len(loaded.classes)} classes, dataset '{info.name}' has "
                        f"{info.num_classes}")
    return loaded, recipe, info


def load_init_weights(model: torch.nn.Module, path: Path) -> list[str]:
    """Fine-tuning start: load weights only; keys whose shapes differ (the class head when K differs) are
    skipped and returned; any other missing or unexpected key is an error."""
    from maskformer_cli.models.convert import load_checkpoint_weights

    state, _meta = load_checkpoint_weights(path)
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if k not in skipped}
    missing = [k for k in own if k not in state and k not in skipped]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not fit this model: missing {missing[:20]} "
                        f"({len(missing)}), unexpected {unexpected[:20]} ({len(unexpected)})")
    own.update(state)
    model.load_state_dict(own)
    return skipped
