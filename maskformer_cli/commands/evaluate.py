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

METRICS = {"miou": ("miou",), "pq": ("pq",), "pq-stuff": ("pq-stuff",)}
# `--metric cityscapes`: our mIoU and, through cityscapesscripts, the benchmark's class / category IoU and iIoU
OFFICIAL = "cityscapes"
METRIC_CHOICES = "miou, pq, pq-stuff, cityscapes or all"
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


# ------------------------------------------------------------------------------------- saved predictions


def evaluate_saved_predictions(pred_dir: Path, *, dataset: str, split: str, metric: str,
                               limit: int | None = None) -> dict[str, Any]:
    """Metrics of predictions written by `maskformer predict` (label PNGs named by image stem, or a COCO
    panoptic JSON + PNGs with dataset category ids) against the dataset's ground truth.

    `all` computes every metric the directory allows: PQ from panoptic.json, mIoU and PQ-stuff from label
    PNGs (`predict --task panoptic` writes both). One Evaluator holds them, so `per_class` has one row per
    class with the semantic (IoU, Acc, *_stuff) and panoptic (PQ, SQ, RQ, TP, FP, FN) columns side by side.
    """
    from maskformer_cli.data.catalog import dataset_dir, get_dataset_info
    from maskformer_cli.engine import Evaluator

    if metric != "all" and metric not in METRICS:
        raise UserError(f"--metric {metric!r}: choose {METRIC_CHOICES}")
    info = get_dataset_info(dataset)
    base = dataset_dir(info)
    if not pred_dir.is_dir():
        raise UserError(f"--predictions {pred_dir}: not a directory")
    pan_json = pred_dir / "panoptic.json"
    with_pq = metric in ("pq", "all") and pan_json.exists() and split in info.panoptic
    if metric == "pq" and not with_pq:
        raise UserError(f"--metric pq needs {pan_json} (COCO panoptic predictions)")
    has_labels = any((pred_dir / "labels").glob("*.png")) or any(pred_dir.glob("*.png"))
    # semantic ground truth: the label PNGs, or else the category map of the panoptic segments (a custom
    # dataset may have only a `panoptic:` section, as training and `evaluate CKPT` allow)
    has_sem_gt = split in info.sem_seg or split in info.panoptic
    # under `all`, semantic metrics join PQ only when there are label maps to score (and ground truth for them)
    with_sem = metric in ("miou", "pq-stuff") or (metric == "all" and (
        not with_pq or (has_labels and has_sem_gt)))
    sem_wanted = (("miou", "pq-stuff") if metric == "all" else METRICS[metric]) if with_sem else ()
    if sem_wanted and not has_sem_gt:
        splits = ", ".join(sorted(set(info.sem_seg) | set(info.panoptic))) or "none"
        raise UserError(f"dataset '{dataset}' has no semantic split '{split}' (has {splits})")
    ev = Evaluator((("pq",) if with_pq else ()) + sem_wanted, info.num_classes, info.ignore_label,
                   info.thing_ids, info.classes)
    counts = []
    if with_pq:
        counts.append(_eval_saved_panoptic(ev, pred_dir, pan_json, info, base, split, limit))
    if sem_wanted:
        counts.append(_eval_saved_semantic(ev, pred_dir, info, base, split, limit))
    ev.num_images = counts[0]
    res = ev.compute()
    if len(counts) == 2 and counts[1] != counts[0]:  # label maps and panoptic.json cover different images
        res["num_images_semantic"] = counts[1]
    return res


