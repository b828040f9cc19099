"""Mapillary Vistas v1.2 (65 classes, ignore 65): labels are used as they are, no conversion.

Registration-only: download mapillary-vistas-dataset_public_v1.2.zip from
https://www.mapillary.com/dataset/vistas and pass it with --from-archive.

Labels are 8-bit palette PNGs whose palette INDEX is the class (0..64, 65 = unlabeled): they must be read
as indices (PIL without convert), never as RGB. Archives that nest the v1.2 labels under
`<split>/v1.2/{labels,instances,panoptic}` (the v2.0 release, MMSegmentation's layout) are accepted and
flattened to `<split>/labels` (the detectron2/MaskFormer layout).
"""

from __future__ import annotations

from pathlib import Path

from maskformer_cli.data.converters.base import (
    ArchiveSpec,
    Context,
    Converter,
    find_root,
    read_label,
    register_archive,
)
from maskformer_cli.errors import UserError

VISTAS_ZIP = register_archive(ArchiveSpec(
    filename="mapillary-vistas-dataset_public_v1.2.zip",
    present=("training/images", "training/labels", "validation/images", "validation/labels"),
    aliases=("mapillary-vistas-dataset_public_v*.zip",),
    how_to_get="register at https://www.mapillary.com/dataset/vistas, download "
               "mapillary-vistas-dataset_public_v1.2.zip, then run `maskformer prepare-data mapillary "
               "--from-archive PATH/mapillary-vistas-dataset_public_v1.2.zip`",
))

SPLITS = {"train": "training", "val": "validation"}
IGNORE = 65
SAMPLE = 16  # labels per split whose mode and value range are checked


def label_dir(split_dir: Path, kind: str = "labels") -> Path | None:
    for cand in (split_dir / kind, split_dir / "v1.2" / kind):
        if cand.is_dir():
            return cand
    return None


def check_label(path: Path) -> None:
    """A Vistas v1.2 label must be single-channel indices 0..65."""
    from PIL import Image

    with Image.open(path) as im:
        mode = im.mode
    if mode not in ("P", "L"):
        raise UserError(f"{path}: label image mode {mode}; expected palette indices (mode P). Use the "
                        f"original v1.2 labels, not an RGB rendering")
    arr = read_label(path)
    if int(arr.max(initial=0)) > IGNORE:
        raise UserError(f"{path}: label value {int(arr.max())} > {IGNORE}: not a Vistas v1.2 label (v2.0 has 124 "
                        f"classes; use the v1.2 labels)")


def convert(ctx: Context) -> dict[str, int]:
    root = find_root(ctx.source(VISTAS_ZIP), "training/images")
    counts = {}
    for split, d in SPLITS.items():
        images = sorted((root / d / "images").glob("*.jpg"))
        labels = label_dir(root / d)
        if labels is None:
            raise UserError(f"{root / d}: no labels/ (or v1.2/labels/) directory")
        missing = [p.name for p in images if not (labels / f"{p.stem}.png").is_file()]
        if missing:
            raise UserError(f"{labels}: {len(missing)} images have no label, e.g. {missing[0]}")
        step = max(1, len(images) // SAMPLE)
        for img in ctx.track(images[::step][:SAMPLE], f"mapillary {split} (check)"):
            check_label(labels / f"{img.stem}.png")
        counts[split] = len(images)
        for kind in ("labels", "instances", "panoptic"):
            found = label_dir(root / d, kind)
            if found is not None and found != root / d / kind:
                ctx.adopt(found, f"{d}/{kind}")  # flatten <split>/v1.2/<kind> (never live: see `present`)
    ctx.adopt_all(root)
    return counts


CONVERTER = Converter(name="mapillary", archives=(VISTAS_ZIP,), convert=convert)
