"""Benchmark: PQ (ours vs panopticapi.evaluation.pq_compute on the same files) and mIoU update time.

    python benchmarks/bench_metrics.py [--images 40] [--size 512] [--threads 1]

Generates COCO-panoptic-style ground truth (RGB-encoded 24-bit segment ids, stuff, things, crowd, void)
and predictions derived from it, writes them as JSON + PNG, and times in one run:
  panopticapi pq_compute (its own process pool, one process per core), panopticapi's per-image code on
  one core, ours from the same files (PNG decode included; on one core, and with decoding threads on all
  cores as `maskformer evaluate --predictions` runs), ours on decoded maps (metric only);
then the same with PNG decoding taken out of both, and the SemanticMetrics update time per image (150
classes, ADE20K-like). Times are CPU time of this process (best of N), except the process pool's (wall).
The results of both PQ implementations are checked to agree before any time is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from panopticapi import evaluation as pq_eval
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image

from maskformer_cli.data.datasets import read_panoptic_ids
from maskformer_cli.data.prefetch import default_workers, prefetched
from maskformer_cli.metrics import SemanticMetrics
from maskformer_cli.metrics_panoptic import PanopticMetrics

CATEGORIES = [{"id": i + 1, "name": f"c{i}", "isthing": int(i < 80)} for i in range(133)]


def _blocks(rng, h, w, n, cell):
    """A label map of n labels made of random rectangles on a coarse grid (object-like, coherent)."""
    lab = np.zeros((h // cell, w // cell), np.int64)
    for i in range(n):
        y0, x0 = rng.integers(0, lab.shape[0] - 1), rng.integers(0, lab.shape[1] - 1)
        lab[y0 : y0 + rng.integers(1, lab.shape[0] // 2), x0 : x0 + rng.integers(1, lab.shape[1] // 2)] = i
    return lab.repeat(cell, 0).repeat(cell, 1)


def make_image(rng, size):
    h = w = size
    n_gt = int(rng.integers(15, 40))
    lab = _blocks(rng, h, w, n_gt, 8)
    ids = rng.choice(np.arange(1, 1 << 24), size=n_gt, replace=False)
    gt = ids[lab]
    gt[_blocks(rng, h, w, 2, 16) == 1] = 0  # void
    gt_segments = []
    for sid in np.unique(gt):
        if sid == 0:
            continue
        cat = int(rng.integers(1, 134))
        crowd = int(cat <= 80 and rng.random() < 0.05)
        gt_segments.append(
            {"id": int(sid), "category_id": cat, "iscrowd": crowd, "area": int((gt == sid).sum())}
        )
    cat_of = {s["id"]: s["category_id"] for s in gt_segments}
    # Prediction: the ground truth shifted a little, some segments relabelled or lost, plus spurious ones.
    pred = np.roll(gt, (int(rng.integers(-6, 7)), int(rng.integers(-6, 7))), axis=(0, 1))
    spurious = _blocks(rng, h, w, 6, 16)
    pred = np.where(spurious > 0, (1 << 23) + spurious, pred)
    # Predicted ids 1..n, as panoptic inference (and detectron2's COCO panoptic writer) numbers them.
    uniq, pred = np.unique(pred, return_inverse=True)
    pred = pred.reshape(h, w) + (1 if uniq[0] != 0 else 0)
    pred_segments = []
    for new_id, sid in enumerate(uniq[uniq != 0], start=1):
        cat = cat_of.get(int(sid), int(rng.integers(1, 134)))
        if rng.random() < 0.15:
            cat = int(rng.integers(1, 134))
        pred_segments.append({"id": new_id, "category_id": cat})
    return gt, gt_segments, pred, pred_segments


def write_files(root: Path, images):
    (root / "gt").mkdir()
    (root / "pred").mkdir()
    gt_anns, pred_anns = [], []
    for i, (gt, gs, pred, ps) in enumerate(images):
        name = f"{i:06d}.png"
        Image.fromarray(id2rgb(gt)).save(root / "gt" / name)
        Image.fromarray(id2rgb(pred)).save(root / "pred" / name)
        gt_anns.append({"image_id": i, "file_name": name, "segments_info": gs})
        pred_anns.append({"image_id": i, "file_name": name, "segments_info": ps})
    (root / "gt.json").write_text(json.dumps({"annotations": gt_anns, "categories": CATEGORIES}))
    (root / "pred.json").write_text(json.dumps({"annotations": pred_anns}))


def ours_from_files(root: Path, workers: int = 1):
    """What `maskformer evaluate --predictions` does: the library's PNG reader, `workers` decoding threads."""
    gt = json.loads((root / "gt.json").read_text())
    pred = {a["image_id"]: a for a in json.loads((root / "pred.json").read_text())["annotations"]}
    metric = PanopticMetrics(gt["categories"])
    anns = gt["annotations"]

    def read_pair(ann):
        return (read_panoptic_ids(root / "pred" / pred[ann["image_id"]]["file_name"]),
                read_panoptic_ids(root / "gt" / ann["file_name"]))

    for ann, (pred_map, gt_map) in zip(anns, prefetched(read_pair, anns, workers), strict=True):
        metric.update(pred_map, pred[ann["image_id"]]["segments_info"], gt_map, ann["segments_info"])
    return metric.compute()


