"""Train and evaluate loops: no Typer, no Rich, no YAML; plain tensors in, plain dicts out.

The loops take already-built objects (model, criterion, optimizer, loaders) so the CLI, `ablate` and the
tests drive them the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from maskformer_cli import distributed as dist
from maskformer_cli.cuda_graphs import own_graph_gradients
from maskformer_cli.data.datasets import read_label, read_panoptic_ids, segments_to_categories
from maskformer_cli.metrics import SemanticMetrics
from maskformer_cli.metrics_panoptic import PanopticMetrics, PQStuffMetrics
from maskformer_cli.models import normalize
from maskformer_cli.postprocess import PostProcessor
from maskformer_cli.precision import autocast


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ------------------------------------------------------------------------------------------------ training


@dataclass
class StepResult:
    """One optimiser step: the weighted total, every named loss (floats), grad norm, and whether it ran."""

    total: float
    losses: dict[str, float]
    grad_norm: float
    skipped: bool
    overflow: bool = False
    """fp16 only: the grad scaler found inf/NaN gradients and skipped the step itself (routine while it
    calibrates its scale); not counted by the non-finite policy."""
    empty: bool = False
    """Skipped because a micro-batch held no sample (all of its samples were bad files); under DDP, because
    one did on any rank. Not counted by the non-finite policy."""
    samples: int = -1
    """Samples in the step's micro-batches, summed over ranks (bad files excluded; -1: not counted)."""


def train_step(
    model: nn.Module,
    criterion: Callable,
    optimizer: torch.optim.Optimizer,
    micro_batches: list,
    *,
    device: torch.device,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
    clip_grad: float = 0.0,
    clip_fn: Callable | None = None,
) -> StepResult:
    """Forward + loss + backward over `micro_batches` (gradient accumulation), then one optimiser step.

    Each micro-batch loss is divided by the number of micro-batches, so accumulating k batches of b images
    gives the gradient of one batch of k*b images (the criterion already normalises by the number of masks).
    A non-finite loss or gradient norm (agreed across ranks) skips the step: gradients are dropped.
    An empty micro-batch (every sample a skipped bad file; the network cannot run on it) is left out in a
    single process; under DDP the whole step is skipped on every rank when any rank has one, since the
    criterion and the gradient all-reduce are collectives that every rank must run equally often.
    """
    optimizer.zero_grad(set_to_none=True)
    micro_batches, samples = _runnable_micro_batches(micro_batches, device)
    if not micro_batches:
        return StepResult(total=float("nan"), losses={}, grad_norm=0.0, skipped=True, empty=True, samples=samples)
    total, named, nonfinite = _accumulate_gradients(model, criterion, optimizer, micro_batches, device=device,
                                                    precision=precision, scaler=scaler)
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = _grad_norm(optimizer, clip_grad, clip_fn)
    # The loss differs per rank, so its verdict is agreed by a collective; gradients are already
    # all-reduced by DDP, so every rank sees the same grad norm.
    loss_bad = dist.any_nonfinite(torch.tensor(float("nan") if nonfinite else 0.0, device=device))
    grad_bad = not math.isfinite(grad_norm)
    if scaler is not None and grad_bad and not loss_bad:
        # fp16 overflow: the scaler skips the update and lowers its scale; a routine event, not a bad step.
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return StepResult(total=total, losses=named, grad_norm=grad_norm, skipped=True, overflow=True,
                          samples=samples)
    if loss_bad or grad_bad:
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()
        return StepResult(total=float("nan"), losses=named, grad_norm=grad_norm, skipped=True, samples=samples)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return StepResult(total=total, losses=named, grad_norm=grad_norm, skipped=False, samples=samples)


