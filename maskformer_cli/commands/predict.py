"""`maskformer predict`: segment image files with any checkpoint and write pictures and standard formats.

Outputs under --out, named by the image's file stem (inputs that share a stem get their path relative to
the inputs' common folder, `a/x.jpg` -> `a__x`; manifest.json maps every input to its name):
  overlays/<name>.png     image blended with the prediction, legend of the classes present (--no-overlays
                          skips them: they cost about as much as writing the label maps)
  labels/<name>.png       semantic label map (uint8, uint16 when K > 255), contiguous class ids 0..K-1, from
                          semantic inference for every --task (what `evaluate` scores for mIoU)
  panoptic/<name>.png     (panoptic) COCO panoptic PNG, id = R + 256 G + 256^2 B; panoptic.json alongside
  instances.json          (instance; panoptic with --rle) COCO results with RLE masks and scores
  semantic_rle.json       (semantic with --rle) one COCO RLE per class present per image
  labelIds/<stem>.png     (--dataset cityscapes) the label map in Cityscapes labelIds, named by the input's
                          own stem, as the evaluation server and cityscapesscripts expect (zip the folder)
  manifest.json           per-image status, sizes and milliseconds; unreadable inputs listed as skipped
The JSON files use the dataset's category ids (COCO: 1..200; without a dataset 1..K), as COCO tools
expect; the label PNGs use the contiguous ids 0..K-1 that training and `evaluate --predictions` use.

Images go through the same test-time resize, padding, network call and post-processing as `evaluate`
(`postprocess.PostProcessor`), so `predict` + `evaluate --predictions` gives the numbers of `evaluate CKPT`.
Decoding, inference and writing overlap (read-ahead threads, one writer thread).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from panopticapi.utils import id2rgb

from maskformer_cli.config import override_recipe
from maskformer_cli.data.dataset_info import IMAGE_EXTENSIONS
from maskformer_cli.errors import UserError
from maskformer_cli.metrics_cityscapes import LABEL_IDS_DIR, result_name, to_label_ids, train_id_to_label_id
from maskformer_cli.precision import check_precision
from maskformer_cli.reporting import console, overlay, progress_bar, segment_boundaries

TASKS = ("semantic", "panoptic", "instance")
# What a predict run writes: replaced as a whole with --exist-ok, so no file of an earlier run survives
# to be mistaken for this one's (e.g. an old panoptic.json beside new semantic labels).
OUTPUTS = ("overlays", "labels", "labelIds", "panoptic", "panoptic.json", "instances.json", "semantic_rle.json",
           "manifest.json")


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Files, directories (their images, sorted) and globs -> unique paths in the order given."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            entries = sorted(p.iterdir())
            out += [f for f in entries if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
            subdirs = [f.name for f in entries if f.is_dir()]
            if subdirs:
                console.print(f"{p}: sub-folder(s) not searched: {', '.join(subdirs[:10])}"
                              f"{f' (+{len(subdirs) - 10} more)' if len(subdirs) > 10 else ''}; use a glob such "
                              f"as '{p}/**/*.jpg' to include them", style="dim", highlight=False, markup=False)
            broken = [f.name for f in entries if f.is_symlink() and not f.exists()]
            if broken:
                console.print(f"{p}: skipped broken symbolic link(s): {', '.join(broken[:10])}"
                              f"{f' (+{len(broken) - 10} more)' if len(broken) > 10 else ''}",
                              style="yellow", highlight=False, markup=False)
        elif p.exists():
            out.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches:
                raise UserError(f"no such file, directory or glob match: {item}")
            out += [m for m in matches if m.is_file()]
    seen, unique = set(), []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    if not unique:
        raise UserError(f"no images found in {', '.join(inputs)}")
    return unique


def output_names(files: list[Path]) -> list[str]:
    """One output name per input file, unique: the file's stem, except where stems collide (the same name
    in two folders, or x.jpg beside x.png): those get their path relative to the inputs' common folder,
    folders joined by '__', and their extension if that is still ambiguous."""
    stems = [f.stem for f in files]
    counts = Counter(stems)
    if len(counts) == len(stems):
        return stems
    resolved = [f.resolve() for f in files]
    root = Path(os.path.commonpath([r.parent for r in resolved]))
    names = [s if counts[s] == 1 else "__".join(r.relative_to(root).with_suffix("").parts)
             for s, r in zip(stems, resolved, strict=True)]
    counts = Counter(names)
    names = [n if counts[n] == 1 else f"{n}_{f.suffix.lstrip('.').lower()}" for n, f in zip(names, files, strict=True)]
    counts, taken, out = Counter(names), set(), []
    for n in names:  # still equal (x.JPG and x.jpg): number them, skipping names another input already has
        name, k = n, 0
        while name in taken or (name != n and name in counts) or (counts[n] > 1 and k == 0):
            k += 1
            name = f"{n}_{k}"
        taken.add(name)
        out.append(name)
    return out


def prepare_out(out: Path, exist_ok: bool) -> None:
    """Make `out`; refuse to mix with an earlier run's outputs unless `exist_ok`, which removes them first."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    old = [out / name for name in OUTPUTS if (out / name).exists()]
    if old and not exist_ok:
        raise UserError(f"--out {out} already holds predictions ({', '.join(p.name for p in old)}): pass "
                        f"--exist-ok to replace them, or choose another --out")
    for p in old:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)


