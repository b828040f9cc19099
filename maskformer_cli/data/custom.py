"""Custom datasets: a small YAML spec -> DatasetInfo, and `prepare-data custom --check SPEC` validation.

```yaml
name: roads
classes: [road, car, person]        # or a file: classes.txt (one per line) / classes.json (a list)
ignore_label: 255
thing_classes: [car, person]        # optional (names or indices); needed for panoptic
semantic:                           # label PNGs (or 16-bit TIFF) of class indices 0..K-1 / ignore_label
  train: {images: data/img/train, labels: data/lbl/train}
  val: {images: data/img/val, labels: data/lbl/val}
label_suffix: _mask                 # optional, every split: img/a.jpg <-> lbl/a_mask.png
panoptic:                           # COCO panoptic JSON + PNGs (instead of, or besides, semantic)
  train: {images: data/img/train, json: data/pan_train.json, pngs: data/pan_train}
```

Relative paths are relative to the spec file. Images and labels are paired by their path below the
split directory without extension: `a/b.jpg` <-> `a/b<label_suffix>.png`. `label_suffix` is either a
string added to the image stem, or [suffix removed from the image stem, suffix added] (Cityscapes:
[_leftImg8bit, _gtFine_labelTrainIds]).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from panopticapi.utils import rgb2id

from maskformer_cli.data.dataset_info import IMAGE_EXTENSIONS, DatasetInfo, default_palette
from maskformer_cli.errors import UserError

LABEL_EXTS = (".png", ".tif", ".tiff")
TOP_KEYS = ("name", "classes", "ignore_label", "thing_classes", "semantic", "panoptic", "label_suffix")
SEMANTIC_KEYS = ("images", "labels", "label_suffix")
PANOPTIC_KEYS = ("images", "json", "pngs")


def _fail(spec: Path, msg: str) -> UserError:
    return UserError(f"{spec}: {msg}")


def _unknown_key(spec: Path, where: str, key: str, allowed: tuple[str, ...]) -> UserError:
    import difflib

    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return _fail(spec, f"unknown key '{where}{key}'{hint}; allowed: {', '.join(allowed)}")


def _read_spec(spec: Path) -> dict[str, Any]:
    from maskformer_cli.yaml_strict import read_yaml_file

    spec = Path(spec)
    if not spec.is_file():
        raise UserError(f"{spec}: no such dataset spec file")
    data = read_yaml_file(spec)
    if not isinstance(data, dict):
        raise _fail(spec, "expected a mapping with name, classes, semantic/panoptic")
    for k in data:
        if k not in TOP_KEYS:
            raise _unknown_key(spec, "", str(k), TOP_KEYS)
    return data


def _path(spec: Path, value: Any, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise _fail(spec, f"'{where}' must be a path")
    p = Path(value).expanduser()
    return (p if p.is_absolute() else spec.parent / p).resolve()


def _classes(spec: Path, data: dict[str, Any], panoptic_json: Path | None) -> list[str]:
    value = data.get("classes")
    if value is None and panoptic_json is not None:
        if not panoptic_json.is_file():
            raise _fail(spec, f"no 'classes', and {panoptic_json} (the panoptic JSON to take them from) "
                              f"does not exist")
        cats = _json_categories(spec, panoptic_json)
        return [c["name"] for c in cats]
    if isinstance(value, str):
        f = _path(spec, value, "classes")
        if not f.is_file():
            raise _fail(spec, f"classes file {f} not found")
        text = f.read_text()
        if f.suffix == ".json":
            try:
                value = json.loads(text)
            except ValueError as e:
                raise _fail(spec, f"classes file {f}: invalid JSON ({e})") from None
        else:
            value = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise _fail(spec, "'classes' must be a non-empty list of names (or a .txt/.json file of them)")
    dup = sorted({c for c in value if value.count(c) > 1})
    if dup:
        raise _fail(spec, f"duplicate class names: {', '.join(dup)}")
    return list(value)


def _json_categories(spec: Path, json_path: Path) -> list[dict[str, Any]]:
    try:
        cats = json.loads(json_path.read_text())["categories"]
        return sorted(cats, key=lambda c: c["id"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _fail(spec, f"cannot read categories from {json_path} ({e})") from None


def _suffix(spec: Path, value: Any, where: str) -> tuple[str, str]:
    if value is None:
        return ("", "")
    if isinstance(value, str):
        return ("", value)
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return (value[0], value[1])
    raise _fail(spec, f"'{where}' must be a string or [strip_from_image, add_for_label]")


def load_custom_dataset(spec: Path) -> DatasetInfo:
    """DatasetInfo of a spec YAML: absolute paths in sem_seg/panoptic, `root` = the spec's directory."""
    spec = Path(spec).resolve()
    data = _read_spec(spec)
    semantic = data.get("semantic") or {}
    panoptic = data.get("panoptic") or {}
    if not semantic and not panoptic:
        raise _fail(spec, "needs a 'semantic' and/or 'panoptic' section with splits (train, val, ...)")
    for section, keys in (("semantic", SEMANTIC_KEYS), ("panoptic", PANOPTIC_KEYS)):
        sec = data.get(section) or {}
        if not isinstance(sec, dict):
            raise _fail(spec, f"'{section}' must map split names to {{{', '.join(keys)}}}")
        for split, entry in sec.items():
            if not isinstance(entry, dict):
                raise _fail(spec, f"'{section}.{split}' must be a mapping with {', '.join(keys)}")
            for k in entry:
                if k not in keys:
                    raise _unknown_key(spec, f"{section}.{split}.", str(k), keys)
            required = keys[:2] if section == "semantic" else keys
            for k in required:
                if k not in entry:
                    raise _fail(spec, f"'{section}.{split}' lacks '{k}'")
    sem_seg = {str(s): (str(_path(spec, e["images"], f"semantic.{s}.images")),
                        str(_path(spec, e["labels"], f"semantic.{s}.labels"))) for s, e in semantic.items()}
    pan = {str(s): (str(_path(spec, e["images"], f"panoptic.{s}.images")),
                    str(_path(spec, e["json"], f"panoptic.{s}.json")),
                    str(_path(spec, e["pngs"], f"panoptic.{s}.pngs"))) for s, e in panoptic.items()}
    suffixes = {_suffix(spec, e.get("label_suffix", data.get("label_suffix")), f"semantic.{s}.label_suffix")
                for s, e in semantic.items()}
    if len(suffixes) > 1:
        raise _fail(spec, "label_suffix must be the same for every split")
    label_suffix = suffixes.pop() if suffixes else ("", "")
    first_json = Path(next(iter(pan.values()))[1]) if pan else None
    classes = _classes(spec, data, first_json)
    ignore = data.get("ignore_label", 255)
    if not isinstance(ignore, int) or isinstance(ignore, bool) or not 0 <= ignore <= 65535:
        raise _fail(spec, f"'ignore_label' must be an integer 0..65535, got {ignore!r}")
    if ignore < len(classes):
        raise _fail(spec, f"'ignore_label' {ignore} collides with class index {ignore} ('{classes[ignore]}')")
    things = _thing_ids(spec, data.get("thing_classes"), classes)
    dataset_ids: tuple[int, ...] = ()
    if pan:
        dataset_ids = tuple(range(1, len(classes) + 1))
        if first_json is not None and first_json.is_file():
            cats = _json_categories(spec, first_json)
            by_name = {c.get("name"): c for c in cats}
            missing = [c for c in classes if c not in by_name]
            if missing:
                raise _fail(spec, f"classes not among the categories of {first_json}: {', '.join(missing[:5])}")
            dataset_ids = tuple(int(by_name[c]["id"]) for c in classes)
            if data.get("thing_classes") is None:
                things = tuple(k for k, c in enumerate(classes) if by_name[c].get("isthing"))
    name = data.get("name") or spec.stem
    if not isinstance(name, str):
        raise _fail(spec, "'name' must be a string")
    return DatasetInfo(
        name=name, classes=tuple(classes), ignore_label=ignore, task="panoptic" if pan else "semantic",
        thing_ids=things, colors=default_palette(len(classes)), dataset_ids=dataset_ids, dirname="",
        sem_seg=sem_seg, label_suffix=label_suffix, panoptic=pan, root=str(spec.parent),
    )


