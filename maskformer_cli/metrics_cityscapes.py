"""Cityscapes' official pixel-level scores, as the benchmark reports them: IoU and iIoU per class and per
category, computed by cityscapesscripts (the `cityscapes` extra) on labelId images.

The model predicts the 19 trainIds; the official evaluation reads labelIds (0..33) and the ground truth's
`*_gtFine_labelIds.png` + `*_gtFine_instanceIds.png`. iIoU weights each ground-truth instance's pixels by
the class's average instance size over the instance's own size, so small objects count as much as large
ones (only for classes with instances: human and vehicle). The class IoU average equals our mIoU over
trainIds (same confusion counts, classes absent from prediction and ground truth left out).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from pathlib import Path

import numpy as np

from maskformer_cli.errors import UserError

# result keys, as the benchmark's table names them ("IoU class", "iIoU class", ...)
SCORES = {"IoU_class": "averageScoreClasses", "iIoU_class": "averageScoreInstClasses",
          "IoU_category": "averageScoreCategories", "iIoU_category": "averageScoreInstCategories"}
LABEL_IDS_DIR = "labelIds"  # predict --dataset cityscapes, evaluate --metric cityscapes: labelId PNGs here
GT_LABEL_SUFFIX = "_gtFine_labelIds.png"
GT_INSTANCE_SUFFIX = "_gtFine_instanceIds.png"


def train_id_to_label_id() -> np.ndarray:
    """uint8 [256] lookup: trainId (0..18) -> labelId (7..33); every other value -> 0 ('unlabeled')."""
    from maskformer_cli.data.catalog import load_class_file

    lut = np.zeros(256, dtype=np.uint8)
    for _name, label_id, train_id, _color in load_class_file("cityscapes.json")["labels"]:
        if 0 <= int(train_id) < 255 and int(label_id) >= 0:
            lut[int(train_id)] = int(label_id)
    return lut


def to_label_ids(train_ids: np.ndarray, lut: np.ndarray | None = None) -> np.ndarray:
    """[H, W] trainId map (any integer dtype) -> [H, W] uint8 labelId map."""
    lut = train_id_to_label_id() if lut is None else lut
    return lut[np.clip(np.asarray(train_ids), 0, 255).astype(np.intp)]


def result_name(image_stem: str) -> str:
    """The file name the evaluation server and cityscapesscripts match by `<city>_<seq>_<frame>*.png`."""
    return f"{image_stem}.png"


def ground_truth_pairs(gt_dir: Path, limit: int | None = None) -> list[Path]:
    """The `*_gtFine_labelIds.png` below `gt_dir` (per-city folders), sorted; each with its instanceIds."""
    files = sorted(gt_dir.rglob(f"*{GT_LABEL_SUFFIX}"))[:limit]
    if not files:
        raise UserError(f"no *{GT_LABEL_SUFFIX} in {gt_dir} or its sub-folders: the official Cityscapes scores "
                        "read labelIds (prepare-data cityscapes keeps them from gtFine_trainvaltest.zip)")
    for f in files:
        inst = f.with_name(f.name.replace(GT_LABEL_SUFFIX, GT_INSTANCE_SUFFIX))
        if not inst.exists():
            raise UserError(f"{inst}: missing (iIoU needs each image's instanceIds beside its labelIds)")
    return files


def frame_key(stem: str) -> str:
    """`frankfurt_000000_000294_leftImg8bit` -> `frankfurt_000000_000294` (city, sequence, frame)."""
    return "_".join(stem.split("_")[:3])


def official_scores(predictions: dict[str, Path], gt_files: list[Path]) -> dict[str, float]:
    """Percent scores of labelId prediction PNGs against Cityscapes ground truth.

    predictions: frame key (`<city>_<seq>_<frame>`) -> labelId PNG [H, W] uint8, same size as its ground truth.
    gt_files: `*_gtFine_labelIds.png` paths (their `*_gtFine_instanceIds.png` beside them).
    Returns IoU_class, iIoU_class, IoU_category, iIoU_category (NaN where nothing is defined) and
    `per_class_official` {class name: (IoU, iIoU)}.
    """
    try:
        from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval
    except ImportError as e:
        raise UserError(f"the official Cityscapes scores need cityscapesscripts ({e}): "
                        "pip install 'maskformer-cli[cityscapes]'") from None
    pred_list, missing = [], []
    for gt in gt_files:
        key = frame_key(gt.name)
        if key in predictions:
            pred_list.append(str(predictions[key]))
        else:
            missing.append(gt.name)
    if missing:
        raise UserError(f"{len(missing)} ground-truth images have no prediction (first: {', '.join(missing[:5])})")
    args = copy.copy(cs_eval.args)  # the module keeps its settings in a global; leave it as it was
    args.quiet, args.JSONOutput, args.colorized = True, False, False
    args.evalInstLevelScore, args.evalPixelAccuracy = True, False
    args.bold = args.nocol = ""
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):
            res = cs_eval.evaluateImgLists(pred_list, [str(g) for g in gt_files], args)
    except SystemExit:  # cityscapesscripts reports a bad file by printing "ERROR: ..." and exiting
        message = said.getvalue().strip().splitlines()
        raise UserError(f"cityscapesscripts: {message[-1] if message else 'evaluation failed'}") from None
    out = {name: _percent(res[key]) for name, key in SCORES.items()}
    out["per_class_official"] = {name: (_percent(res["classScores"][name]), _percent(res["classInstScores"][name]))
                                 for name in res["classScores"]}
    return out


def _percent(x: float) -> float:
    return math.nan if x is None or math.isnan(x) else 100.0 * float(x)


class LabelIdWriter:
    """`evaluate`'s on_prediction callback for a Cityscapes model: writes each image's semantic map as a
    labelId PNG in `out_dir` (named for the evaluation server) and remembers its ground truth; `scores()`
    gathers what every rank wrote and scores it once, on the main rank (NaNs elsewhere)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.lut = train_id_to_label_id()
        self.written: dict[str, tuple[str, str]] = {}  # frame key -> (prediction PNG, ground-truth labelIds)

    def __call__(self, pred: dict, meta: dict) -> None:
        from PIL import Image

        stem = Path(meta["file_name"]).stem
        target = self.out_dir / result_name(stem)
        Image.fromarray(to_label_ids(pred["sem_seg"].cpu().numpy(), self.lut)).save(target)
        gt = Path(meta["sem_seg_file"])
        gt = gt.with_name(frame_key(gt.name) + GT_LABEL_SUFFIX)
        self.written[frame_key(stem)] = (str(target), str(gt))

    def scores(self) -> dict[str, float]:
        from maskformer_cli import distributed as dist

        written = dict(self.written)
        if dist.get_world_size() > 1:
            import torch.distributed as tdist

            parts: list = [None] * dist.get_world_size()
            tdist.all_gather_object(parts, written)
            written = {k: v for part in parts for k, v in part.items()}
        if not dist.is_main():
            return {name: math.nan for name in SCORES}
        gt_files = sorted(Path(gt) for _, gt in written.values())
        for f in gt_files:
            if not f.exists():
                raise UserError(f"{f}: missing (the official Cityscapes scores read labelIds and instanceIds "
                                "beside the labelTrainIds)")
        preds = {k: Path(p) for k, (p, _) in written.items()}
        return official_scores(preds, gt_files)
