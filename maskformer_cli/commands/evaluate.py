"""`maskformer evaluate`: metrics of a checkpoint (or of saved predictions) on a dataset split."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskformer_cli import distributed as dist
from maskformer_cli.errors import UserError
from maskformer_cli.metrics_cityscapes import LABEL_IDS_DIR, LabelIdWriter
from maskformer_cli.postprocess import channels_last_default
from maskformer_cli.precision import check_precision
from maskformer_cli.reporting import (
    console,
    metrics_table,
    per_class_table,
    progress_bar,
    write_csv,
)
from maskformer_cli.saved_predictions import METRIC_CHOICES, METRICS, evaluate_saved_predictions

# `--metric cityscapes`: our mIoU and, through cityscapesscripts, the benchmark's class / category IoU and iIoU
OFFICIAL = "cityscapes"
INFERENCE = ("semantic", "general", "iterative", "panoptic")


def _metrics_for(metric: str, task: str, mask_classification: bool, tta: bool = False) -> tuple[str, ...]:
    """The metrics `--metric` names for this dataset task and model; PQ only where it means something.

    Test-time augmentation averages per-pixel class probabilities, which leaves no segments to match, so it
    applies to mIoU and PQ-stuff; under `all` PQ is still computed, single-scale (as the paper reports it).
    """
    if metric == "all":
        chosen = ("miou", "pq-stuff") + (("pq",) if task == "panoptic" and mask_classification else ())
        return chosen
    if metric not in METRICS:
        raise UserError(f"--metric {metric!r}: choose {METRIC_CHOICES}")
    if metric == "pq" and task != "panoptic":
        raise UserError("--metric pq needs a panoptic dataset (instance-level ground truth); use pq-stuff for "
                        "semantic datasets")
    if metric == "pq" and not mask_classification:
        raise UserError("--metric pq needs a mask-classification model; per-pixel baselines give semantic maps")
    if metric == "pq" and tta:
        raise UserError("test-time augmentation is for semantic metrics; PQ is single-scale: drop --tta, or use "
                        "--metric miou / pq-stuff / all (all computes PQ single-scale beside them)")
    return METRICS[metric]


def default_out(checkpoint: Path | None, split: str) -> Path:
    if checkpoint is not None and checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / "eval" / f"{checkpoint.stem}_{split}"
    return Path("eval") / split


def run_evaluate(checkpoint: Path | None, *, dataset: str | None, split: str, metric: str, inference: str | None,
                 tta: bool, predictions: Path | None, out: Path | None, per_class: bool, batch_size: int,
                 limit: int | None, device: str, query_stats: bool = False,
                 overrides: list[str] | tuple[str, ...] = (), precision: str = "fp32") -> dict[str, Any]:
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {batch_size})")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1 (got {limit}); leave it out to evaluate the whole split")
    if overrides and checkpoint is None:
        raise UserError("key=value overrides change how a checkpoint is evaluated: give a checkpoint")
    if query_stats and checkpoint is None:
        raise UserError("--query-stats needs a checkpoint (it runs the model's queries over the split)")
    check_precision(precision)
    official = metric == OFFICIAL
    if official:
        metric = "miou"
        if tta or query_stats:
            raise UserError("--metric cityscapes scores single-scale label maps: drop --tta / --query-stats")
    if inference is not None and inference not in INFERENCE:
        raise UserError(f"--inference {inference!r}: choose one of {', '.join(INFERENCE)}")
    out = out or default_out(checkpoint, split)  # computed first: the Cityscapes labelIds are written into it
    if predictions is not None:
        if checkpoint is not None:
            raise UserError("give a checkpoint to evaluate or --predictions DIR, not both (saved predictions "
                            "are evaluated without a model)")
        if dataset is None:
            raise UserError("--predictions needs --dataset (the ground truth to compare with)")
        if official:
            from maskformer_cli.data.catalog import get_dataset_info

            _require_cityscapes(get_dataset_info(dataset))
        metrics = evaluate_saved_predictions(predictions, dataset=dataset, split=split, metric=metric,
                                             limit=limit)
        if official:
            _merge_official(metrics, _official_of_saved(predictions, dataset=dataset, split=split, limit=limit))
        meta = {"predictions": str(predictions)}
    else:
        if checkpoint is None:
            raise UserError("give a checkpoint to evaluate, or --predictions DIR --dataset NAME")
        dinfo = dist.init_distributed(device)
        finished = False
        try:
            metrics, meta = _evaluate_checkpoint(checkpoint, dataset=dataset, split=split, metric=metric,
                                                 inference=inference, tta=tta, batch_size=batch_size,
                                                 limit=limit, device=dinfo.device, overrides=overrides,
                                                 precision=precision,
                                                 label_ids_dir=out / LABEL_IDS_DIR if official else None)
            finished = True
        finally:
            dist.cleanup(sync=finished)
        if not dinfo.is_main:
            return metrics
    out.mkdir(parents=True, exist_ok=True)
    rows = metrics.pop("per_class", None) or []
    (out / "metrics.json").write_text(json.dumps({**meta, **metrics}, indent=2, default=float))
    if rows:
        write_csv(rows, out / "per_class.csv")
    if per_class and rows:
        console.print(per_class_table(rows))
    console.print(metrics_table(metrics, title=f"{meta.get('dataset', dataset)} / {split}"))
    console.print(f"wrote {out / 'metrics.json'}" + (f" and {out / 'per_class.csv'}" if rows else ""))
    if query_stats:
        from maskformer_cli.query_analysis import analyze_checkpoint

        analyze_checkpoint(checkpoint, out=out, split=split, device=device, limit=limit, dataset=dataset)
        console.print(f"wrote {out / 'query_categories.json'} and {out / 'query_categories.png'}")
    return metrics


def _evaluate_checkpoint(checkpoint: Path, *, dataset, split, metric, inference, tta, batch_size, limit, device,
                         overrides=(), precision: str = "fp32", label_ids_dir: Path | None = None):
    """Metrics and run facts of a checkpoint on a split; with `label_ids_dir` (a Cityscapes model) the label
    maps are also written there as labelId PNGs and scored by cityscapesscripts (see metrics_cityscapes)."""
    from maskformer_cli.data.build import build_eval_loader
    from maskformer_cli.engine import evaluate
    from maskformer_cli.models.flops import count_flops
    from maskformer_cli.postprocess import build_postprocessor
    from maskformer_cli.weights import load_for_evaluation

    loaded, recipe, info = load_for_evaluation(checkpoint, device, dataset=dataset, overrides=overrides)
    mask_cls = recipe.model.meta_architecture == "maskformer"
    task = recipe.data.task if info.task == "panoptic" else "semantic"
    if metric == "pq" and info.task == "panoptic":
        task = "panoptic"
    recipe = replace(recipe, data=replace(recipe.data, task=task))
    metrics_wanted = _metrics_for(metric, task, mask_cls, tta=tta)
    # --tta forces TTA on; without it the recipe decides (inference.tta=true, or a recipe trained with it)
    pp = build_postprocessor(recipe.inference, info, mode=inference, tta=True if tta else None,
                             precision=precision, channels_last=channels_last_default(device))
    if pp.tta and "pq" in metrics_wanted and dist.is_main():
        console.print("[yellow]note:[/] test-time augmentation applies to mIoU and PQ-stuff; PQ is single-scale "
                      "(as the paper reports it)", highlight=False)
    if inference == "panoptic" and "pq" not in metrics_wanted:
        raise UserError("--inference panoptic produces panoptic segments: use --metric pq")
    official = None
    if label_ids_dir is not None:
        _require_cityscapes(info)
        official = LabelIdWriter(label_ids_dir)
    loader = build_eval_loader(recipe.data, info, split=split, batch_size=batch_size, rank=dist.get_rank(),
                               world_size=dist.get_world_size(), limit=limit, task=task)
    total = len(loader.dataset)
    t0 = time.perf_counter()
    with progress_bar("evaluate", total, enabled=dist.is_main()) as bar:
        task_id = bar.add_task("evaluate", total=total)
        metrics = evaluate(loaded.model, loader, metrics_wanted, pp, device=device, class_names=info.classes,
                           on_batch=lambda n: bar.advance(task_id, n * dist.get_world_size()),
                           on_prediction=official)
    seconds = time.perf_counter() - t0
    if official is not None:
        _merge_official(metrics, official.scores())
    params = sum(p.numel() for p in loaded.model.parameters())
    h = w = recipe.data.test_short_side or recipe.data.crop_size[0]
    flops = count_flops(loaded.model, torch.zeros(1, 3, h, w, device=device))
    metrics.update({"images_per_s": metrics["num_images"] / max(seconds, 1e-9), "params_M": params / 1e6,
                    "gflops": flops / 1e9})
    meta = {"checkpoint": str(checkpoint), "checkpoint_sha256": loaded.sha256, "dataset": info.name,
            "split": split, "inference": pp.mode, "tta": pp.tta, "precision": precision,
            "metrics": list(metrics_wanted), "tta_metrics": [m for m in metrics_wanted if m != "pq"] if pp.tta else [],
            "recipe": json.loads(json.dumps(_plain(recipe)))}
    return metrics, meta


def _merge_official(metrics: dict[str, Any], official: dict[str, Any]) -> None:
    """Add the official Cityscapes scores to `metrics`; their per-class iIoU joins the per-class rows."""
    per_class = official.pop("per_class_official", {})
    metrics.update(official)
    for row in metrics.get("per_class") or []:
        if row.get("name") in per_class:
            row["iIoU"] = per_class[row["name"]][1]


def _require_cityscapes(info):
    if info.name != "cityscapes":
        raise UserError(f"--metric cityscapes is the Cityscapes benchmark's scoring; dataset '{info.name}' is "
                        "not Cityscapes (use miou / pq-stuff)")
    return info


def _official_of_saved(pred_dir: Path, *, dataset: str, split: str, limit: int | None) -> dict[str, Any]:
    """The official Cityscapes scores of `maskformer predict` output: labelIds/ PNGs (predict --dataset
    cityscapes) when present, else the trainId label maps converted to labelIds in a temporary folder."""
    import tempfile

    from PIL import Image

    from maskformer_cli.data.catalog import dataset_dir, get_dataset_info
    from maskformer_cli.metrics_cityscapes import frame_key, ground_truth_pairs, official_scores, to_label_ids

    info = _require_cityscapes(get_dataset_info(dataset))
    if split not in info.sem_seg:
        raise UserError(f"Cityscapes has no labelled split '{split}' (train, val)")
    gt_files = ground_truth_pairs(dataset_dir(info) / info.sem_seg[split][1], limit)
    keys = {frame_key(g.name) for g in gt_files}
    label_ids = pred_dir / LABEL_IDS_DIR
    if label_ids.is_dir():
        return official_scores({frame_key(p.stem): p for p in label_ids.glob("*.png")}, gt_files)
    with tempfile.TemporaryDirectory() as tmp:
        preds = {}
        for key in sorted(keys):
            found = [p for p in (*pred_dir.glob(f"{key}*.png"), *(pred_dir / "labels").glob(f"{key}*.png"))]
            if found:
                with Image.open(found[0]) as im:
                    preds[key] = Path(tmp) / found[0].name
                    Image.fromarray(to_label_ids(np.array(im))).save(preds[key])
        return official_scores(preds, gt_files)


def _plain(recipe):
    from maskformer_cli.config import to_dict

    return to_dict(recipe)