class ImageFiles(torch.utils.data.Dataset):
    """Image files as evaluation samples: the test-time resize of `transform`, an empty target, and the
    original RGB in meta["rgb"] for the overlays. Unreadable files give None (collate drops them) and are
    recorded in `skipped` (read by threads of this process, so the list is shared)."""

    def __init__(self, files: list[Path], transform) -> None:
        self.files, self.transform = files, transform
        self.skipped: list[dict] = []

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from maskformer_cli.data.datasets import Sample, read_image, semantic_target

        path = self.files[index]
        try:
            rgb = read_image(path)
        except Exception as e:  # unreadable inputs are listed and skipped; the rest complete
            msg = str(e) if isinstance(e, UserError) else f"{e.__class__.__name__}: {e}"
            self.skipped.append({"file": str(path), "error": msg, "index": index})
            return None
        h, w = rgb.shape[:2]
        image = torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()
        image, labels = self.transform(image, torch.zeros((1, h, w), dtype=torch.uint8), (0,))
        meta = {"file_name": str(path), "index": index, "height": h, "width": w, "rgb": rgb}
        return Sample(image, semantic_target(labels[0], 0), meta)


def run_predict(inputs: list[str], *, weights: Path, task: str, out: Path, dataset: str | None, device: str,
                overrides: list[str] | tuple[str, ...] = (), exist_ok: bool = False, batch_size: int = 1,
                precision: str = "fp32", overlays: bool = True, rle: bool = False, backend: str = "auto") -> None:
    from maskformer_cli.backends import is_exported, load_exported, resolve_backend
    from maskformer_cli.distributed import resolve_device
    from maskformer_cli.weights import load_for_inference

    if task not in TASKS:
        raise UserError(f"--task {task!r}: choose semantic, panoptic or instance")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    check_precision(precision)
    backend = resolve_backend(weights, backend)
    exported = is_exported(weights)
    if exported and precision != "fp32":
        raise UserError(f"--precision {precision}: an exported model's precision is chosen at export "
                        f"(maskformer export --precision); {Path(weights).name} runs as exported")
    files = collect_inputs(inputs)
    prepare_out(out, exist_ok)  # before the model loads: a wrong --out fails in a second, not a minute
    dev = resolve_device(device)
    if exported:  # an ONNX / OpenVINO / TorchScript session that predict calls like the network
        dev = torch.device("cpu")
        loaded = load_exported(weights, backend, dataset=dataset)
    else:
        loaded = load_for_inference(weights, dev, dataset=dataset)
    # e.g. a lower panoptic threshold for images unlike the training set, or another test size
    loaded = replace(loaded, recipe=override_recipe(loaded.recipe, overrides, sections=("inference", "data")))
    if task != "semantic" and loaded.recipe.model.meta_architecture != "maskformer":
        raise UserError(f"--task {task} needs a mask-classification model; this checkpoint is a per-pixel baseline")
    inf = loaded.recipe.inference
    if task != "semantic" and inf.tta:
        raise UserError("inference.tta averages semantic class scores over scales and flips: use it with "
                        "--task semantic (panoptic and instance predictions are single-scale, as in the paper)")
    if task != "semantic" and inf.mode in ("general", "iterative"):
        raise UserError(f"inference.mode={inf.mode} makes semantic maps: use it with --task semantic")
    info = loaded.info()
    if dataset is not None:
        from maskformer_cli.data.catalog import get_dataset_info

        info = get_dataset_info(dataset)
    if task != "semantic" and not info.thing_ids:
        console.print("[yellow]no thing classes known for these weights: every class is treated as stuff "
                      "(one segment per class); pass --dataset with a panoptic dataset for instances[/]")
    result = predict_files(loaded, info, files, task=task, out=out, device=dev, batch_size=batch_size,
                           precision=precision, overlays=overlays, rle=rle)
    n_ok = len(result["images"])
    if n_ok == 0 and result["skipped"]:
        raise UserError(f"none of the {len(files)} inputs could be read as an image (first: "
                        f"{result['skipped'][0]['error']}); see {out / 'manifest.json'}")
    console.print(f"predicted {n_ok}/{len(files)} images -> {out}")
    if result["skipped"]:
        console.print(f"[yellow]skipped {len(result['skipped'])} unreadable input(s):[/] "
                      + ", ".join(s["file"] for s in result["skipped"][:10]))