def _eval_saved_semantic(ev, pred_dir: Path, info, base: Path, split: str, limit: int | None) -> int:
    """Add the label PNGs of `pred_dir` to `ev`'s semantic metrics; returns the number of images."""
    from PIL import Image

    if split not in info.sem_seg:
        return _eval_saved_semantic_from_panoptic(ev, pred_dir, info, base, split, limit)
    _, label_dir = info.sem_seg[split]
    suffix_from, suffix_to = info.label_suffix
    # every label below the folder (Cityscapes keeps them in per-city folders), and only the label maps when
    # the dataset names them by suffix (beside *_labelTrainIds.png lie *_labelIds.png, *_color.png, ...)
    gt_files = sorted((base / label_dir).rglob(f"*{suffix_to}.png"))[:limit]
    if not gt_files:
        raise UserError(f"no ground-truth labels (*{suffix_to}.png) in {base / label_dir} or its sub-folders")
    missing = []
    with progress_bar("evaluate", len(gt_files)) as bar:
        task = bar.add_task("evaluate", total=len(gt_files))
        for gt_file in gt_files:
            stem = gt_file.stem
            if suffix_to and stem.endswith(suffix_to):
                stem = stem[: -len(suffix_to)] + suffix_from
            pred_file = _find_prediction(pred_dir, stem)
            if pred_file is None:
                missing.append(gt_file.name)
                continue
            with Image.open(pred_file) as im:
                pred = torch.from_numpy(np.array(im).astype(np.int64))
            with Image.open(gt_file) as im:
                gt = torch.from_numpy(np.array(im).astype(np.int64))
            if pred.shape != gt.shape:
                raise UserError(f"{pred_file}: size {tuple(pred.shape)} differs from ground truth {tuple(gt.shape)}")
            ev.update_semantic(pred, gt)
            bar.advance(task)
    if missing:
        raise UserError(f"{len(missing)} ground-truth images have no prediction in {pred_dir} "
                        f"(first: {', '.join(missing[:5])})")
    return len(gt_files)


def _eval_saved_semantic_from_panoptic(ev, pred_dir: Path, info, base: Path, split: str,
                                       limit: int | None) -> int:
    """As _eval_saved_semantic, with the ground-truth category maps taken from the panoptic JSON + PNGs
    (as PanopticSegDataset(semantic=True) and engine.load_semantic_gt make them: crowd segments keep
    their class, void and unlisted segment ids are ignore). Predictions are matched by image file stem."""
    from PIL import Image

    from maskformer_cli.data.datasets import PanopticSegDataset, read_panoptic_ids
    from maskformer_cli.data.prefetch import prefetched

    image_dir, gt_json, gt_png_dir = info.panoptic[split]
    json_path = base / gt_json
    # the dataset class reads and checks the JSON (images, annotations, category ids) as training does
    gt = PanopticSegDataset(base / image_dir, json_path, base / gt_png_dir, dataset_ids=info.dataset_ids,
                            ignore_label=info.ignore_label)
    pairs = gt.items[:limit]
    if not pairs:
        raise UserError(f"no ground-truth annotations in {json_path}")
    to_contiguous = gt.contiguous
    items, missing = [], []
    for image, ann in pairs:
        pred_file = _find_prediction(pred_dir, Path(image["file_name"]).stem)  # predict: labels/<stem>.png
        if pred_file is None:
            missing.append(image["file_name"])
        else:
            items.append((pred_file, ann))
    if missing:
        raise UserError(f"{len(missing)} ground-truth images have no prediction in {pred_dir} "
                        f"(first: {', '.join(missing[:5])})")

    def read_pair(item: tuple[Path, dict]) -> tuple[Path, torch.Tensor, torch.Tensor]:
        pred_file, ann = item
        with Image.open(pred_file) as im:
            pred = torch.from_numpy(np.array(im).astype(np.int64))
        ids = read_panoptic_ids(base / gt_png_dir / ann["file_name"])
        return pred_file, pred, _panoptic_category_map(ids, ann, to_contiguous, info.ignore_label, json_path)

    with progress_bar("evaluate", len(items)) as bar:
        task = bar.add_task("evaluate", total=len(items))
        for pred_file, pred, gt in prefetched(read_pair, items):
            if pred.shape != gt.shape:
                raise UserError(f"{pred_file}: size {tuple(pred.shape)} differs from ground truth {tuple(gt.shape)}")
            ev.update_semantic(pred, gt)
            bar.advance(task)
    return len(items)


