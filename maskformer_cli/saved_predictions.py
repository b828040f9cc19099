"""Metrics of prediction files written by `maskformer predict` against a dataset's ground truth
(`maskformer evaluate --predictions DIR`): label PNGs named by image stem, and/or a COCO panoptic JSON + PNGs
with the dataset's category ids. Files are decoded ahead in threads (data/prefetch.py); the metrics are the
ones a checkpoint's evaluation uses (engine.Evaluator), so saved predictions score what evaluated ones do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskformer_cli.errors import UserError
from maskformer_cli.reporting import progress_bar

METRICS = {"miou": ("miou",), "pq": ("pq",), "pq-stuff": ("pq-stuff",)}
METRIC_CHOICES = "miou, pq, pq-stuff, cityscapes or all"


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
