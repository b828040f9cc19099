"""Semantic and panoptic datasets over the prepared layouts, giving (image, Target, meta) samples.

Semantic: an image directory and a label directory matched by file stem (DatasetInfo.sem_seg, label_suffix);
labels hold contiguous ids 0..K-1 and the ignore value. Target: one mask per class present (paper Sec. 3.1,
"category region masks"), ignore pixels in no mask.
Panoptic: an image directory, a COCO panoptic JSON and its PNG directory (DatasetInfo.panoptic). Target: one
mask per non-crowd segment, as MaskFormer's panoptic mappers; crowd and void pixels are in no mask and are
marked ignore. A panoptic-only dataset asked for semantic supervision derives the category map from the
panoptic PNG (crowd regions keep their category, void is ignore).

Files are read with PIL (a corrupt file raises, where torchvision's decoders can crash the process); images
follow their EXIF orientation, labels are read without any mode conversion (16-bit values and palette indices
are kept). A bad file raises a UserError naming it; with `skip_bad=True` the item is None instead (the collate
drops it and counts it) and the message is kept in `dataset.skipped` (per worker process).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from panopticapi.utils import rgb2id
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from maskformer_cli.data.catalog import canonical_name, dataset_dir
from maskformer_cli.data.dataset_info import IMAGE_EXTENSIONS, DatasetInfo
from maskformer_cli.errors import UserError
from maskformer_cli.structures import Target

_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

Transform = Callable[[torch.Tensor, torch.Tensor, Sequence[int]], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Sample:
    """One dataset item.

    image:  uint8 [3, H, W] RGB, after the transform.
    target: ground truth at the image's (transformed) size.
    meta:   file_name, image_id, height and width of the original image; sem_seg_file (semantic: the label
            PNG) or pan_seg_file and segments_info (panoptic: the JSON's entries with category_id converted to
            the contiguous id, as detectron2's loader does; id, area, bbox, iscrowd kept). Semantic targets
            derived from panoptic labels also carry sem_seg: int64 [H, W], the original-size category map.
            With `keep_ground_truth` (evaluation), the decoded original-size ground truth travels along, so
            nothing decodes the file twice: sem_seg (the label values as stored) or pan_seg (int64 [H, W]
            segment ids).
    """

    image: torch.Tensor
    target: Target
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- reading


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """[H, W, 3] uint8 RGB in EXIF orientation. UserError naming the file if it is missing or unreadable."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                return _high_depth_to_rgb(np.asarray(im), im.mode)
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except _PIL_ERRORS as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def _high_depth_to_rgb(a: np.ndarray, mode: str) -> np.ndarray:
    """16-bit (or 32-bit integer / float) grey -> [H, W, 3] uint8. PIL's convert("RGB") clips such values at
    255, which turns a 16-bit photo white; scale 16-bit data (mode I;16*, or I holding values above 255) by
    255/65535 instead, and clip floats to 0..255."""
    a = a.astype(np.float64)
    if mode.startswith("I;16") or (mode == "I" and a.size and a.max() > 255):
        a = a / 257.0
    grey = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def read_label(path: str | os.PathLike[str]) -> np.ndarray:
    """[H, W] int64 label values as stored: 8/16/32-bit grey or palette indices, never converted."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N"):
                raise UserError(f"label {path}: expected a single-channel PNG (mode L, P or I;16), got mode {im.mode}")
            return np.asarray(im).astype(np.int64)
    except FileNotFoundError:
        raise UserError(f"label not found: {path}") from None
    except _PIL_ERRORS as e:
        raise UserError(f"cannot read label {path}: {e}") from None


def read_panoptic_png(path: str | os.PathLike[str]) -> np.ndarray:
    """[H, W] int64 segment ids, id = R + 256 G + 256^2 B (0 = void)."""
    return read_panoptic_ids(path).numpy()


def read_panoptic_ids(path: str | os.PathLike[str]) -> torch.Tensor:
    """[H, W] int64 tensor of segment ids, id = R + 256 G + 256^2 B (0 = void), from a COCO panoptic PNG.

    Decoded by PIL, whose decoder releases the GIL (readers run in threads) and reports a corrupt file as an
    exception. torchvision's libpng decoder was 1.5x faster but crashed the whole process (SIGSEGV, no
    Python error) on a PNG with a valid header and damaged pixel data, so it is not used for any file.
    """
    try:
        with Image.open(path) as im:
            im.load()
            rgb = np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise UserError(f"panoptic PNG not found: {path}") from None
    except _PIL_ERRORS as e:
        raise UserError(f"cannot read panoptic PNG {path}: {e}") from None
    if rgb.dtype != np.uint8:
        raise UserError(f"panoptic PNG {path}: expected 8 bits per channel, got {rgb.dtype}")
    # rgb2id widens uint8 to int32 before multiplying: ids use 24 bits (exact, and faster than int64)
    return torch.from_numpy(rgb2id(rgb)).long()


def segments_to_categories(ids: torch.Tensor, segments: Sequence[dict], ignore_label: int) -> torch.Tensor:
    """The semantic view of a panoptic annotation: segment ids [H, W] + segments_info (contiguous category_id)
    -> int64 category map [H, W]. Every listed segment gets its class (crowd included, as the semantic
    metrics count crowd pixels); void (0) and ids the list does not name get `ignore_label`."""
    lut = {int(s["id"]): int(s["category_id"]) for s in segments}
    uniq, inverse = torch.unique(ids, return_inverse=True)
    labels = torch.tensor([lut.get(int(u), ignore_label) for u in uniq.tolist()], dtype=torch.int64)
    return labels[inverse]


def _check_size(image: np.ndarray, image_path: Path, label: np.ndarray, label_path: Path) -> None:
    if image.shape[:2] != label.shape[:2]:
        raise UserError(
            f"size mismatch: image {image_path} is {image.shape[1]}x{image.shape[0]} (WxH) but label "
            f"{label_path} is {label.shape[1]}x{label.shape[0]}"
        )


def _to_tensors(image: np.ndarray, labels: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous(), torch.from_numpy(np.stack(labels))


# --------------------------------------------------------------------------------------------- targets


def semantic_target(label: torch.Tensor, ignore_label: int) -> Target:
    """Target of a category map [H, W]: one mask per category present, classes in increasing order."""
    ignore = label == ignore_label
    classes = torch.unique(label[~ignore])
    masks = label[None] == classes[:, None, None]
    return Target(classes=classes.long(), masks=masks, ignore=ignore)


def panoptic_target(category: torch.Tensor, ids: torch.Tensor, segments: Sequence[tuple[int, int]],
                    ignore_label: int) -> Target:
    """Target from a category map [H, W] (ignore where void/crowd/pad) and a segment-id map [H, W] (0 there).

    segments: (segment id, contiguous class) of the non-crowd segments; those no longer visible (cropped
    away) are dropped.
    """
    classes, masks, seg_ids = [], [], []
    for sid, cls in segments:
        m = ids == sid
        if m.any():
            classes.append(cls)
            masks.append(m)
            seg_ids.append(sid)
    h, w = ids.shape
    return Target(
        classes=torch.tensor(classes, dtype=torch.int64),
        masks=torch.stack(masks) if masks else torch.zeros((0, h, w), dtype=torch.bool),
        ignore=category == ignore_label,
        is_crowd=torch.zeros(len(classes), dtype=torch.bool),
        segment_ids=torch.tensor(seg_ids, dtype=torch.int64),
    )


# -------------------------------------------------------------------------------------------- datasets


class _SegDataset(Dataset):
    """Shared item handling: the bad-file policy."""

    skip_bad: bool
    skipped: list[str]

    def __getitem__(self, index: int) -> Sample | None:
        try:
            return self.load(index)
        except UserError as e:
            if not self.skip_bad:
                raise
            self.skipped.append(str(e))
            return None

    def load(self, index: int) -> Sample:
        raise NotImplementedError

    def files(self, index: int) -> tuple[Path, ...]:
        """The files item `index` reads (image first)."""
        raise NotImplementedError

    def check_files(self, limit: int = 5) -> list[str]:
        """Cheap check of every item's files: each exists and its header opens as an image (no pixel decoding:
        about 0.1 ms a file). Returns up to `limit` problems, one line each, naming the file."""
        problems: list[str] = []
        for index in range(len(self)):
            for path in self.files(index):
                try:
                    with Image.open(path) as im:
                        im.size  # noqa: B018 (the header is read by open; size proves it parsed)
                except FileNotFoundError:
                    problems.append(f"{path}: missing")
                except _PIL_ERRORS as e:
                    problems.append(f"{path}: not a readable image ({e})")
                if len(problems) >= limit:
                    return problems
        return problems


class SemanticSegDataset(_SegDataset):
    """Images and category-map labels matched by relative path and stem (see module docstring)."""

    def __init__(self, image_dir: str | os.PathLike[str], label_dir: str | os.PathLike[str], *, num_classes: int,
                 ignore_label: int = 255, transform: Transform | None = None,
                 label_suffix: tuple[str, str] = ("", ""), skip_bad: bool = False,
                 keep_ground_truth: bool = False) -> None:
        self.image_dir, self.label_dir = Path(image_dir), Path(label_dir)
        self.keep_ground_truth = keep_ground_truth
        self.num_classes, self.ignore_label = num_classes, ignore_label
        self.transform, self.skip_bad, self.skipped = transform, skip_bad, []
        strip, add = label_suffix
        self.items: list[tuple[Path, Path]] = []
        for image in list_images(self.image_dir):
            stem = image.stem[: -len(strip)] if strip and image.stem.endswith(strip) else image.stem
            rel = image.parent.relative_to(self.image_dir)
            self.items.append((image, self.label_dir / rel / f"{stem}{add}.png"))

    def __len__(self) -> int:
        return len(self.items)

    def files(self, index: int) -> tuple[Path, ...]:
        return self.items[index]

    def load(self, index: int) -> Sample:
        image_path, label_path = self.items[index]
        image = read_image(image_path)
        label = read_label(label_path)
        _check_size(image, image_path, label, label_path)
        bad = (label < 0) | ((label >= self.num_classes) & (label != self.ignore_label))
        if bad.any():
            values = sorted(set(np.unique(label[bad]).tolist()))[:8]
            raise UserError(f"label {label_path} has values {values} outside 0..{self.num_classes - 1} "
                            f"and the ignore value {self.ignore_label}")
        meta = {"file_name": str(image_path), "image_id": image_path.stem, "height": image.shape[0],
                "width": image.shape[1], "sem_seg_file": str(label_path)}
        if self.keep_ground_truth:
            meta["sem_seg"] = torch.from_numpy(label.copy())
        img_t, labels = _to_tensors(image, [label])
        if self.transform is not None:
            img_t, labels = self.transform(img_t, labels, (self.ignore_label,))
        return Sample(img_t, semantic_target(labels[0], self.ignore_label), meta)


class PanopticSegDataset(_SegDataset):
    """COCO-panoptic JSON + PNGs; `semantic=True` gives category-map targets instead of segment masks."""

    def __init__(self, image_dir: str | os.PathLike[str], json_path: str | os.PathLike[str],
                 png_dir: str | os.PathLike[str], *, dataset_ids: Sequence[int] = (), ignore_label: int = 255,
                 transform: Transform | None = None, semantic: bool = False, skip_bad: bool = False,
                 keep_ground_truth: bool = False) -> None:
        self.image_dir, self.json_path, self.png_dir = Path(image_dir), Path(json_path), Path(png_dir)
        self.keep_ground_truth = keep_ground_truth
        self.ignore_label, self.transform, self.semantic = ignore_label, transform, semantic
        self.skip_bad, self.skipped = skip_bad, []
        try:
            doc = json.loads(self.json_path.read_text(encoding="utf-8"))
            images = {im["id"]: im for im in doc["images"]}
            annotations = doc["annotations"]
            if not dataset_ids:
                dataset_ids = sorted(c["id"] for c in doc["categories"])
        except FileNotFoundError:
            raise UserError(f"panoptic annotations not found: {self.json_path}") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot read panoptic annotations {self.json_path}: {e!r}") from None
        self.contiguous = {int(d): i for i, d in enumerate(dataset_ids)}
        self.items: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for ann in annotations:
            if ann.get("image_id") not in images:
                raise UserError(f"{self.json_path}: annotation {ann.get('file_name')} names image id "
                                f"{ann.get('image_id')!r}, which is not in 'images'")
            self.items.append((images[ann["image_id"]], ann))

    def __len__(self) -> int:
        return len(self.items)

    def files(self, index: int) -> tuple[Path, ...]:
        info, ann = self.items[index]
        return self.image_dir / info["file_name"], self.png_dir / ann["file_name"]

    def load(self, index: int) -> Sample:
        info, ann = self.items[index]
        image_path = self.image_dir / info["file_name"]
        png_path = self.png_dir / ann["file_name"]
        image = read_image(image_path)
        pan = read_panoptic_png(png_path)
        _check_size(image, image_path, pan, png_path)
        category = np.full(pan.shape, self.ignore_label, dtype=np.int64)
        ids = np.zeros(pan.shape, dtype=np.int64)
        segments, segments_info = [], []
        for seg in ann["segments_info"]:
            cls = self.contiguous.get(int(seg["category_id"]))
            if cls is None:
                raise UserError(f"{self.json_path}: segment {seg['id']} of {ann['file_name']} has category "
                                f"{seg['category_id']}, which the dataset does not list")
            segments_info.append({**seg, "category_id": cls})
            m = pan == seg["id"]
            crowd = bool(seg.get("iscrowd", 0))
            if self.semantic or not crowd:
                category[m] = cls
            if not self.semantic and not crowd:
                ids[m] = seg["id"]
                segments.append((int(seg["id"]), cls))
        meta = {"file_name": str(image_path), "image_id": ann["image_id"], "height": image.shape[0],
                "width": image.shape[1], "pan_seg_file": str(png_path),
                "segments_info": segments_info}
        if self.keep_ground_truth:
            meta["pan_seg"] = torch.from_numpy(pan.copy())
        if self.semantic:
            meta["sem_seg"] = torch.from_numpy(category.copy())  # no label PNG to evaluate against: keep the map
            img_t, labels = _to_tensors(image, [category])
            if self.transform is not None:
                img_t, labels = self.transform(img_t, labels, (self.ignore_label,))
            return Sample(img_t, semantic_target(labels[0], self.ignore_label), meta)
        img_t, labels = _to_tensors(image, [category, ids])
        if self.transform is not None:
            img_t, labels = self.transform(img_t, labels, (self.ignore_label, 0))
        return Sample(img_t, panoptic_target(labels[0], labels[1], segments, self.ignore_label), meta)


def list_images(directory: Path) -> list[Path]:
    """Image files under `directory` (recursively, for Cityscapes' per-city folders), sorted."""
    out = []
    for dirpath, _, files in os.walk(directory):
        out.extend(Path(dirpath) / f for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(out)


def _refuse_interrupted_preparation(info: DatasetInfo, base: Path) -> None:
    """`prepare-data` marks a dataset's stamp entry 'incomplete' before moving its converted files into place
    and replaces it with the complete entry after: a crash in between leaves a tree that looks whole but
    is not. Trees without our stamp (prepared by detectron2's or the datasets' own scripts) are taken as
    they are, recognised by their folder layout (the split folders the catalog names)."""
    from maskformer_cli.data.staging import STAMP, stamp_entry

    name = canonical_name(info.name)
    entry = stamp_entry(base, name)
    if entry is not None and entry.get("status") == "incomplete":
        raise UserError(f"{base}: the preparation of {name} was interrupted while its files were moved into place "
                        f"({base / STAMP} says incomplete); run `maskformer prepare-data {name.replace('_', '-')} "
                        f"--force`")


def build_dataset(info: DatasetInfo, root: str | os.PathLike[str], split: str, task: str,
                  transform: Transform | None, *, skip_bad: bool = False, ignore_label: int | None = None,
                  keep_ground_truth: bool = False) -> SemanticSegDataset | PanopticSegDataset:
    """The dataset of `info` for `split` ('train', 'val', ...) and `task` ('semantic' or 'panoptic').

    root: the datasets root (catalog.datasets_root()); the dataset lives in root/info.dirname, or at
    info.root for custom datasets. ignore_label overrides info.ignore_label. keep_ground_truth: samples carry
    the decoded original-size ground truth in their meta (evaluation; see `Sample`).
    """
    base = dataset_dir(info, root)
    ignore = info.ignore_label if ignore_label is None else ignore_label
    hint = f"run `maskformer prepare-data {info.name.replace('_', '-')}`" if not info.root else "check the spec"

    def need(path: Path) -> Path:
        if not path.exists():
            raise UserError(f"{info.name}: {path} not found ({hint}; dataset root {root})")
        return path

    if task not in ("semantic", "panoptic"):
        raise UserError(f"task must be 'semantic' or 'panoptic', got {task!r}")
    if not info.root:
        _refuse_interrupted_preparation(info, base)
    if task == "semantic" and split in info.sem_seg:
        image_dir, label_dir = info.sem_seg[split]
        ds: SemanticSegDataset | PanopticSegDataset = SemanticSegDataset(
            need(base / image_dir), need(base / label_dir), num_classes=info.num_classes, ignore_label=ignore,
            transform=transform, label_suffix=info.label_suffix, skip_bad=skip_bad,
            keep_ground_truth=keep_ground_truth)
    elif split in info.panoptic:
        image_dir, json_name, png_dir = info.panoptic[split]
        ds = PanopticSegDataset(
            need(base / image_dir), need(base / json_name), need(base / png_dir), dataset_ids=info.dataset_ids,
            ignore_label=ignore, transform=transform, semantic=task == "semantic", skip_bad=skip_bad,
            keep_ground_truth=keep_ground_truth)
    elif task == "panoptic" and not info.panoptic:
        raise UserError(f"{info.name} has no panoptic annotations (semantic segmentation only)")
    else:
        known = sorted(set(info.sem_seg) | set(info.panoptic))
        raise UserError(f"{info.name}: unknown split '{split}' (known: {', '.join(known) or 'none'})")
    if len(ds) == 0:
        raise UserError(f"{info.name}: no images found for split '{split}' under {base} ({hint})")
    return ds
