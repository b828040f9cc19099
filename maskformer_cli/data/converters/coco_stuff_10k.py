"""COCO-Stuff-10K (171 classes, 9k train / 1k test) from the official .mat annotations.

Archive: cocostuff-10k-v1.1.zip (the default: public URL, read with scipy). Its .mat field `S` holds
0 = unlabeled and 1..182 = COCO category ids; the 11 ids without annotations {12, 26, 29, 30, 45, 66, 68,
69, 71, 83, 91} are dropped, the remaining 171 ids in increasing order become 0..170, and 0 becomes 255.
The paper's code used v1.0 (HDF5 .mat, field S with 1 = unlabeled and 2..172 = the same 171 classes in
the same order, converted with S - 2): the label space is identical. A v1.0 archive is accepted too
(`--from-archive cocostuff-10k-v1.0.zip`); reading its HDF5 files needs `pip install h5py`.

Raw:    {images/*.jpg, annotations/*.mat, imageLists/{train,test}.txt}
Output: coco/coco_stuff_10k/{images_detectron2,annotations_detectron2}/{train,test}/ (as MaskFormer).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from maskformer_cli.data.converters.base import (
    ArchiveSpec,
    Context,
    Converter,
    find_root,
    image_size,
    label_lut,
    link_or_copy,
    register_archive,
    write_png,
)
from maskformer_cli.errors import UserError

STUFF_ZIP = register_archive(ArchiveSpec(
    filename="cocostuff-10k-v1.1.zip",
    url="http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/cocostuff-10k-v1.1.zip",
    present=("imageLists/train.txt", "imageLists/test.txt", "images", "annotations"),
    aliases=("cocostuff-10k-v1.*.zip",),
))

SPLITS = ("train", "test")
UNUSED_COCO_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)


def v11_lut() -> np.ndarray:
    """uint8 [256]: v1.1 raw value (0 unlabeled, 1..182 COCO ids) -> 0..170, 255."""
    from maskformer_cli.data.catalog import load_class_file

    ids = [int(i) for i, _ in load_class_file("coco_stuff_171.json")]
    return label_lut({cid: k for k, cid in enumerate(ids)}, 256, 255)


def v10_lut() -> np.ndarray:
    """uint8 [256]: v1.0 raw value (1 unlabeled, 2..172) -> S - 2, 255 otherwise."""
    return label_lut({v: v - 2 for v in range(2, 173)}, 256, 255)


def read_mat_labels(path: Path) -> tuple[np.ndarray, str]:
    """(raw S [H,W], 'v1.1' | 'v1.0') from a COCO-Stuff-10K .mat file."""
    import scipy.io

    try:
        return np.asarray(scipy.io.loadmat(str(path))["S"]), "v1.1"
    except NotImplementedError:  # MATLAB v7.3 = HDF5: the v1.0 release
        pass
    except (ValueError, KeyError, OSError, TypeError) as e:
        raise UserError(f"{path}: cannot read the label field S ({e})") from None
    try:
        import h5py
    except ModuleNotFoundError:
        raise UserError(f"{path} is a COCO-Stuff-10K v1.0 (HDF5) annotation: install h5py (`pip install h5py`) "
                        f"or use cocostuff-10k-v1.1.zip") from None
    try:
        with h5py.File(path, "r") as f:
            return np.asarray(f["S"]).T, "v1.0"  # HDF5 stores MATLAB arrays transposed
    except (OSError, KeyError) as e:
        raise UserError(f"{path}: cannot read the label field S ({e})") from None


def convert(ctx: Context) -> dict[str, int]:
    src = find_root(ctx.source(STUFF_ZIP), "imageLists/train.txt")
    luts = {"v1.1": v11_lut(), "v1.0": v10_lut()}
    counts = {}
    for split in SPLITS:
        list_file = src / "imageLists" / f"{split}.txt"
        if not list_file.is_file():
            raise UserError(f"{list_file}: missing image list")
        names = [n.strip() for n in list_file.read_text().splitlines() if n.strip()]
        for name in ctx.track(names, f"coco-stuff-10k {split}"):
            img = src / "images" / f"{name}.jpg"
            mat = src / "annotations" / f"{name}.mat"
            for f in (img, mat):
                if not f.is_file():
                    raise UserError(f"{f}: listed in {list_file.name} but missing")
            raw, version = read_mat_labels(mat)
            w, h = image_size(img)
            if raw.shape != (h, w):
                raise UserError(f"{mat}: labels are {raw.shape[1]}x{raw.shape[0]} but the image is {w}x{h}")
            if raw.min(initial=0) < 0 or raw.max(initial=0) > 255:
                raise UserError(f"{mat}: label values outside 0..255")
            write_png(ctx.out / "annotations_detectron2" / split / f"{name}.png", luts[version][raw.astype(np.int64)])
            link_or_copy(img, ctx.out / "images_detectron2" / split / img.name)
        counts[split] = len(names)
    ctx.adopt_all(src)
    return counts


CONVERTER = Converter(name="coco_stuff_10k", archives=(STUFF_ZIP,), convert=convert,
                      outputs=("images_detectron2", "annotations_detectron2"))
