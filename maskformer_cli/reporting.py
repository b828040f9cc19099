"""What people read: rank-0 logs (metrics.jsonl, results.csv), Rich progress and tables, overlays, plots."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from maskformer_cli.errors import UserError

if TYPE_CHECKING:
    from PIL import Image

console = Console(stderr=True)


def is_tty() -> bool:
    return sys.stderr.isatty()


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class Logger:
    """Rank-0 run log: JSON lines for every logged step/eval, a CSV of evaluation results, console output.

    On other ranks every method is a no-op, so callers need no `if is_main` around logging.
    """

    def __init__(self, run_dir: Path | None, enabled: bool = True, quiet: bool = False):
        self.enabled = enabled and run_dir is not None
        self.quiet = quiet  # files are still written; only the console stays silent
        self.run_dir = run_dir
        self._progress: Progress | None = None
        self._task = None
        self._last_plain = 0.0

    # --------------------------------------------------------------------------------------------- files
    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")

    def reset(self) -> None:
        """A fresh start in an existing run directory (--exist-ok): the earlier run's logs are replaced, not
        appended to (its steps would otherwise appear twice)."""
        if self.enabled:
            for name in ("metrics.jsonl", "results.csv"):
                (self.run_dir / name).unlink(missing_ok=True)

    def rewind(self, step: int) -> int:
        """Forget what was logged after `step` (metrics.jsonl and results.csv), so that a run resumed from
        the checkpoint of `step` reads as one uninterrupted run: the steps between that checkpoint and a
        crash are logged again by the resumed run, not twice. Returns the number of records dropped."""
        if not self.enabled:
            return 0
        dropped = 0
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            lines = path.read_text(encoding="utf-8").splitlines()
            kept = []
            for line in lines:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the crash
                    dropped += 1
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
                    dropped += 1
                    continue
                kept.append(line)
            _replace_text(path, "".join(f"{line}\n" for line in kept))
        path = self.run_dir / "results.csv"
        if path.exists():
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                fields, rows = reader.fieldnames or [], list(reader)
            kept_rows = [r for r in rows if not (r.get("step", "").isdigit() and int(r["step"]) > step)]
            dropped += len(rows) - len(kept_rows)
            write_csv(kept_rows, path, fields)
        return dropped

    def result(self, row: dict[str, Any]) -> None:
        """Append an evaluation row to results.csv (columns grow as new metrics appear)."""
        if not self.enabled:
            return
        path = self.run_dir / "results.csv"
        rows = []
        if path.exists():
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        rows.append({k: v for k, v in row.items() if not isinstance(v, list | dict)})
        write_csv(rows, path)

    # ------------------------------------------------------------------------------------------ console
    def start(self, total: int, completed: int = 0, description: str = "train") -> None:
        if not self.enabled or self.quiet or not is_tty():
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=console, transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, completed=completed, info="")

    def advance(self, step: int, info: str) -> None:
        if not self.enabled or self.quiet:
            return
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)
        elif time.monotonic() - self._last_plain > 10 or step <= 1:
            self._last_plain = time.monotonic()
            console.print(f"step {step}: {info}", highlight=False)

    def print(self, *args: Any) -> None:
        if self.enabled and not self.quiet:
            console.print(*args, highlight=False)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return v.item()
    return v


class _RateColumn(ProgressColumn):
    """Items per second over the bar's recent window (Rich's own speed estimate)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text("" if task.speed is None else f"{task.speed:.2f} {self.unit}/s", style="progress.data.speed")


