"""Train and evaluate loops: no Typer, no Rich, no YAML; plain tensors in, plain dicts out.

The loops take already-built objects (model, criterion, optimizer, loaders) so the CLI, `ablate` and the
tests drive them the same way.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from maskformer_cli import distributed as dist
from maskformer_cli.inference import (
    crop_and_resize,
    general_inference,
    iterative_inference,
    semantic_inference,
    semantic_tta,
)
from maskformer_cli.inference_panoptic import panoptic_segments
from maskformer_cli.metrics import PanopticMetrics, PQStuffMetrics, SemanticMetrics
from maskformer_cli.models import normalize
from maskformer_cli.structures import MaskFormerOutput, PerPixelOutput

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """Mixed precision context for the forward pass ('fp32' = no autocast)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[precision])


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
    sizes = [len(b) for b in micro_batches]
    if dist.get_world_size() > 1:
        # one small collective: [micro-batches without a sample, samples], summed over ranks
        empty, samples = (int(v) for v in dist.all_reduce_sum(
            torch.tensor([sum(k == 0 for k in sizes), sum(sizes)], device=device)).tolist())
        if empty:
            return StepResult(total=float("nan"), losses={}, grad_norm=0.0, skipped=True, empty=True,
                              samples=samples)
    else:
        samples = sum(sizes)
        micro_batches = [b for b, k in zip(micro_batches, sizes, strict=True) if k]
        if not micro_batches:
            return StepResult(total=float("nan"), losses={}, grad_norm=0.0, skipped=True, empty=True, samples=0)
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
        # One device-to-host copy for the total and every logged term (on a GPU each float() would be a
        # synchronisation: ~20 of them per step with deep supervision).
        values = torch.stack([total.detach().float(), *(v.detach().float() for v in losses.values())]).tolist()
        nonfinite = nonfinite or not math.isfinite(values[0])
        totals.append(values[0])
        for k, v in zip(losses, values[1:], strict=True):
            named[k] = named.get(k, 0.0) + v / n

    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if clip_fn is not None and clip_grad > 0:
        grad_norm = float(clip_fn(params, clip_grad))
    else:
        grads = [p.grad.detach().norm() for p in params if p.grad is not None]
        grad_norm = float(torch.stack(grads).norm()) if grads else 0.0
    # The loss differs per rank, so its verdict is agreed by a collective; gradients are already
    # all-reduced by DDP, so every rank sees the same grad norm.
    loss_bad = dist.any_nonfinite(torch.tensor(float("nan") if nonfinite else 0.0, device=device))
    grad_bad = not math.isfinite(grad_norm)
    if scaler is not None and grad_bad and not loss_bad:
        # fp16 overflow: the scaler skips the update and lowers its scale; a routine event, not a bad step.
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return StepResult(total=sum(totals) / n, losses=named, grad_norm=grad_norm, skipped=True, overflow=True,
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
    return StepResult(total=sum(totals) / n, losses=named, grad_norm=grad_norm, skipped=False, samples=samples)


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class EvalSpec:
    """What to compute: which metrics, which inference, with what thresholds.

    metrics: subset of {"miou", "pq", "pq-stuff"}.
    mode: semantic | general | iterative | panoptic (the inference that produces the semantic map; PQ always
          uses panoptic inference).
    panoptic_postprocessing: maskformer (panoptic_inference: object_mask_threshold, overlap_threshold) | detr
          (detr_panoptic_inference: detr_threshold), the post-processing that makes PQ's segments.
    tta: multi-scale + flip for the semantic map (mIoU, PQ-stuff); PQ stays single-scale, since averaged
         per-pixel probabilities leave no segments to match.
    """

    metrics: tuple[str, ...]
    mode: str = "semantic"
    num_classes: int = 0
    ignore_label: int = 255
    thing_ids: tuple[int, ...] = ()
    object_mask_threshold: float = 0.8
    overlap_threshold: float = 0.8
    panoptic_postprocessing: str = "maskformer"
    detr_threshold: float = 0.85
    general_threshold: float = 0.3
    iterative_ratio: float = 0.3
    tta: bool = False
    tta_scales: tuple[float, ...] = (1.0,)
    tta_flip: bool = False


def _per_image_scores(outputs, image_sizes, padded_size, out_sizes) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(class_logits [Q,K+1] or None, mask_logits [Q,H,W] at the original size)] per image."""
    if isinstance(outputs, PerPixelOutput):
        maps = crop_and_resize(outputs.sem_seg_logits, image_sizes, padded_size, out_sizes)
        return [(None, m) for m in maps]
    maps = crop_and_resize(outputs.pred_masks, image_sizes, padded_size, out_sizes)
    return [(outputs.pred_logits[i], maps[i]) for i in range(len(maps))]


def semantic_prediction(class_logits, mask_logits, spec: EvalSpec) -> torch.Tensor:
    """[H, W] int64 label map from one image's outputs, by the spec's inference mode."""
    if class_logits is None:  # per-pixel baseline: mask_logits are class logits [K,H,W]
        return mask_logits.argmax(0)
    if spec.mode == "general":
        return general_inference(class_logits, mask_logits, threshold=spec.general_threshold,
                                 ignore_label=spec.ignore_label)[0]
    if spec.mode == "iterative":
        return iterative_inference(class_logits, mask_logits, ratio=spec.iterative_ratio)[0].argmax(0)
    return semantic_inference(class_logits, mask_logits).argmax(0)


def panoptic_prediction(class_logits, mask_logits, spec: EvalSpec) -> tuple[torch.Tensor, list[dict]]:
    """(segment ids [H, W], segments_info) from one image's outputs, by the spec's panoptic post-processing."""
    return panoptic_segments(class_logits, mask_logits, spec.thing_ids, spec.panoptic_postprocessing,
                             spec.object_mask_threshold, spec.overlap_threshold, spec.detr_threshold)


class Evaluator:
    """Streams predictions into the requested metrics; exact under DDP (each rank sees a disjoint shard)."""

    def __init__(self, spec: EvalSpec, class_names: Iterable[str] = ()):
        self.spec = spec
        names = list(class_names)
        self.semantic = SemanticMetrics(spec.num_classes, spec.ignore_label) if "miou" in spec.metrics else None
        self.pq_stuff = PQStuffMetrics(spec.num_classes, spec.ignore_label) if "pq-stuff" in spec.metrics else None
        self.panoptic = (
            PanopticMetrics(num_classes=spec.num_classes, thing_ids=spec.thing_ids) if "pq" in spec.metrics else None
        )
        self.class_names = names
        self.num_images = 0

    def update(self, class_logits, mask_logits, meta: dict) -> dict:
        """Add one image's outputs; returns its predictions ({'sem_seg': [H,W]}, 'panoptic' when computed)."""
        pred = self.predict(class_logits, mask_logits)
        self.add(pred, meta)
        return pred

    def predict(self, class_logits, mask_logits, pq_class_logits=None, pq_mask_logits=None) -> dict:
        """The predictions the requested metrics need, from one image's outputs (no state is touched, so a
        failed attempt can be redone elsewhere). pq_*: the single-scale (class_logits [Q,K+1],
        mask_logits [Q,H,W]) PQ uses when the semantic scores are test-time-augmented; default: the same."""
        spec = self.spec
        pred: dict = {}
        if self.semantic is not None or self.pq_stuff is not None:
            pred["sem_seg"] = semantic_prediction(class_logits, mask_logits, spec)
        if self.panoptic is not None:
            if pq_mask_logits is None:
                pq_class_logits, pq_mask_logits = class_logits, mask_logits
            if pq_class_logits is None:
                raise ValueError("PQ needs the class and mask logits of a mask-classification model; got per-pixel "
                                 "class scores (a per-pixel baseline, or test-time augmentation without the "
                                 "single-scale outputs)")
            pred["panoptic"] = panoptic_prediction(pq_class_logits, pq_mask_logits, spec)
        return pred

    def add(self, pred: dict, meta: dict) -> None:
        """Compare one image's predictions (from `predict`) with its ground truth."""
        if "sem_seg" in pred:
            self.update_semantic(pred["sem_seg"], load_semantic_gt(meta, self.spec.ignore_label))
        if "panoptic" in pred:
            pan, segments = pred["panoptic"]
            self.update_panoptic(pan, segments, *load_panoptic_gt(meta))
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
    """The original-resolution ground-truth label map of an image, from the dataset's meta."""
    if "sem_seg" in meta:
        return meta["sem_seg"]
    if "sem_seg_file" not in meta:  # a panoptic dataset: the semantic map is its segments' categories
        from maskformer_cli.data.datasets import segments_to_categories

        return segments_to_categories(*load_panoptic_gt(meta), ignore_label)
    from PIL import Image

    with Image.open(meta["sem_seg_file"]) as im:
        return torch.from_numpy(np.array(im).astype(np.int64))


