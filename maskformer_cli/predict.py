"""`maskformer predict`: segment image files with any checkpoint and write pictures and standard formats.

Outputs under --out:
  overlays/<stem>.png     image blended with the prediction, legend of the classes present
  labels/<stem>.png       semantic label map (uint8, uint16 when K > 255), contiguous class ids
  panoptic/<stem>.png     (panoptic) COCO panoptic PNG, id = R + 256 G + 256^2 B; panoptic.json alongside
  instances.json          (instance / panoptic) COCO results with RLE masks and scores
  semantic_rle.json       (semantic) one COCO RLE per class present per image
  manifest.json           per-image status, sizes and milliseconds; unreadable inputs listed as skipped
"""

from __future__ import annotations

import glob
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from maskformer_cli.config import override_recipe
from maskformer_cli.errors import UserError
from maskformer_cli.reporting import console, overlay, progress_bar, segment_boundaries

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
TASKS = ("semantic", "panoptic", "instance")


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Files, directories (their images, sorted) and globs -> unique paths in the order given."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS)
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


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 [H,W,3] with EXIF orientation applied; raises on unreadable or truncated files."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.load()
        return np.array(ImageOps.exif_transpose(im).convert("RGB"))


def resize_for_test(image: torch.Tensor, short_side: int | None, max_long: int) -> torch.Tensor:
    """[3,H,W] uint8 -> float [3,h,w] with the shorter side = short_side (long side capped)."""
    h, w = image.shape[-2:]
    x = image.float()[None]
    if not short_side:
        return x[0]
    scale = min(short_side / min(h, w), max_long / max(h, w))
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    if size == (h, w):
        return x[0]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def run_predict(inputs: list[str], *, weights: Path, task: str, out: Path, dataset: str | None, device: str,
                overrides: list[str] | tuple[str, ...] = ()) -> None:
    from maskformer_cli.distributed import resolve_device
    from maskformer_cli.weights import load_for_inference

    if task not in TASKS:
        raise UserError(f"--task {task!r}: choose semantic, panoptic or instance")
    files = collect_inputs(inputs)
    dev = resolve_device(device)
    loaded = load_for_inference(weights, dev, dataset=dataset)
    # e.g. a lower panoptic threshold for images unlike the training set
    loaded = replace(loaded, recipe=override_recipe(loaded.recipe, overrides, sections=("inference",)))
    if task != "semantic" and loaded.recipe.model.meta_architecture != "maskformer":
        raise UserError(f"--task {task} needs a mask-classification model; this checkpoint is a per-pixel baseline")
    info = loaded.info()
    if dataset is not None:
        from maskformer_cli.data.catalog import get_dataset_info

        info = get_dataset_info(dataset)
    out.mkdir(parents=True, exist_ok=True)
    result = predict_files(loaded, info, files, task=task, out=out, device=dev)
    n_ok = sum(1 for r in result["images"] if r["status"] == "ok")
    console.print(f"predicted {n_ok}/{len(files)} images -> {out}")
    if result["skipped"]:
        console.print(f"[yellow]skipped {len(result['skipped'])} unreadable inputs:[/] "
                      + ", ".join(s["file"] for s in result["skipped"][:10]))