def _panoptic_category_map(ids: torch.Tensor, ann: dict, to_contiguous: dict[int, int], ignore_label: int,
                           json_path: Path) -> torch.Tensor:
    """[H, W] contiguous categories of a segment-id map: each listed segment's class (crowd included),
    ignore_label for void (0) and ids that segments_info does not list."""
    from maskformer_cli.data.datasets import segments_to_categories

    segments = []
    for seg in ann["segments_info"]:
        cls = to_contiguous.get(int(seg["category_id"]))
        if cls is None:
            raise UserError(f"{json_path}: segment {seg['id']} of {ann['file_name']} has category "
                            f"{seg['category_id']}, which the dataset does not list")
        segments.append({"id": seg["id"], "category_id": cls})
    return segments_to_categories(ids, segments, ignore_label)


def _find_prediction(pred_dir: Path, stem: str) -> Path | None:
    for cand in (pred_dir / f"{stem}.png", pred_dir / "labels" / f"{stem}.png"):
        if cand.exists():
            return cand
    return None


def _eval_saved_panoptic(ev, pred_dir: Path, pan_json: Path, info, base: Path, split: str,
                         limit: int | None) -> int:
    """Add panoptic.json + panoptic/*.png of `pred_dir` to `ev`'s PQ; returns the number of images."""
    from maskformer_cli.data.datasets import read_panoptic_ids
    from maskformer_cli.data.prefetch import prefetched

    _, gt_json, gt_png_dir = info.panoptic[split]
    gt = json.loads((base / gt_json).read_text())
    pred_anns = json.loads(pan_json.read_text())["annotations"]
    to_contiguous = {d: i for i, d in enumerate(info.dataset_ids)} if info.dataset_ids else None

    def segs(ann: dict) -> list[dict]:
        out = []
        for s in ann["segments_info"]:
            cid = to_contiguous[s["category_id"]] if to_contiguous else s["category_id"]
            out.append({**s, "category_id": cid})
        return out

    anns = gt["annotations"][:limit]
    match = _match_panoptic_predictions(anns, pred_anns, pan_json)

    def read_pair(ann: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return (read_panoptic_ids(pred_dir / "panoptic" / match[id(ann)]["file_name"]),
                read_panoptic_ids(base / gt_png_dir / ann["file_name"]))

    # PNG decoding dominates: decode ahead in threads while the metric update runs here.
    for ann, (pred_ids, gt_ids) in zip(anns, prefetched(read_pair, anns), strict=True):
        pred = match[id(ann)]
        try:
            ev.update_panoptic(pred_ids, segs(pred), gt_ids, segs(ann))
        except ValueError as e:  # the PNG and the JSON's segments_info disagree: a file problem, not a bug
            raise UserError(f"{pred_dir / 'panoptic' / pred['file_name']}: {e} (its entry in {pan_json})") from None
    return len(anns)


def _match_panoptic_predictions(anns: list[dict], pred_anns: list[dict], pan_json: Path) -> dict[int, dict]:
    """The prediction of each ground-truth annotation (keyed by id(ann)). As panopticapi: by image_id, the
    PNG named by the prediction's own file_name. When the predictions' image_ids are not the dataset's
    (`maskformer predict` over a folder numbers COCO-style names 000000000139.jpg as 139, others by their
    stem), by file name stem instead; either way every ground-truth image needs one."""
    by_id: dict = {}
    for a in pred_anns:
        by_id.setdefault(a.get("image_id"), a)
    if anns and all(a["image_id"] in by_id for a in anns):
        return {id(a): by_id[a["image_id"]] for a in anns}
    by_stem = {Path(a["file_name"]).stem: a for a in pred_anns}
    match = {id(a): by_stem[Path(a["file_name"]).stem] for a in anns if Path(a["file_name"]).stem in by_stem}
    missing = [a["file_name"] for a in anns if id(a) not in match]
    if missing:
        raise UserError(f"{pan_json}: no prediction for {len(missing)} image(s) (matched by image_id, else by file "
                        f"name): {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    return match
