"""Per-dataset facts: class names, colors, thing/stuff split, ignore label, file layout.

`get_dataset_info(name)` is the one entry point; every other module asks it, never hard-codes a dataset.
The `DatasetInfo` it returns (and `IMAGE_EXTENSIONS`) are defined in dataset_info.py, which custom dataset
specs (custom.py) build on too.
Dataset names use dashes on the command line (`ade20k-full`) and either form in recipes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from maskformer_cli.data.dataset_info import DatasetInfo, default_palette
from maskformer_cli.errors import UserError

# name -> factory(**kwargs) -> DatasetInfo. Factories let the synthetic set take its class count.
_REGISTRY: dict[str, Callable[..., DatasetInfo]] = {}


def register(name: str) -> Callable[[Callable[..., DatasetInfo]], Callable[..., DatasetInfo]]:
    def deco(fn: Callable[..., DatasetInfo]) -> Callable[..., DatasetInfo]:
        _REGISTRY[canonical_name(name)] = fn
        return fn

    return deco


def canonical_name(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def available() -> list[str]:
    return sorted(n.replace("_", "-") for n in _REGISTRY)


def get_dataset_info(name: str | os.PathLike[str], **kwargs: object) -> DatasetInfo:
    """Facts of a catalog dataset; `kwargs` go to datasets that take parameters (synthetic).

    A name ending in .yaml/.yml is a custom dataset spec (see data/custom.py): its DatasetInfo has
    absolute paths and `root` set.
    """
    if str(name).lower().endswith((".yaml", ".yml")):
        from maskformer_cli.data.custom import load_custom_dataset

        return load_custom_dataset(Path(name))
    name = str(name)
    key = canonical_name(name)
    if key not in _REGISTRY:
        import difflib

        _not_a_spec(name)
        close = difflib.get_close_matches(key, list(_REGISTRY), n=1)
        hint = f" (did you mean '{close[0].replace('_', '-')}'?)" if close else ""
        raise UserError(f"unknown dataset '{name}'{hint}; known: {', '.join(available())}")
    return _REGISTRY[key](**kwargs)


def _not_a_spec(name: str) -> None:
    """UserError for an unknown name that is an existing path: a custom dataset is given as its spec YAML."""
    path = Path(name).expanduser()
    see = "see README, Fine-tuning on your own data"
    if path.is_dir():
        specs = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".yaml", ".yml"))
        if len(specs) == 1:
            hint = f"; did you mean {specs[0]}?"
        elif specs:
            hint = f"; it has {', '.join(p.name for p in specs[:5])}" + (" ..." if len(specs) > 5 else "")
        else:
            hint = ""
        raise UserError(f"'{name}' is a directory: give the path of its dataset spec YAML ({see}){hint}")
    if path.exists():
        raise UserError(f"'{name}' is not a dataset spec: a custom dataset is given as the path of its spec "
                        f"YAML, ending in .yaml or .yml ({see})")


def datasets_root(root: str | os.PathLike[str] | None = None) -> Path:
    """$MASKFORMER_DATASETS, else $DETECTRON2_DATASETS, else ./datasets (or `root` when given)."""
    if root is not None:
        return Path(root)
    for var in ("MASKFORMER_DATASETS", "DETECTRON2_DATASETS"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path("datasets")


def dataset_dir(info: DatasetInfo, root: str | os.PathLike[str] | None = None) -> Path:
    """Where a dataset lives: a custom spec's own folder (`info.root`), else `datasets_root(root)/info.dirname`
    (root: the recipe's data.root or prepare-data's --root; None: the environment's)."""
    return Path(info.root) if info.root else datasets_root(root) / info.dirname


def load_class_file(filename: str):
    """Parsed JSON data file from maskformer_cli/data/class_names/ (class names, colors, id tables)."""
    import json
    from importlib import resources

    return json.loads(resources.files("maskformer_cli.data").joinpath(f"class_names/{filename}").read_text())


# ------------------------------------------------------------------------------------ the embedded set


SYNTHETIC_SHAPES = ("disk", "square", "triangle", "ring", "cross", "bar")


@register("synthetic")
def _synthetic(num_classes: int = 12, **_: object) -> DatasetInfo:
    """Embedded dataset: the first third of classes are stuff (textured background regions), the rest things."""
    if num_classes < 2:
        raise UserError(f"synthetic dataset needs at least 2 classes, got {num_classes}")
    num_stuff = max(1, num_classes // 3)
    names = [f"stuff_{i}" for i in range(num_stuff)]
    names += [f"{SYNTHETIC_SHAPES[i % len(SYNTHETIC_SHAPES)]}_{i}" for i in range(num_stuff, num_classes)]
    return DatasetInfo(
        name="synthetic",
        classes=tuple(names),
        ignore_label=255,
        task="panoptic",
        thing_ids=tuple(range(num_stuff, num_classes)),
        colors=default_palette(num_classes),
        dataset_ids=tuple(range(1, num_classes + 1)),
        dirname=f"synthetic_k{num_classes}", test_size=(0, 2048),
        sem_seg={"train": ("images/training", "annotations_detectron2/training"),
                 "val": ("images/validation", "annotations_detectron2/validation")},
        panoptic={"train": ("images/training", "panoptic_train.json", "panoptic_train"),
                  "val": ("images/validation", "panoptic_val.json", "panoptic_val")},
    )


# ------------------------------------------------------------------------------ the paper's datasets
# Layouts are those of detectron2/MaskFormer, so existing prepared trees work unchanged; prepare-data
# (commands/prepare_data.py, data/converters/) makes them from the official archives.

_ADE_SEM_SEG = {"train": ("images/training", "annotations_detectron2/training"),
                "val": ("images/validation", "annotations_detectron2/validation")}


def _ade20k_meta() -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...], tuple[int, ...]]:
    meta = load_class_file("ade20k_150.json")
    things = sorted({int(s) - 1 for _, s in meta["instance_to_semantic"]})
    return tuple(meta["names"]), tuple(tuple(c) for c in meta["colors"]), tuple(things)


