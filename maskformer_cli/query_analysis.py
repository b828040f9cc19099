"""Which categories does each query predict? The paper's query analysis (final paper, Sec. 4.4 figure).

Over a split, a query "predicts" category c on an image when its most likely class (over K + 1, so
"no object" included) is c != no object, its probability is at least `score_threshold`, and, when masks
are given, its binary mask (sigmoid > 0.5) covers at least `min_mask_area` pixels. The paper plots the
number of unique categories each query predicted, sorted in descending order: queries are not tied to one
class, and some capture many more classes than others.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from maskformer_cli.structures import MaskFormerOutput


def predicted_categories(pred_logits: torch.Tensor, pred_masks: torch.Tensor | None = None, *,
                         score_threshold: float = 0.0, min_mask_area: int = 1) -> torch.Tensor:
    """pred_logits: [B, Q, K+1] logits, pred_masks: [B, Q, h, w] logits or None -> [B, Q] int64:
    the category each query predicts on each image, or -1 (no object, low score, or empty mask)."""
    if pred_logits.dim() != 3:
        raise ValueError(f"pred_logits must be [B, Q, K+1], got {tuple(pred_logits.shape)}")
    probs = pred_logits.float().softmax(-1)
    score, label = probs.max(-1)
    no_object = pred_logits.shape[-1] - 1
    keep = (label != no_object) & (score >= score_threshold)
    if pred_masks is not None:
        if pred_masks.shape[:2] != pred_logits.shape[:2]:
            raise ValueError(f"pred_masks {tuple(pred_masks.shape)} does not match pred_logits "
                             f"{tuple(pred_logits.shape)} in [B, Q]")
        area = (pred_masks > 0).flatten(2).sum(-1)  # sigmoid(x) > 0.5  <=>  x > 0
        keep &= area >= min_mask_area
    return torch.where(keep, label, torch.full_like(label, -1))


class QueryCategoryStats:
    """Accumulates, per query, how often it predicted each category: counts [Q, K] int64."""

    def __init__(self, num_queries: int, num_classes: int) -> None:
        self.counts = torch.zeros(num_queries, num_classes, dtype=torch.int64)
        self.num_images = 0

    @property
    def num_queries(self) -> int:
        return self.counts.shape[0]

    @property
    def num_classes(self) -> int:
        return self.counts.shape[1]

    def update(self, pred_logits: torch.Tensor, pred_masks: torch.Tensor | None = None, *,
               score_threshold: float = 0.0, min_mask_area: int = 1) -> None:
        """Add a batch of outputs (shapes as `predicted_categories`)."""
        q, k = pred_logits.shape[1], pred_logits.shape[2] - 1
        if (q, k) != (self.num_queries, self.num_classes):
            raise ValueError(f"outputs have Q={q}, K={k}; these stats hold Q={self.num_queries}, "
                             f"K={self.num_classes}")
        labels = predicted_categories(pred_logits.detach().cpu(), None if pred_masks is None else
                                      pred_masks.detach().cpu(), score_threshold=score_threshold,
                                      min_mask_area=min_mask_area)
        b = labels.shape[0]
        query = torch.arange(q).expand(b, q)
        valid = labels >= 0
        flat = query[valid] * k + labels[valid]
        self.counts += torch.bincount(flat, minlength=q * k).view(q, k)
        self.num_images += b

    def unique_per_query(self) -> torch.Tensor:
        """[Q] number of distinct categories each query predicted at least once."""
        return (self.counts > 0).sum(1)

    def sorted_unique(self) -> list[int]:
        """The paper's curve: unique categories per query, sorted in descending order."""
        return sorted(self.unique_per_query().tolist(), reverse=True)

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        per_query = []
        for i in range(self.num_queries):
            row = self.counts[i]
            order = torch.argsort(row, descending=True, stable=True)
            cats = [{"category": names[int(c)], "count": int(row[c])} for c in order if row[c] > 0]
            per_query.append({"query": i, "num_categories": len(cats), "categories": cats})
        return {"num_images": self.num_images, "num_queries": self.num_queries, "num_classes": self.num_classes,
                "unique_per_query_sorted": self.sorted_unique(), "per_query": per_query}