def decoded_rgb(root: Path) -> dict[str, np.ndarray]:
    """Every PNG decoded once: {path: [H, W, 3] uint8}."""
    return {
        str(p): np.asarray(Image.open(p))
        for folder in ("gt", "pred")
        for p in sorted((root / folder).iterdir())
    }


def ours_from_rgb(root: Path, rgb: dict[str, np.ndarray]):
    """Ours on already-decoded PNGs: colours -> ids + update (what panopticapi does after decoding)."""
    gt = json.loads((root / "gt.json").read_text())
    pred = {a["image_id"]: a for a in json.loads((root / "pred.json").read_text())["annotations"]}
    metric = PanopticMetrics(gt["categories"])
    for ann in gt["annotations"]:
        p = pred[ann["image_id"]]
        gt_map = torch.from_numpy(rgb2id(rgb[str(root / "gt" / ann["file_name"])]))
        pred_map = torch.from_numpy(rgb2id(rgb[str(root / "pred" / p["file_name"])]))
        metric.update(pred_map, p["segments_info"], gt_map, ann["segments_info"])
    return metric.compute()


def panopticapi_single_core(root: Path):
    gt = json.loads((root / "gt.json").read_text())
    pred = {a["image_id"]: a for a in json.loads((root / "pred.json").read_text())["annotations"]}
    categories = {c["id"]: c for c in gt["categories"]}
    pairs = [(a, pred[a["image_id"]]) for a in gt["annotations"]]
    stat = pq_eval.pq_compute_single_core(0, pairs, str(root / "gt"), str(root / "pred"), categories)
    return stat.pq_average(categories, isthing=None)[0]