def _thing_ids(spec: Path, value: Any, classes: list[str]) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _fail(spec, "'thing_classes' must be a list of class names or indices")
    out = []
    for v in value:
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(classes):
            out.append(v)
        elif isinstance(v, str) and v in classes:
            out.append(classes.index(v))
        else:
            raise _fail(spec, f"'thing_classes': {v!r} is not a class name or index")
    return tuple(sorted(set(out)))


# ------------------------------------------------------------------------------------------------ check


@dataclass
class CheckReport:
    """Result of `check_custom`: every problem (file: what), and class pixel counts per split."""

    info: DatasetInfo
    problems: list[str] = field(default_factory=list)
    pixels: dict[str, np.ndarray] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)
    ignored: dict[str, int] = field(default_factory=dict)


def _files(root: Path, exts: tuple[str, ...]) -> Iterator[Path]:
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."):
            yield p


def _key(path: Path, root: Path, suffix: str) -> str | None:
    rel = path.relative_to(root)
    stem = rel.stem
    if suffix:
        if not stem.endswith(suffix):
            return None
        stem = stem[: -len(suffix)]
    return str(rel.parent / stem)


def _open(path: Path) -> tuple[np.ndarray | None, tuple[int, int] | None, str | None]:
    """(array, (w, h), error). Decodes fully so truncated or corrupt files are found (PIL raises)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return np.array(im), im.size, None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a reportable problem
        return None, None, f"{type(e).__name__}: {e}"


# EXIF orientations that transpose or rotate by 90/270 degrees: the loader's exif_transpose swaps W and H
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


def _image_size(path: Path) -> tuple[tuple[int, int] | None, int, str | None]:
    """((w, h) as the loader sees it, i.e. after EXIF orientation, orientation tag (1 = none), error).

    datasets.read_image applies ImageOps.exif_transpose, so sizes are compared in that orientation. The tag
    comes from the header (getexif, as exif_transpose reads it); pixels are decoded only to find corrupt files.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            try:
                orientation = int(im.getexif().get(0x0112, 1))
            except Exception:  # noqa: BLE001 - a malformed EXIF block: the loader would not rotate either
                orientation = 1
            im.load()
            w, h = im.size
    except Exception as e:  # noqa: BLE001
        return None, 1, f"{type(e).__name__}: {e}"
    return ((h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)), orientation, None