def _accumulate_gradients(model: nn.Module, criterion: Callable, optimizer: torch.optim.Optimizer,
                          micro_batches: list, *, device: torch.device, precision: str,
                          scaler: torch.amp.GradScaler | None) -> tuple[float, dict[str, float], bool]:
    """Forward, loss and backward of each micro-batch, its loss divided by their number: (the mean total
    loss, every named loss averaged, whether any micro-batch's total was non-finite)."""
    n = len(micro_batches)
    totals: list[float] = []
    named: dict[str, float] = {}
    nonfinite = False
    for i, batch in enumerate(micro_batches):
        images = normalize(batch.images.to(device, non_blocking=True))
        targets = [t.to(device) for t in batch.targets]
        # Only the last micro-batch synchronises gradients under DDP.
        sync = model.no_sync() if (i < n - 1 and hasattr(model, "no_sync")) else nullcontext()
        with sync:
            with autocast(device, precision):
                outputs = model(images)
            losses = criterion(outputs, targets)
            total = criterion.weighted_total(losses)
            loss = total / n
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
        if i < n - 1:
            own_graph_gradients(unwrap(model), _params(optimizer))
        # One device-to-host copy for the total and every logged term (on a GPU each float() would be a
        # synchronisation: ~20 of them per step with deep supervision).
        values = torch.stack([total.detach().float(), *(v.detach().float() for v in losses.values())]).tolist()
        nonfinite = nonfinite or not math.isfinite(values[0])
        totals.append(values[0])
        for k, v in zip(losses, values[1:], strict=True):
            named[k] = named.get(k, 0.0) + v / n
    return sum(totals) / n, named, nonfinite


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _runnable_micro_batches(micro_batches: list, device: torch.device) -> tuple[list, int]:
    """(the micro-batches to run, samples in all of them summed over ranks). An empty micro-batch is left out
    in a single process; under DDP none runs (an empty list) when any rank has one."""
    sizes = [len(b) for b in micro_batches]
    if dist.get_world_size() > 1:
        # one small collective: [micro-batches without a sample, samples], summed over ranks
        empty, samples = (int(v) for v in dist.all_reduce_sum(
            torch.tensor([sum(k == 0 for k in sizes), sum(sizes)], device=device)).tolist())
        return ([] if empty else micro_batches), samples
    return [b for b, k in zip(micro_batches, sizes, strict=True) if k], sum(sizes)