def load_panoptic_gt(meta: dict) -> tuple[torch.Tensor, list[dict]]:
    """(segment-id map [H,W] int64, segments_info with contiguous category ids) from the dataset's meta."""
    from PIL import Image

    with Image.open(meta["pan_seg_file"]) as im:
        rgb = np.array(im.convert("RGB")).astype(np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    return torch.from_numpy(ids), meta["segments_info"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    spec: EvalSpec,
    *,
    device: torch.device,
    precision: str = "fp32",
    class_names: Iterable[str] = (),
    on_batch: Callable[[int], None] | None = None,
    on_prediction: Callable[[dict, dict], None] | None = None,
) -> dict:
    """Run inference over `loader` (this rank's shard), accumulate metrics, synchronise, return them."""
    was_training = model.training
    model.eval()
    net = unwrap(model)
    evaluator = Evaluator(spec, class_names)
    for batch in loader:
        per_image = infer_batch(net, batch, spec, device=device, precision=precision)
        # PQ stays single-scale under test-time augmentation (its averaged probabilities have no segments)
        pq_image = (infer_batch(net, batch, replace(spec, tta=False), device=device, precision=precision)
                    if spec.tta and evaluator.panoptic is not None else [(None, None)] * len(per_image))
        for (cls, masks), (pq_cls, pq_masks), meta in zip(per_image, pq_image, batch.metas, strict=True):
            pred = _cpu_fallback(evaluator.predict, cls, masks, pq_cls, pq_masks)
            evaluator.add(pred, meta)
            if on_prediction is not None:
                on_prediction(pred, meta)
        if on_batch is not None:
            on_batch(len(batch.metas))
    evaluator.synchronize()
    model.train(was_training)
    return evaluator.compute()


@torch.no_grad()
def infer_batch(net: nn.Module, batch, spec: EvalSpec, *, device: torch.device, precision: str = "fp32"
                ) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """The network's outputs for each image of a padded batch, at the image's original size.

    Returns per image (class_logits [Q, K+1], mask_logits [Q, H, W]) for mask classification, or
    (None, class scores [K, H, W]) for per-pixel baselines and under test-time augmentation (log-probs),
    H, W = meta height / width. `evaluate` and `predict` both go through here, so saved predictions equal
    the evaluated ones.
    """
    images = batch.images.to(device)
    if spec.tta:
        return _tta_scores(net, batch, spec, device, precision)
    out_sizes = [(m["height"], m["width"]) for m in batch.metas]
    with autocast(device, precision):
        outputs = net(normalize(images))
    outputs = _to_float(outputs)
    return _cpu_fallback(_per_image_scores, outputs, batch.image_sizes, tuple(images.shape[-2:]), out_sizes)


OOM_ERRORS = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)