def _size_mismatch(path: Path, what: str, size: tuple[int, int], img: Path, img_size: tuple[int, int],
                   orientation: int) -> str:
    msg = f"{path}: {what} is {size[0]}x{size[1]} but image {img.name} is {img_size[0]}x{img_size[1]}"
    if orientation in _SWAPPING_ORIENTATIONS:
        msg += (f" (WxH) as loaded: the image is EXIF-rotated (Orientation={orientation}; its pixels are stored "
                f"as {img_size[1]}x{img_size[0]} and the loader rotates them); save the image upright without "
                f"the tag, or rotate the {what} to match")
    return msg


def check_custom(spec: Path) -> CheckReport:
    """Validate a custom dataset: pairs, readability, sizes, label values; reports every problem."""
    info = load_custom_dataset(spec)
    rep = CheckReport(info)
    k = info.num_classes
    strip, add = info.label_suffix
    for split, (img_dir, lab_dir) in info.sem_seg.items():
        img_root, lab_root = Path(img_dir), Path(lab_dir)
        ok = True
        for what, d in (("images", img_root), ("labels", lab_root)):
            if not d.is_dir():
                rep.problems.append(f"{d}: {split} {what} directory does not exist")
                ok = False
        if not ok:
            continue
        images: dict[str, Path] = {}
        for p in _files(img_root, IMAGE_EXTENSIONS):
            key = _key(p, img_root, strip)
            if key is None:
                rep.problems.append(f"{p}: image name does not end with '{strip}'")
            elif key in images:
                rep.problems.append(f"{p}: same name as {images[key].name} (two images for one label)")
            else:
                images[key] = p
        labels: dict[str, Path] = {}
        for p in _files(lab_root, LABEL_EXTS):
            key = _key(p, lab_root, add)
            if key is None:
                rep.problems.append(f"{p}: label name does not end with '{add}'")
            elif key in labels:
                rep.problems.append(f"{p}: same name as {labels[key].name} (two labels for one image)")
            else:
                labels[key] = p
        for key in sorted(set(images) - set(labels)):
            rep.problems.append(f"{images[key]}: no label (expected {lab_root / (key + add)}.png)")
        for key in sorted(set(labels) - set(images)):
            rep.problems.append(f"{labels[key]}: no image (expected {img_root / (key + strip)}.<jpg|png|...>)")
        counts = np.zeros(k, np.int64)
        ignored = 0
        for key in sorted(set(images) & set(labels)):
            img, lab = images[key], labels[key]
            size, orientation, err = _image_size(img)
            if err:
                rep.problems.append(f"{img}: unreadable image ({err})")
            arr, lsize, lerr = _open(lab)
            if lerr:
                rep.problems.append(f"{lab}: unreadable label ({lerr})")
                continue
            assert arr is not None
            if arr.ndim != 2:
                rep.problems.append(f"{lab}: label has {arr.shape[2]} channels; expected one channel of class "
                                    f"indices (a palette or grayscale PNG)")
                continue
            if size is not None and lsize != size:
                rep.problems.append(_size_mismatch(lab, "label", lsize, img, size, orientation))
            values = arr.astype(np.int64).ravel()
            bad = (values >= k) & (values != info.ignore_label) | (values < 0)
            if bad.any():
                shown = ", ".join(str(v) for v in np.unique(values[bad])[:8])
                rep.problems.append(f"{lab}: {int(bad.sum())} pixels with values outside 0..{k - 1} and ignore "
                                    f"{info.ignore_label}: {shown}")
            good = values[(values >= 0) & (values < k)]
            counts += np.bincount(good, minlength=k)[:k]
            ignored += int((values == info.ignore_label).sum())
        rep.pixels[split] = counts
        rep.images[split] = len(set(images) & set(labels))
        rep.ignored[split] = ignored
    for split, (img_dir, json_path, png_dir) in info.panoptic.items():
        _check_panoptic(rep, f"panoptic:{split}", Path(img_dir), Path(json_path), Path(png_dir))
    return rep