@register("ade20k")
def _ade20k(**_: object) -> DatasetInfo:
    """ADE20K-150 (SceneParsing): 20,210 train / 2,000 val; labels 0..149, 255 ignore."""
    names, colors, _things = _ade20k_meta()
    return DatasetInfo(name="ade20k", classes=names, colors=colors, ignore_label=255, task="semantic",
                       dirname="ADEChallengeData2016", sem_seg=dict(_ADE_SEM_SEG))


@register("ade20k-panoptic")
def _ade20k_panoptic(**_: object) -> DatasetInfo:
    """ADE20K panoptic: the 150 classes, 100 of them things; category ids 0..149 in the panoptic JSON."""
    names, colors, things = _ade20k_meta()
    return DatasetInfo(
        name="ade20k_panoptic", classes=names, colors=colors, ignore_label=255, task="panoptic",
        thing_ids=things, dataset_ids=tuple(range(len(names))), dirname="ADEChallengeData2016",
        sem_seg=dict(_ADE_SEM_SEG), test_size=(640, 2560),
        panoptic={"train": ("images/training", "ade20k_panoptic_train.json", "ade20k_panoptic_train"),
                  "val": ("images/validation", "ade20k_panoptic_val.json", "ade20k_panoptic_val")},
    )


@register("ade20k-full")
def _ade20k_full(**_: object) -> DatasetInfo:
    """ADE20K-Full: 847 classes, uint16 TIFF labels with 65535 ignore (MaskFormer's layout)."""
    names = tuple(n for _, n in load_class_file("ade20k_full_847.json"))
    return DatasetInfo(
        name="ade20k_full", classes=names, colors=default_palette(len(names)), ignore_label=65535,
        task="semantic", dirname="ADE20K_2021_17_01",
        sem_seg={"train": ("images_detectron2/training", "annotations_detectron2/training"),
                 "val": ("images_detectron2/validation", "annotations_detectron2/validation")},
    )


@register("coco-stuff-10k")
def _coco_stuff_10k(**_: object) -> DatasetInfo:
    """COCO-Stuff-10K: 171 classes (80 things + 91 stuff), 9k train / 1k test; "val" is the test split."""
    classes = load_class_file("coco_stuff_171.json")
    pan = {int(c[0]): tuple(c[3]) for c in load_class_file("coco_panoptic_133.json")}
    names = tuple(n for _, n in classes)
    palette = default_palette(len(names))
    colors = tuple(pan.get(int(i), palette[k]) for k, (i, _) in enumerate(classes))
    test = ("images_detectron2/test", "annotations_detectron2/test")
    return DatasetInfo(
        name="coco_stuff_10k", classes=names, colors=colors, ignore_label=255, task="semantic",
        dirname="coco/coco_stuff_10k", test_size=(640, 2560),
        sem_seg={"train": ("images_detectron2/train", "annotations_detectron2/train"), "test": test, "val": test},
    )


@register("cityscapes")
def _cityscapes(**_: object) -> DatasetInfo:
    """Cityscapes: 19 trainId classes, 255 ignore; images and labels in per-city subfolders."""
    table = load_class_file("cityscapes.json")["labels"]
    train = sorted((int(t), name, tuple(c)) for name, _i, t, c in table if 0 <= int(t) < 255)
    return DatasetInfo(
        name="cityscapes", classes=tuple(n for _, n, _ in train), colors=tuple(c for _, _, c in train),
        ignore_label=255, task="semantic", dirname="cityscapes",
        sem_seg={"train": ("leftImg8bit/train", "gtFine/train"), "val": ("leftImg8bit/val", "gtFine/val")},
        label_suffix=("_leftImg8bit", "_gtFine_labelTrainIds"), test_size=(0, 2048),
    )


@register("mapillary")
def _mapillary(**_: object) -> DatasetInfo:
    """Mapillary Vistas v1.2: 65 classes, 65 = unlabeled = ignore; palette-index PNG labels."""
    cats = load_class_file("mapillary_vistas_v1.2.json")
    return DatasetInfo(
        name="mapillary", classes=tuple(c[0] for c in cats), colors=tuple(tuple(c[1]) for c in cats),
        ignore_label=65, task="semantic", dirname="mapillary_vistas", test_size=(2048, 2048),
        sem_seg={"train": ("training/images", "training/labels"), "val": ("validation/images", "validation/labels")},
    )


@register("coco-panoptic")
def _coco_panoptic(**_: object) -> DatasetInfo:
    """COCO panoptic 2017: 133 categories (80 things), dataset ids 1..200 -> contiguous 0..132."""
    cats = sorted(load_class_file("coco_panoptic_133.json"))
    return DatasetInfo(
        name="coco_panoptic", classes=tuple(c[1] for c in cats), colors=tuple(tuple(c[3]) for c in cats),
        ignore_label=255, task="panoptic", thing_ids=tuple(k for k, c in enumerate(cats) if c[2]),
        dataset_ids=tuple(int(c[0]) for c in cats), dirname="coco", test_size=(800, 1333),
        sem_seg={"train": ("train2017", "panoptic_semseg_train2017"), "val": ("val2017", "panoptic_semseg_val2017")},
        panoptic={"train": ("train2017", "annotations/panoptic_train2017.json", "panoptic_train2017"),
                  "val": ("val2017", "annotations/panoptic_val2017.json", "panoptic_val2017")},
    )