@torch.no_grad()
def predict_files(loaded, info, files: list[Path], *, task: str, out: Path, device: torch.device) -> dict:
    from pycocotools import mask as mask_utils

    from maskformer_cli.inference import (
        crop_and_resize,
        instance_inference,
        panoptic_inference,
        semantic_inference,
    )
    from maskformer_cli.models import normalize
    from maskformer_cli.structures import PerPixelOutput

    rc, data = loaded.recipe, loaded.recipe.data
    inf = rc.inference
    short = data.test_short_side if data.test_short_side is not None else data.crop_size[0]
    colors = [info.color(i) for i in range(info.num_classes)]
    names = list(info.classes)
    dataset_ids = list(info.dataset_ids) if info.dataset_ids else list(range(1, info.num_classes + 1))
    for sub in ("overlays", "labels") + (("panoptic",) if task == "panoptic" else ()):
        (out / sub).mkdir(exist_ok=True)
    manifest, skipped, pan_anns, rle_results = [], [], [], []
    with progress_bar("predict", len(files)) as bar:
        tid = bar.add_task("predict", total=len(files))
        for image_id, path in enumerate(files):
            t0 = time.perf_counter()
            try:
                img = read_image(path)
            except Exception as e:  # unreadable inputs are listed and skipped; the rest complete
                skipped.append({"file": str(path), "error": f"{e.__class__.__name__}: {e}"})
                bar.advance(tid)
                continue
            H, W = img.shape[:2]
            x = resize_for_test(torch.from_numpy(img).permute(2, 0, 1), short, data.test_max_long_side)
            h, w = x.shape[-2:]
            d = data.size_divisibility
            ph, pw = (h + d - 1) // d * d, (w + d - 1) // d * d
            padded = torch.zeros(1, 3, ph, pw)
            padded[0, :, :h, :w] = x
            outputs = loaded.model(normalize(padded.to(device)))
            stem = path.stem
            if isinstance(outputs, PerPixelOutput):
                logits = crop_and_resize(outputs.sem_seg_logits.float(), [(h, w)], (ph, pw), [(H, W)])[0]
                sem = logits.argmax(0)
            else:
                masks = crop_and_resize(outputs.pred_masks.float(), [(h, w)], (ph, pw), [(H, W)])[0]
                cls = outputs.pred_logits[0].float()
                sem = semantic_inference(cls, masks).argmax(0)
            labels = sem.cpu().numpy()
            record = {"file": str(path), "status": "ok", "height": H, "width": W}
            if task == "semantic":
                _save_label_png(labels, info.num_classes, out / "labels" / f"{stem}.png")
                for c in np.unique(labels):
                    rle = mask_utils.encode(np.asfortranarray((labels == c).astype(np.uint8)))
                    rle["counts"] = rle["counts"].decode("ascii")
                    rle_results.append({"image_id": image_id, "file_name": path.name,
                                        "category_id": dataset_ids[int(c)], "segmentation": rle})
                ov = overlay(img, labels, colors, names)
            else:
                pan, segments = panoptic_inference(cls, masks, thing_ids=tuple(info.thing_ids),
                                                   object_mask_threshold=inf.object_mask_threshold,
                                                   overlap_threshold=inf.overlap_threshold)
                pan_np = pan.cpu().numpy().astype(np.int64)
                void = 255 if info.num_classes < 255 else 65535
                seg_labels = np.full(pan_np.shape, void, np.int64)
                for s in segments:
                    seg_labels[pan_np == s["id"]] = s["category_id"]
                _save_label_png(seg_labels, info.num_classes, out / "labels" / f"{stem}.png")
                if task == "panoptic":
                    from PIL import Image

                    rgb = np.stack([pan_np % 256, pan_np // 256 % 256, pan_np // 65536], -1).astype(np.uint8)
                    Image.fromarray(rgb).save(out / "panoptic" / f"{stem}.png")
                    pan_anns.append({"image_id": image_id, "file_name": f"{stem}.png", "segments_info": [
                        {"id": int(s["id"]), "category_id": dataset_ids[int(s["category_id"])],
                         "isthing": bool(s.get("isthing", False)), "score": float(s.get("score", 1.0)),
                         "area": int(s.get("area", (pan_np == s["id"]).sum()))} for s in segments]})
                for m, c, score in instance_inference(cls, masks, thing_ids=tuple(info.thing_ids)):
                    rle = mask_utils.encode(np.asfortranarray(m.cpu().numpy().astype(np.uint8)))
                    rle["counts"] = rle["counts"].decode("ascii")
                    rle_results.append({"image_id": image_id, "file_name": path.name,
                                        "category_id": dataset_ids[int(c)], "segmentation": rle,
                                        "score": float(score)})
                ov = overlay(img, seg_labels, colors, names, ignore_label=void,
                             boundaries=segment_boundaries(pan_np))
            ov.save(out / "overlays" / f"{stem}.png")
            record["ms"] = round(1000 * (time.perf_counter() - t0), 1)
            manifest.append(record)
            bar.advance(tid)
    if task == "panoptic":
        cats = [{"id": dataset_ids[i], "name": n, "isthing": int(i in set(info.thing_ids)),
                 "color": list(colors[i])} for i, n in enumerate(names)]
        (out / "panoptic.json").write_text(json.dumps({"annotations": pan_anns, "categories": cats}))
    (out / ("semantic_rle.json" if task == "semantic" else "instances.json")).write_text(json.dumps(rle_results))
    result = {"weights": str(loaded.sha256), "task": task, "classes": names, "images": manifest, "skipped": skipped}
    (out / "manifest.json").write_text(json.dumps(result, indent=1))
    return result


def _save_label_png(labels: np.ndarray, num_classes: int, path: Path) -> None:
    from PIL import Image

    dtype = np.uint16 if num_classes > 255 else np.uint8
    Image.fromarray(labels.astype(dtype)).save(path)