def _check_panoptic(rep: CheckReport, split: str, img_root: Path, json_path: Path, png_root: Path) -> None:
    info = rep.info
    k = info.num_classes
    # a misspelled path is one problem, not one per annotation (as for semantic splits)
    missing = [f"{p}: {split} {what} does not exist" for p, what, ok in (
        (img_root, "images directory", img_root.is_dir()), (json_path, "json file", json_path.is_file()),
        (png_root, "pngs directory", png_root.is_dir())) if not ok]
    if missing:
        rep.problems.extend(missing)
        return
    try:
        data = json.loads(json_path.read_text())
        annotations, images = data["annotations"], data["images"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        rep.problems.append(f"{json_path}: cannot read COCO panoptic JSON ({e})")
        return
    to_contiguous = {cid: i for i, cid in enumerate(info.dataset_ids)}
    by_id = {im.get("id"): im for im in images if isinstance(im, dict)}
    counts = np.zeros(k, np.int64)
    for ann in annotations:
        png = png_root / str(ann.get("file_name", ""))
        image = by_id.get(ann.get("image_id"))
        if image is None:
            rep.problems.append(f"{json_path}: annotation {ann.get('file_name')} has image_id "
                                f"{ann.get('image_id')!r} not in 'images'")
            continue
        img = img_root / str(image.get("file_name", ""))
        if not img.is_file():
            rep.problems.append(f"{img}: image listed in {json_path.name} is missing")
        size, orientation, err = _image_size(img) if img.is_file() else (None, 1, None)
        if err:
            rep.problems.append(f"{img}: unreadable image ({err})")
        if not png.is_file():
            rep.problems.append(f"{png}: panoptic PNG listed in {json_path.name} is missing")
            continue
        arr, psize, perr = _open(png)
        if perr or arr is None:
            rep.problems.append(f"{png}: unreadable panoptic PNG ({perr})")
            continue
        if arr.ndim != 3 or arr.shape[2] < 3:
            rep.problems.append(f"{png}: panoptic PNG must be RGB (id = R + 256 G + 256^2 B)")
            continue
        if size is not None and psize != size:
            rep.problems.append(_size_mismatch(png, "PNG", psize, img, size, orientation))
        ids = rgb2id(arr[..., :3].astype(np.int64))
        listed = {}
        for s in ann.get("segments_info", []):
            cat = s.get("category_id")
            if cat not in to_contiguous:
                rep.problems.append(f"{png}: segment {s.get('id')} has unknown category_id {cat}")
                continue
            listed[s.get("id")] = to_contiguous[cat]
        present, areas = np.unique(ids, return_counts=True)
        for sid, area in zip(present.tolist(), areas.tolist(), strict=True):
            if sid == 0:
                continue
            if sid not in listed:
                rep.problems.append(f"{png}: segment id {sid} in the PNG is not in segments_info")
                continue
            counts[listed[sid]] += area
    rep.pixels[split] = counts
    rep.images[split] = len(annotations)
    rep.ignored[split] = 0
