"""The post-processor: everything between a batch of images and its maps, as one object.

`build_postprocessor(recipe.inference, dataset_info)` is built once; train-time evaluation, `evaluate`,
`predict`, `ablate` and the query analysis call it. It owns
- the network call for inference: normalisation, channels_last, autocast in the requested precision
  (the outputs are post-processed in float32 whatever the network ran in);
- the crop of the batch padding and the resize back to each image's size;
- semantic / general / iterative inference for the semantic map (paper Sec. 3.4, draft Table 5),
  MaskFormer's or DETR's panoptic post-processing (Table 3), instance output;
- multi-scale + flip test-time augmentation of the semantic map (paper Sec. 4.1);
- the out-of-memory fallback: post-processing that exhausts the accelerator is redone on the CPU.

The semantic, general and panoptic maps are computed at full resolution in bands of rows
(`inference_tiled`): the paper's exact values (mask logits upsampled to the image, sigmoid, then
combined) without any [Q, H, W] tensor, so a 1024x2048 image with 100 queries needs a few MB.

Outputs per image (a dict, keys as requested with `want`):
  "sem_seg":   [H, W] int64 semantic labels (ignore_label where general inference keeps no query)
  "panoptic":  (segment ids [H, W] int32, segments_info) with contiguous category ids
  "instances": [(mask [H, W] bool, class, score), ...]
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from maskformer_cli import inference_tiled as tiled
from maskformer_cli.inference import iterative_inference, semantic_inference, semantic_tta
from maskformer_cli.inference_panoptic import (
    detr_panoptic_inference,
    instance_inference,
    panoptic_segments_from_assignment,
)
from maskformer_cli.models import normalize
from maskformer_cli.precision import PRECISIONS, autocast
from maskformer_cli.structures import MaskFormerOutput, PerPixelOutput

OOM_ERRORS = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)
SEMANTIC_MODES = ("semantic", "general", "iterative")


@dataclass(frozen=True)
class PostProcessor:
    """Network outputs -> per-image maps (see the module docstring). Thresholds have no defaults here:
    the recipe's `inference` section is their one home, `build_postprocessor` reads it."""

    num_classes: int
    ignore_label: int
    thing_ids: tuple[int, ...]
    mode: str
    """The semantic map's inference: semantic | general | iterative."""
    object_mask_threshold: float
    overlap_threshold: float
    panoptic_postprocessing: str
    detr_threshold: float
    general_threshold: float
    iterative_ratio: float
    tta: bool
    tta_scales: tuple[float, ...]
    tta_flip: bool
    precision: str = "fp32"
    """The network's precision (autocast); post-processing always runs in float32."""
    channels_last: bool = False
    """Run the network on channels_last images (faster convolutions on CPUs with oneDNN)."""
    tile_pixels: int | None = None
    """Output pixels per band of the full-resolution maps; None: by device (`inference_tiled.tile_pixels_for`)."""

    def __post_init__(self) -> None:
        if self.mode not in SEMANTIC_MODES:
            raise ValueError(f"unknown semantic inference mode {self.mode!r}; one of {SEMANTIC_MODES}")
        if self.panoptic_postprocessing not in ("maskformer", "detr"):
            raise ValueError(f"unknown panoptic post-processing {self.panoptic_postprocessing!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; one of {PRECISIONS}")

    # ------------------------------------------------------------------------------------ network

    def forward(self, net: nn.Module, images: torch.Tensor) -> MaskFormerOutput | PerPixelOutput:
        """The network's float32 outputs for un-normalised images [B, 3, H, W] already on its device."""
        x = normalize(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast(x.device, self.precision):
            out = net(x, deep_supervision=False)  # the earlier layers' outputs are for training only
        if isinstance(out, PerPixelOutput):
            return PerPixelOutput(out.sem_seg_logits.float())
        return MaskFormerOutput(out.pred_logits.float(), out.pred_masks.float())

    @torch.no_grad()
    def __call__(self, net: nn.Module, images: torch.Tensor, image_sizes: Sequence[tuple[int, int]],
                 output_sizes: Sequence[tuple[int, int]], want: Sequence[str] = ("sem_seg",)) -> list[dict]:
        """Maps for a padded batch. images: [B, 3, Hp, Wp] (0-255, padded with the pixel mean), on the
        network's device; image_sizes: the valid (h, w) of each; output_sizes: each image's original size."""
        want = tuple(want)
        semantic_by_tta = self.tta and "sem_seg" in want
        rest = tuple(w for w in want if not (semantic_by_tta and w == "sem_seg"))
        results: list[dict] = [{} for _ in image_sizes]
        if rest:
            outputs = self.forward(net, images)
            results = self.postprocess(outputs, image_sizes, tuple(images.shape[-2:]), output_sizes, rest)
        if semantic_by_tta:  # PQ stays single-scale: averaged probabilities leave no segments to match
            for i, (h, w) in enumerate(image_sizes):
                scores = self.tta_scores(net, images[i, :, :h, :w], output_sizes[i])
                results[i]["sem_seg"] = scores.argmax(0)
        return results

    # ------------------------------------------------------------------------------ post-processing

    def postprocess(self, outputs: MaskFormerOutput | PerPixelOutput, image_sizes: Sequence[tuple[int, int]],
                    padded_size: tuple[int, int], output_sizes: Sequence[tuple[int, int]],
                    want: Sequence[str] = ("sem_seg",)) -> list[dict]:
        """Pure part: outputs (pred_logits [B, Q, K+1], pred_masks [B, Q, h, w], or per-pixel
        sem_seg_logits [B, K, h, w]) of a batch padded to `padded_size` -> one dict per image."""
        if len(image_sizes) != len(output_sizes):
            raise ValueError(f"{len(image_sizes)} image sizes but {len(output_sizes)} output sizes")
        per_pixel = isinstance(outputs, PerPixelOutput)
        if per_pixel and any(w != "sem_seg" for w in want):
            raise ValueError("panoptic and instance outputs need a mask-classification model; a per-pixel "
                             "baseline gives semantic maps only")
        results = []
        for i in range(len(image_sizes)):
            args = (image_sizes[i], padded_size, output_sizes[i], want)
            if per_pixel:
                results.append(_with_cpu_fallback(self._one_per_pixel, outputs.sem_seg_logits[i], *args))
            else:
                results.append(_with_cpu_fallback(self._one, outputs.pred_logits[i], outputs.pred_masks[i], *args))
        return results

    def _one_per_pixel(self, logits, image_size, padded_size, output_size, want) -> dict:
        return {"sem_seg": tiled.class_logit_labels(logits, image_size, padded_size, output_size, self.tile_pixels)}

    def _one(self, class_logits, mask_logits, image_size, padded_size, output_size, want) -> dict:
        sizes = (image_size, padded_size, output_size)
        out: dict[str, Any] = {}
        if "sem_seg" in want:
            out["sem_seg"] = self.semantic_map(class_logits, mask_logits, *sizes)
        if "panoptic" in want:
            out["panoptic"] = self.panoptic(class_logits, mask_logits, *sizes)
        if "instances" in want:
            masks = tiled.full_resolution(mask_logits, *sizes, self.tile_pixels)
            out["instances"] = instance_inference(class_logits, masks, self.thing_ids or None)
        return out

    def semantic_map(self, class_logits, mask_logits, image_size, padded_size, output_size) -> torch.Tensor:
        """[H, W] int64 labels by the configured semantic inference."""
        sizes = (image_size, padded_size, output_size)
        if self.mode == "semantic":
            probs = F.softmax(class_logits, dim=-1)[:, :-1]
            return tiled.semantic_labels(probs, mask_logits, *sizes, self.tile_pixels)
        if self.mode == "general":
            scores, classes = F.softmax(class_logits, dim=-1).max(-1)
            keep = (classes != self.num_classes) & (scores >= self.general_threshold)
            kept = keep.nonzero().squeeze(1)
            if kept.numel() == 0:
                return torch.full(tuple(output_size), self.ignore_label, dtype=torch.int64, device=mask_logits.device)
            assignment, _ = tiled.weighted_mask_argmax(scores[kept], mask_logits[kept], *sizes, self.tile_pixels)
            return classes[kept][assignment]
        # iterative: rounds over the whole map (a research ablation; not on the fast path)
        masks = tiled.full_resolution(mask_logits, *sizes, self.tile_pixels)
        return iterative_inference(class_logits, masks, ratio=self.iterative_ratio)[0].argmax(0)

    def panoptic(self, class_logits, mask_logits, image_size, padded_size, output_size
                 ) -> tuple[torch.Tensor, list[dict]]:
        """(segment ids [H, W] int32, segments_info) by MaskFormer's or DETR's post-processing."""
        sizes = (image_size, padded_size, output_size)
        scores, classes = F.softmax(class_logits, dim=-1).max(-1)
        if self.panoptic_postprocessing == "detr":
            keep = classes.ne(self.num_classes) & (scores > self.detr_threshold)
            if not bool(keep.any()):
                return torch.zeros(tuple(output_size), dtype=torch.int32, device=mask_logits.device), []
            masks = tiled.full_resolution(mask_logits[keep], *sizes, self.tile_pixels)
            return detr_panoptic_inference(class_logits[keep], masks, self.thing_ids, self.detr_threshold)
        keep = classes.ne(self.num_classes) & (scores > self.object_mask_threshold)
        if not bool(keep.any()):
            return torch.zeros(tuple(output_size), dtype=torch.int32, device=mask_logits.device), []
        assignment, binary_area = tiled.weighted_mask_argmax(scores[keep], mask_logits[keep], *sizes, self.tile_pixels)
        return panoptic_segments_from_assignment(assignment, binary_area, scores[keep], classes[keep],
                                                 self.thing_ids, self.overlap_threshold)

    # ------------------------------------------------------------------------------------------ TTA

    def tta_scores(self, net: nn.Module, image: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
        """Multi-scale (+ flip) averaged class probabilities [K, H, W] of one image [3, h, w]."""

        def forward_fn(images: torch.Tensor) -> list[torch.Tensor]:
            outputs = self.forward(net, images)
            size = tuple(images.shape[-2:])
            if isinstance(outputs, PerPixelOutput):
                return [tiled.full_resolution(m, size, size, size).softmax(0) for m in outputs.sem_seg_logits]
            return [semantic_inference(c, tiled.full_resolution(m, size, size, size))
                    for c, m in zip(outputs.pred_logits, outputs.pred_masks, strict=True)]

        return semantic_tta(forward_fn, image, scales=self.tta_scales, flip=self.tta_flip, output_size=output_size)


def build_postprocessor(inference: Any, info: Any, *, mode: str | None = None, tta: bool | None = None,
                        precision: str = "fp32", channels_last: bool | None = None) -> PostProcessor:
    """The post-processor of a recipe's `inference` section (InferenceConfig) for a dataset (DatasetInfo:
    num_classes, ignore_label, thing_ids). mode / tta override the recipe's (evaluate --inference / --tta);
    inference.mode=panoptic means semantic inference for the semantic map (PQ uses panoptic inference).
    channels_last defaults to on for CPU inference, where oneDNN's convolutions are faster with it."""
    mode = mode or inference.mode
    if mode == "panoptic":
        mode = "semantic"
    return PostProcessor(
        num_classes=info.num_classes, ignore_label=info.ignore_label, thing_ids=tuple(info.thing_ids),
        mode=mode, object_mask_threshold=inference.object_mask_threshold,
        overlap_threshold=inference.overlap_threshold, panoptic_postprocessing=inference.panoptic_postprocessing,
        detr_threshold=inference.detr_threshold, general_threshold=inference.general_threshold,
        iterative_ratio=inference.iterative_ratio, tta=inference.tta if tta is None else tta,
        tta_scales=tuple(inference.tta_scales), tta_flip=inference.tta_flip, precision=precision,
        channels_last=bool(channels_last),
    )


def channels_last_default(device: torch.device) -> bool:
    """Inference on a CPU runs the network on channels_last images: oneDNN's convolutions are faster in
    that layout (measured in benchmarks/bench_inference.py); on GPUs the recipe's layout is kept."""
    return torch.device(device).type == "cpu"


def _to_cpu(x: Any) -> Any:
    return x.cpu() if isinstance(x, torch.Tensor) else x


def _with_cpu_fallback(fn, *args):
    """fn(*args); when the accelerator runs out of memory, free its cache and redo this image on the CPU
    (slower but complete) instead of losing the evaluation. Tiling makes this rare: it is the last resort."""
    try:
        return fn(*args)
    except OOM_ERRORS:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if not _with_cpu_fallback.warned:
            _with_cpu_fallback.warned = True
            warnings.warn("out of accelerator memory in post-processing: continuing on the CPU for those "
                          "images (slower)", RuntimeWarning, stacklevel=2)
        return fn(*(_to_cpu(a) for a in args))


_with_cpu_fallback.warned = False