def timed(fn, repeat, clock=time.process_time):
    """Best of `repeat` runs. Single-process rows use this process's CPU time (robust when other jobs
    share the cores); the process-pool row needs wall-clock time."""
    times = []
    for _ in range(repeat):
        start = clock()
        with contextlib.redirect_stdout(io.StringIO()):
            result = fn()
        times.append(clock() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for our metrics")
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = [make_image(rng, args.size) for _ in range(args.images)]
    n = args.images

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_files(root, images)
        t_api, api = timed(
            lambda: pq_eval.pq_compute(
                str(root / "gt.json"), str(root / "pred.json"), str(root / "gt"), str(root / "pred")
            ),
            args.repeat,
            clock=time.perf_counter,
        )
        t_api1, api1 = timed(lambda: panopticapi_single_core(root), args.repeat)
        t_files, ours = timed(lambda: ours_from_files(root, 1), args.repeat)
        workers = default_workers()
        t_par, ours_par = timed(lambda: ours_from_files(root, workers), args.repeat, clock=time.perf_counter)
        # The same again with PNG decoding taken out of both: panopticapi's Image.open returns the
        # decoded array (its np.array(..., dtype=np.uint32) + rgb2id still run), ours runs rgb2id + update.
        rgb = decoded_rgb(root)
        real_open = pq_eval.Image.open
        pq_eval.Image.open = lambda path: rgb[str(path)]
        try:
            t_api_dec, api_dec = timed(lambda: panopticapi_single_core(root), args.repeat)
        finally:
            pq_eval.Image.open = real_open
        t_rgb, ours_rgb = timed(lambda: ours_from_rgb(root, rgb), args.repeat)

    # int32 maps, as rgb2id and panoptic_inference produce them.
    tensors = [
        (torch.from_numpy(p.astype(np.int32)), ps, torch.from_numpy(g.astype(np.int32)), gs)
        for g, gs, p, ps in images
    ]

    def ours_in_memory():
        metric = PanopticMetrics(CATEGORIES)
        for args_ in tensors:
            metric.update(*args_)
        return metric.compute()

    t_mem, ours_mem = timed(ours_in_memory, args.repeat)
    for key, ref in (("PQ", api["All"]["pq"]), ("SQ", api["All"]["sq"]), ("RQ", api["All"]["rq"])):
        for res in (ours, ours_par, ours_mem, ours_rgb):
            assert abs(res[key] / 100 - ref) < 1e-9, (key, res[key], ref)
    assert abs(api1["pq"] - api["All"]["pq"]) < 1e-12 and abs(api_dec["pq"] - api["All"]["pq"]) < 1e-12

    print(
        f"PQ on {n} images of {args.size}x{args.size} (PQ = {ours['PQ']:.3f}, equal to panopticapi within 1e-9)\n"
        # panopticapi's per-image cost is mostly np.unique (a sort): numpy 2's SIMD sort makes it ~4x faster,
        # and panopticapi-lite 0.2 pins numpy < 2, so the version decides the ratio
        f"  numpy {np.__version__}, torch {torch.__version__}"
    )
    print(f"  {'':56s} {'total s':>8s} {'ms/image':>9s}")
    rows = [
        ("from the PNG files", None),
        ("  panopticapi pq_compute (process pool, all cores; wall)", t_api),
        ("  panopticapi per-image code, 1 core", t_api1),
        ("  ours, 1 core", t_files),
        (f"  ours, {workers} decoding thread(s) (all cores; wall)", t_par),
        ("PNGs already decoded (decoding excluded from both)", None),
        ("  panopticapi per-image code (uint32 + rgb2id + PQ), 1 core", t_api_dec),
        ("  ours (rgb2id + update), 1 core", t_rgb),
        ("  ours, update only (id maps given), 1 core", t_mem),
    ]
    for name, t in rows:
        print(f"  {name}" if t is None else f"  {name:56s} {t:8.3f} {1000 * t / n:9.2f}")
    print(
        f"  speed-up from files:  {t_api / t_par:4.1f}x vs pq_compute (all cores both), "
        f"{t_api1 / t_files:4.1f}x vs its 1-core code (1 core both)"
    )
    print(
        f"  speed-up, decoded:    {t_api_dec / t_rgb:4.1f}x (same rgb2id in both), {t_api_dec / t_mem:4.1f}x update only"
    )

    # mIoU update: ADE20K-like, 150 classes, int64 predictions (argmax output) and uint8 labels with 255.
    k = 150
    g = torch.Generator().manual_seed(0)
    preds = [
        torch.randint(0, k, (args.size // 8, args.size // 8), generator=g)
        .repeat_interleave(8, 0)
        .repeat_interleave(8, 1)
        for _ in range(8)
    ]
    gts = [torch.where(torch.rand(p.shape, generator=g) < 0.1, 255, p).to(torch.uint8) for p in preds]
    metric = SemanticMetrics(k, 255)
    for p, t in zip(preds, gts, strict=True):
        metric.update(p, t)
    samples = []
    for _ in range(30):
        start = time.process_time()
        for p, t in zip(preds, gts, strict=True):
            metric.update(p, t)
        samples.append((time.process_time() - start) / len(preds))
    print(
        f"mIoU update, {args.size}x{args.size}, K={k}, {args.threads} thread(s): "
        f"median {1000 * statistics.median(samples):.3f} ms/image (best {1000 * min(samples):.3f} ms)"
    )


if __name__ == "__main__":
    main()