@torch.no_grad()
def predict_files(loaded, info, files: list[Path], *, task: str, out: Path, device: torch.device,
                  batch_size: int = 1, precision: str = "fp32", overlays: bool = True, rle: bool = False) -> dict:
    """Segment `files` and write the outputs (module docstring). Three stages overlap: threads decode and
    resize the next images, the main thread runs the network and the post-processor, one writer thread
    threads encode PNGs and overlays (PNG encoding and PIL drawing release the GIL; the records keep the
    input order whatever thread finishes first). At most 2 images per writer wait to be written, so a slow
    disk holds the network back instead of filling the memory with predictions."""
    from concurrent.futures import ThreadPoolExecutor

    from maskformer_cli.data.collate import collate
    from maskformer_cli.data.prefetch import default_workers, prefetched
    from maskformer_cli.data.transforms import build_transforms
    from maskformer_cli.postprocess import build_postprocessor, channels_last_default

    rc = loaded.recipe
    exported = getattr(loaded.model, "exported", False)  # a backend session takes contiguous float32 images
    pp = build_postprocessor(rc.inference, info, precision=precision,
                             channels_last=channels_last_default(device) and not exported)
    want = ("sem_seg",) + (("panoptic",) if task == "panoptic" else ()) + (
        ("instances",) if task == "instance" or (task == "panoptic" and rle) else ())
    writer = _Writer(out, info, task, overlays=overlays, rle=rle)
    stems = output_names(files)
    ds = ImageFiles(files, build_transforms(rc.data, train=False))
    samples = prefetched(ds.__getitem__, range(len(files)), workers=min(4, default_workers()))
    net = loaded.model
    # One writer kept up with a CPU's inference; on a GPU (about 30 ms an image) overlays need several:
    # measured with benchmarks/bench_inference.py --mode predict on an H200.
    writers = min(4, default_workers())
    with progress_bar("predict", len(files), unit="img") as bar, ThreadPoolExecutor(writers, "predict-writer") as pool:
        tid = bar.add_task("predict", total=len(files))
        pending = []
        for chunk in _chunks(samples, batch_size):
            batch = collate(chunk, size_divisibility=rc.data.size_divisibility, ignore_label=0)
            t0 = time.perf_counter()
            preds = []
            if batch.metas:
                out_sizes = [(m["height"], m["width"]) for m in batch.metas]
                preds = pp(net, batch.images.to(device), batch.image_sizes, out_sizes, want)
            ms = round(1000 * (time.perf_counter() - t0) / max(1, len(batch.metas)), 1)
            for pred, meta in zip(preds, batch.metas, strict=True):
                pred = {k: _to_cpu(v) for k, v in pred.items()}
                pending.append(pool.submit(writer.write, pred, meta, files[meta["index"]], stems[meta["index"]], ms))
            bar.advance(tid, len(batch.metas) + batch.num_skipped)
            while pending and (pending[0].done() or len(pending) > 2 * writers):
                pending.pop(0).result()  # a failed write surfaces here, not at the end
        for f in pending:
            f.result()
    return writer.finish(loaded.sha256, ds.skipped)


def _chunks(items, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, tuple):
        return tuple(_to_cpu(v) for v in value)
    if isinstance(value, list):
        return [tuple(_to_cpu(x) for x in v) if isinstance(v, tuple) else v for v in value]
    return value