def _to_cpu(x):
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, PerPixelOutput):
        return PerPixelOutput(x.sem_seg_logits.cpu())
    if isinstance(x, MaskFormerOutput):
        return MaskFormerOutput(x.pred_logits.cpu(), x.pred_masks.cpu())
    return x


def _cpu_fallback(fn, *args):
    """fn(*args); when the accelerator runs out of memory (whole-image inference of a 1024x2048 Cityscapes
    image upsamples Q masks to full size), free its cache and redo this step with the tensors on the CPU,
    slower but complete, instead of losing the evaluation."""
    try:
        return fn(*args)
    except OOM_ERRORS:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if not _cpu_fallback.warned:
            _cpu_fallback.warned = True
            warnings.warn("out of accelerator memory in post-processing: continuing on the CPU for those "
                          "images (slower)", RuntimeWarning, stacklevel=2)
        return fn(*(_to_cpu(a) for a in args))


_cpu_fallback.warned = False


def _to_float(outputs):
    if isinstance(outputs, PerPixelOutput):
        return PerPixelOutput(outputs.sem_seg_logits.float())
    return MaskFormerOutput(outputs.pred_logits.float(), outputs.pred_masks.float())


def _tta_scores(net, batch, spec: EvalSpec, device, precision):
    """Multi-scale + flip: averaged class probabilities; returned as (None, log-probs [K,H,W]) per image."""
    results = []
    for i, meta in enumerate(batch.metas):
        h, w = batch.image_sizes[i]
        image = batch.images[i, :, :h, :w].to(device)

        def forward_fn(images: torch.Tensor) -> list[torch.Tensor]:
            with autocast(device, precision):
                outputs = _to_float(net(normalize(images)))
            size = tuple(images.shape[-2:])
            maps = _per_image_scores(outputs, [size] * images.shape[0], size, [size] * images.shape[0])
            if maps[0][0] is None:
                return [m.softmax(0) for _, m in maps]
            return [semantic_inference(c, m) for c, m in maps]

        probs = semantic_tta(forward_fn, image, scales=spec.tta_scales, flip=spec.tta_flip,
                             output_size=(meta["height"], meta["width"]))
        results.append((None, probs))
    return results