def query_category_stats(outputs: Iterable[MaskFormerOutput | tuple[torch.Tensor, torch.Tensor | None]], *,
                         score_threshold: float = 0.0, min_mask_area: int = 1) -> QueryCategoryStats:
    """Stats over model outputs on a split: MaskFormerOutput objects or (pred_logits, pred_masks) pairs."""
    stats: QueryCategoryStats | None = None
    for out in outputs:
        logits, masks = (out.pred_logits, out.pred_masks) if isinstance(out, MaskFormerOutput) else out
        if stats is None:
            stats = QueryCategoryStats(logits.shape[1], logits.shape[2] - 1)
        stats.update(logits, masks, score_threshold=score_threshold, min_mask_area=min_mask_area)
    if stats is None:
        raise ValueError("no outputs given")
    return stats


def plot_query_stats(sorted_counts: Sequence[int], path: Path, title: str = "") -> Path | None:
    """Bar plot of unique categories per query (descending). None, with nothing written, without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.bar(range(len(sorted_counts)), list(sorted_counts), width=1.0, color="#4c72b0")
    ax.set_xlabel("query (sorted)")
    ax.set_ylabel("unique categories")
    if title:
        ax.set_title(title)
    ax.set_xlim(-0.5, len(sorted_counts) - 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # queries and counts are whole numbers
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def analyze_checkpoint(checkpoint: Path, *, out: Path, split: str = "val", device: str = "auto",
                       limit: int | None = None, score_threshold: float = 0.0, min_mask_area: int = 1,
                       console: Any = None, dataset: str | None = None) -> dict[str, Any]:
    """Run a MaskFormer checkpoint over a split; write query_categories.json and query_categories.png."""
    from maskformer_cli import distributed as dist
    from maskformer_cli.data.build import build_eval_loader
    from maskformer_cli.errors import UserError
    from maskformer_cli.postprocess import build_postprocessor, channels_last_default
    from maskformer_cli.reporting import console as default_console
    from maskformer_cli.weights import load_for_evaluation

    console = console or default_console
    dev = dist.resolve_device(device)
    loaded, recipe, info = load_for_evaluation(Path(checkpoint), dev, dataset=dataset)
    if recipe.model.meta_architecture != "maskformer":
        raise UserError("query analysis needs a MaskFormer checkpoint (per-pixel baselines have no queries)")
    loader = build_eval_loader(recipe.data, info, split=split, limit=limit, num_workers=0)
    model = loaded.model.eval()
    pp = build_postprocessor(recipe.inference, info, channels_last=channels_last_default(dev))

    def outputs():
        for batch in loader:
            yield pp.forward(model, batch.images.to(dev))

    stats = query_category_stats(outputs(), score_threshold=score_threshold, min_mask_area=min_mask_area)
    report = stats.to_dict(info.classes)
    out.mkdir(parents=True, exist_ok=True)
    (out / "query_categories.json").write_text(json.dumps(report, indent=1))
    png = plot_query_stats(report["unique_per_query_sorted"], out / "query_categories.png",
                           title=f"{info.name} {split}: unique categories per query")
    if png is None:
        console.print("[yellow]matplotlib is not installed: skipped query_categories.png[/]")
    counts = report["unique_per_query_sorted"]
    console.print(f"{len(counts)} queries over {stats.num_images} images: unique categories per query "
                  f"max {max(counts)}, median {sorted(counts)[len(counts) // 2]}, min {min(counts)}")
    return report


__all__ = ["QueryCategoryStats", "analyze_checkpoint", "plot_query_stats", "predicted_categories",
           "query_category_stats"]