class _Writer:
    """Writes one image's outputs (called from writer threads, several images at once). The records (manifest,
    panoptic annotations, RLEs) are kept with the image's input index and sorted by it in `finish`."""

    def __init__(self, out: Path, info, task: str, *, overlays: bool, rle: bool) -> None:
        self.out, self.info, self.task, self.overlays, self.rle = out, info, task, overlays, rle
        self.colors = [info.color(i) for i in range(info.num_classes)]
        self.names = list(info.classes)
        self.dataset_ids = list(info.dataset_ids) if info.dataset_ids else list(range(1, info.num_classes + 1))
        self.manifest: list[dict] = []
        self.pan_anns: list[dict] = []
        self.rle_results: list[dict] = []
        # Cityscapes' benchmark reads labelIds, not the trainIds the model predicts
        self.label_ids = train_id_to_label_id() if info.name == "cityscapes" else None
        for sub in ("labels",) + (("overlays",) if overlays else ()) + (("panoptic",) if task == "panoptic" else ()) + (
                (LABEL_IDS_DIR,) if self.label_ids is not None else ()):
            (out / sub).mkdir(exist_ok=True)

    def write(self, pred: dict, meta: dict, path: Path, stem: str, ms: float) -> None:
        from PIL import Image

        order = meta["index"]
        image_id, img = image_id_of(path), meta["rgb"]
        h, w = img.shape[:2]
        labels = pred["sem_seg"].numpy()
        _save_label_png(labels, self.info.num_classes, self.out / "labels" / f"{stem}.png")
        if self.label_ids is not None:
            Image.fromarray(to_label_ids(labels, self.label_ids)).save(self.out / LABEL_IDS_DIR / result_name(path.stem))
        ov = None
        if "panoptic" in pred:
            pan, segments = pred["panoptic"]
            pan_np = pan.numpy().astype(np.int64)
            Image.fromarray(id2rgb(pan_np)).save(self.out / "panoptic" / f"{stem}.png")
            self.pan_anns.append((order, {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": [
                {"id": int(s["id"]), "category_id": self.dataset_ids[int(s["category_id"])],
                 "isthing": bool(s.get("isthing", False)), "score": float(s.get("score", 1.0)),
                 "area": int(s["area"])} for s in segments]}))
            if self.overlays:
                void = 255 if self.info.num_classes < 255 else 65535
                lut = np.full(len(segments) + 1, void, np.int64)
                for s in segments:
                    lut[s["id"]] = s["category_id"]
                ov = overlay(img, lut[pan_np], self.colors, self.names, ignore_label=void,
                             boundaries=segment_boundaries(pan_np))
        elif self.overlays:
            ov = overlay(img, labels, self.colors, self.names, ignore_label=self.info.ignore_label)
        if ov is not None:
            # zlib level 1: 5x faster than the default 6 on a blended photo, for files ~15% larger
            ov.save(self.out / "overlays" / f"{stem}.png", compress_level=1)
        if self.rle and self.task == "semantic":
            self._semantic_rle(labels, image_id, path, order)
        for m, c, score in pred.get("instances", []):
            self.rle_results.append((order, {"image_id": image_id, "file_name": path.name,
                                             "category_id": self.dataset_ids[int(c)], "segmentation": _rle(m.numpy()),
                                             "score": float(score)}))
        self.manifest.append((order, {"file": str(path), "output": f"{stem}.png", "status": "ok", "height": h,
                                      "width": w, "ms": ms}))

    def _semantic_rle(self, labels: np.ndarray, image_id: int, path: Path, order: int) -> None:
        for c in np.unique(labels):
            if c >= self.info.num_classes:  # general inference leaves low-confidence pixels unlabelled
                continue
            self.rle_results.append((order, {"image_id": image_id, "file_name": path.name,
                                             "category_id": self.dataset_ids[int(c)], "segmentation": _rle(labels == c)}))

    def finish(self, sha256: str, skipped: list[dict]) -> dict:
        # input order, whatever thread wrote first (sorted is stable: an image's own records keep theirs)
        manifest, pan_anns, rle_results = ([rec for _, rec in sorted(records, key=lambda r: r[0])]
                                           for records in (self.manifest, self.pan_anns, self.rle_results))
        if self.task == "panoptic":
            things = set(self.info.thing_ids)
            cats = [{"id": self.dataset_ids[i], "name": n, "isthing": int(i in things), "color": list(self.colors[i])}
                    for i, n in enumerate(self.names)]
            (self.out / "panoptic.json").write_text(json.dumps({"annotations": pan_anns, "categories": cats}))
        if self.task == "instance" or (self.rle and self.task == "panoptic"):
            (self.out / "instances.json").write_text(json.dumps(rle_results))
        elif self.rle:
            (self.out / "semantic_rle.json").write_text(json.dumps(rle_results))
        skipped = [{"file": s["file"], "error": s["error"]} for s in sorted(skipped, key=lambda s: s["index"])]
        result = {"weights": str(sha256), "task": self.task, "classes": self.names, "images": manifest,
                  "skipped": skipped}
        (self.out / "manifest.json").write_text(json.dumps(result, indent=1))
        return result


def image_id_of(path: Path) -> int | str:
    """The image_id written for an input: COCO-style numeric names (000000000139.jpg) give the dataset's id
    (139), as COCO tools and panopticapi match on it; other names give their stem."""
    return int(path.stem) if path.stem.isdigit() else path.stem


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _save_label_png(labels: np.ndarray, num_classes: int, path: Path) -> None:
    from PIL import Image

    dtype = np.uint16 if num_classes > 255 else np.uint8
    Image.fromarray(labels.astype(dtype)).save(path)