def progress_bar(description: str, total: int | None, enabled: bool = True, unit: str | None = None) -> Progress:
    """A Rich progress bar for long work (evaluation, prediction, downloads); silent when not a TTY.
    With `unit` (e.g. "img") it also shows the rate, e.g. 2.31 img/s."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns.append(_RateColumn(unit))
    return Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, disable=not (enabled and is_tty()), transient=False)


SUMMARY_KEYS = ("mIoU", "fwIoU", "mAcc", "pAcc", "PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st",
                "RQ_st", "PQ_stuff", "SQ_stuff", "RQ_stuff", "IoU_class", "iIoU_class", "IoU_category", "iIoU_category")


def metrics_table(metrics: dict[str, Any], title: str = "results") -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in SUMMARY_KEYS:
        if k in metrics and metrics[k] is not None:
            table.add_row(k, f"{metrics[k]:.2f}")
    for k in ("num_images", "images_per_s", "params_M", "gflops"):
        if k in metrics:
            v = metrics[k]
            table.add_row(k, f"{v:.2f}" if isinstance(v, float) else str(v))
    return table


def per_class_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="per class")
    keys = [k for k in ("IoU", "iIoU", "Acc", "PQ", "SQ", "RQ", "PQ_stuff") if any(k in r for r in rows)]
    table.add_column("id", justify="right")
    table.add_column("class")
    for k in keys:
        table.add_column(k, justify="right")
    for r in rows:
        vals = [r.get(k) for k in keys]
        table.add_row(str(r.get("class", r.get("id", ""))), str(r.get("name", "")),
                      *["-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}" for v in vals])
    return table


def write_csv(rows: list[dict[str, Any]], path: Path, fields: list[str] | None = None) -> None:
    """`rows` as CSV with a header, replacing `path` atomically. Columns: `fields`, else every key of the
    rows in order of first appearance (results.csv grows a column when a new metric appears)."""
    if fields is None:
        fields = []
        for r in rows:
            fields += [k for k in r if k not in fields]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ pictures


def colorize(labels: np.ndarray, colors: list[tuple[int, int, int]], ignore_label: int | None = None) -> np.ndarray:
    """[H,W] int labels -> [H,W,3] uint8 colors (ignore/void black)."""
    lut = np.zeros((max(int(labels.max(initial=0)) + 1, len(colors)), 3), dtype=np.uint8)
    lut[: len(colors)] = np.asarray(colors, dtype=np.uint8)
    out = lut[np.clip(labels, 0, len(lut) - 1)]
    if ignore_label is not None:
        out[labels == ignore_label] = 0
    return out


def overlay(image: np.ndarray, labels: np.ndarray, colors: list[tuple[int, int, int]], names: list[str],
            ignore_label: int | None = None, alpha: float = 0.55, boundaries: np.ndarray | None = None) -> Image.Image:
    """Image blended with the colored label map, with a legend of the classes present on the right."""
    from PIL import Image, ImageDraw

    color = colorize(labels, colors, ignore_label)
    valid = labels != ignore_label if ignore_label is not None else np.ones(labels.shape, bool)
    blend = image.astype(np.float32)
    blend[valid] = (1 - alpha) * blend[valid] + alpha * color[valid]
    if boundaries is not None:
        blend[boundaries] = 255
    canvas_img = Image.fromarray(blend.clip(0, 255).astype(np.uint8))
    if min(canvas_img.size) < 256:  # small images (the embedded set) are hard to see at 1:1
        k = -(-256 // min(canvas_img.size))
        canvas_img = canvas_img.resize((canvas_img.width * k, canvas_img.height * k), Image.NEAREST)
    present = [int(c) for c in np.unique(labels) if ignore_label is None or c != ignore_label]
    present = [c for c in present if 0 <= c < len(names)]
    row_h = 14
    legend_w = 10 + 8 * max((len(names[c]) for c in present), default=4) + 24
    h = max(canvas_img.height, row_h * len(present) + 8)
    out = Image.new("RGB", (canvas_img.width + legend_w, h), (255, 255, 255))
    out.paste(canvas_img, (0, 0))
    draw = ImageDraw.Draw(out)
    for j, c in enumerate(present):
        y = 4 + j * row_h
        x = canvas_img.width + 6
        draw.rectangle([x, y, x + 12, y + 10], fill=tuple(int(v) for v in colors[c]))
        draw.text((x + 18, y - 1), names[c], fill=(0, 0, 0))
    return out


def segment_boundaries(ids: np.ndarray) -> np.ndarray:
    """[H,W] bool: pixels whose right or lower neighbour belongs to another segment."""
    b = np.zeros(ids.shape, bool)
    b[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    b[:-1, :] |= ids[:-1, :] != ids[1:, :]
    return b


def plot_curves(run_dir: Path) -> Path | None:
    """loss and metric curves from metrics.jsonl -> curves.png (needs matplotlib; skipped without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    train, evals = [], []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        (evals if r.get("kind") == "eval" else train).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        axes[0].plot([r["step"] for r in train], [r.get("loss") for r in train])
        axes[0].set_title("training loss")
        axes[0].set_xlabel("step")
        axes[0].set_yscale("log")
    for key in ("mIoU", "PQ", "PQ_stuff"):
        pts = [(r["step"], r[key]) for r in evals if r.get(key) is not None]
        if pts:
            axes[1].plot(*zip(*pts, strict=True), marker="o", label=key)
    axes[1].set_title("evaluation")
    axes[1].set_xlabel("step")
    axes[1].legend()
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _titled(panels: list[tuple[str, Image.Image]]) -> Image.Image:
    """Panels side by side, each under a one-line title."""
    from PIL import Image, ImageDraw

    title_h = 16
    w = sum(p.width for _, p in panels) + 8 * (len(panels) - 1)
    h = max(p.height for _, p in panels) + title_h
    out = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    x = 0
    for title, p in panels:
        draw.text((x + 4, 2), title, fill=(0, 0, 0))
        out.paste(p, (x, title_h))
        x += p.width + 8
    return out


def save_prediction_overlay(pred: dict, meta: dict, classes: list[str], colors: list[tuple[int, int, int]],
                            path: Path, ignore_label: int = 255) -> None:
    """Overlay of one evaluated image: the panoptic prediction (segment outlines) when present, else the
    semantic map, to the right of the ground truth drawn the same way when the dataset has it."""
    from PIL import Image, ImageOps

    from maskformer_cli.engine import load_panoptic_gt, load_semantic_gt

    with Image.open(meta["file_name"]) as im:
        image = np.array(ImageOps.exif_transpose(im).convert("RGB"))

    def panoptic_labels(ids: np.ndarray, segments: list[dict]) -> np.ndarray:
        labels = np.full(ids.shape, ignore_label, np.int64)
        for seg in segments:
            labels[ids == seg["id"]] = seg["category_id"]
        return labels

    if "panoptic" in pred:
        pan, segments = pred["panoptic"]
        ids = pan.cpu().numpy()
        out = overlay(image, panoptic_labels(ids, segments), colors, classes, ignore_label=ignore_label,
                      boundaries=segment_boundaries(ids))
    else:
        out = overlay(image, pred["sem_seg"].cpu().numpy(), colors, classes, ignore_label=ignore_label)
    gt = None
    try:  # the ground truth is a bonus: an image without labels still gets its prediction drawn
        if "panoptic" in pred and "pan_seg_file" in meta:
            gt_ids, gt_segments = load_panoptic_gt(meta)
            gt_ids = gt_ids.numpy()
            gt = overlay(image, panoptic_labels(gt_ids, gt_segments), colors, classes, ignore_label=ignore_label,
                         boundaries=segment_boundaries(gt_ids))
        elif any(k in meta for k in ("sem_seg", "sem_seg_file", "pan_seg_file")):
            gt = overlay(image, load_semantic_gt(meta, ignore_label).numpy(), colors, classes,
                         ignore_label=ignore_label)
    except (OSError, KeyError, ValueError, UserError):  # UserError: the dataset's reader names the bad file
        gt = None
    if gt is not None:
        out = _titled([("ground truth", gt), ("prediction", out)])
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