def _grad_norm(optimizer: torch.optim.Optimizer, clip_grad: float, clip_fn: Callable | None) -> float:
    """The total gradient norm of the optimised parameters, after clipping it to `clip_grad` with `clip_fn`."""
    params = _params(optimizer)
    if clip_fn is not None and clip_grad > 0:
        return float(clip_fn(params, clip_grad))
    grads = [p.grad.detach().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


# ---------------------------------------------------------------------------------------------- evaluation


METRICS = ("miou", "pq", "pq-stuff")


def default_metrics(task: str, mask_classification: bool) -> tuple[str, ...]:
    """What training evaluates: mIoU, and PQ on panoptic data or PQ-stuff on semantic data (PQ needs the
    segments of a mask-classification model)."""
    if task == "panoptic":
        return ("miou", "pq") if mask_classification else ("miou",)
    return ("miou", "pq-stuff")


def wanted_outputs(metrics: Iterable[str]) -> tuple[str, ...]:
    """The post-processor outputs the metrics need."""
    metrics = set(metrics)
    return (("sem_seg",) if metrics & {"miou", "pq-stuff"} else ()) + (("panoptic",) if "pq" in metrics else ())


class Evaluator:
    """Streams predictions into the requested metrics; exact under DDP (each rank sees a disjoint shard).

    metrics: subset of {"miou", "pq", "pq-stuff"}; num_classes, ignore_label, thing_ids: the dataset's."""

    def __init__(self, metrics: Iterable[str], num_classes: int, ignore_label: int = 255,
                 thing_ids: Iterable[int] = (), class_names: Iterable[str] = ()):
        metrics = tuple(metrics)
        unknown = set(metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
        self.metrics, self.ignore_label = metrics, ignore_label
        self.semantic = SemanticMetrics(num_classes, ignore_label) if "miou" in metrics else None
        self.pq_stuff = PQStuffMetrics(num_classes, ignore_label) if "pq-stuff" in metrics else None
        self.panoptic = (PanopticMetrics(num_classes=num_classes, thing_ids=tuple(thing_ids))
                         if "pq" in metrics else None)
        self.class_names = list(class_names)
        self.num_images = 0

    def add(self, pred: dict, meta: dict) -> None:
        """Compare one image's predictions (a `PostProcessor` result: sem_seg, panoptic) with its ground truth."""
        # The ground truth is read on the CPU; the metrics count on the prediction's device (the GPU during
        # training on one), so the small label map travels rather than the prediction.
        if "sem_seg" in pred:
            sem = pred["sem_seg"]
            self.update_semantic(sem, load_semantic_gt(meta, self.ignore_label).to(sem.device))
        if "panoptic" in pred:
            pan, segments = pred["panoptic"]
            gt_pan, gt_segments = load_panoptic_gt(meta)
            self.update_panoptic(pan, segments, gt_pan.to(pan.device), gt_segments)
        self.num_images += 1

    def update_semantic(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """pred, gt: [H, W] int label maps (gt may hold the ignore label)."""
        if self.semantic is not None:
            self.semantic.update(pred, gt)
        if self.pq_stuff is not None:
            self.pq_stuff.update(pred, gt)

    def update_panoptic(self, pan, segments, gt_pan, gt_segments) -> None:
        """Segment-id maps [H, W] with their segments_info (contiguous category ids)."""
        self.panoptic.update(pan, segments, gt_pan, gt_segments)

    def synchronize(self) -> None:
        """Sum every metric's state over ranks (each rank evaluated a disjoint shard)."""
        for m in (self.semantic, self.pq_stuff, self.panoptic):
            if m is not None:
                m.load_state(dist.all_reduce_sum(m.state()))
        self.num_images = int(dist.all_reduce_sum(torch.tensor(self.num_images)).item())

    def compute(self) -> dict:
        out: dict = {"num_images": self.num_images}
        per_class: dict[str, dict] = {}
        for m in (self.semantic, self.pq_stuff, self.panoptic):
            if m is None:
                continue
            res = m.compute()
            for row in res.pop("per_class", []):
                per_class.setdefault(row.get("class", row.get("id")), {}).update(row)
            out.update(res)
        if per_class:
            rows = list(per_class.values())
            for r in rows:
                i = r.get("class", r.get("id"))
                if isinstance(i, int) and i < len(self.class_names):
                    r["name"] = self.class_names[i]
            out["per_class"] = rows
        return out


def load_semantic_gt(meta: dict, ignore_label: int) -> torch.Tensor:
    """The original-resolution ground-truth label map of an image, from the dataset's meta: the map the
    dataset decoded (evaluation loaders keep it), else read from the file it names."""
    if "sem_seg" in meta:
        return meta["sem_seg"]
    if "sem_seg_file" not in meta:  # a panoptic dataset: the semantic map is its segments' categories
        return segments_to_categories(*load_panoptic_gt(meta), ignore_label)
    return torch.from_numpy(read_label(meta["sem_seg_file"]))


def load_panoptic_gt(meta: dict) -> tuple[torch.Tensor, list[dict]]:
    """(segment-id map [H,W] int64, segments_info with contiguous category ids) from the dataset's meta: the
    map the dataset decoded (evaluation loaders keep it), else read from the PNG it names."""
    ids = meta["pan_seg"] if "pan_seg" in meta else read_panoptic_ids(meta["pan_seg_file"])
    return ids, meta["segments_info"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    metrics: Iterable[str],
    postprocessor: PostProcessor,
    *,
    device: torch.device,
    class_names: Iterable[str] = (),
    on_batch: Callable[[int], None] | None = None,
    on_prediction: Callable[[dict, dict], None] | None = None,
) -> dict:
    """Run inference over `loader` (this rank's shard), accumulate metrics, synchronise, return them.
    The post-processor's dataset facts (classes, ignore label, things) define the metrics' too."""
    was_training = model.training
    model.eval()
    net = unwrap(model)
    pp = postprocessor
    evaluator = Evaluator(metrics, pp.num_classes, pp.ignore_label, pp.thing_ids, class_names)
    want = wanted_outputs(evaluator.metrics)
    for batch in loader:
        if batch.metas:
            out_sizes = [(m["height"], m["width"]) for m in batch.metas]
            preds = pp(net, batch.images.to(device), batch.image_sizes, out_sizes, want)
            for pred, meta in zip(preds, batch.metas, strict=True):
                evaluator.add(pred, meta)
                if on_prediction is not None:
                    on_prediction(pred, meta)
        if on_batch is not None:
            on_batch(len(batch.metas))
    evaluator.synchronize()
    model.train(was_training)
    return evaluator.compute()
