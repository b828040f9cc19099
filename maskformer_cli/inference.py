"""Mask-classification inference: probability-mask pairs -> semantic predictions, and the batch / TTA plumbing.

Paper Sec. 3.4 (general and semantic inference), appendix Table VII (general inference with a confidence
filter), draft Table 5 (iterative inference). All functions are pure tensor functions on one image, except
`crop_and_resize` and `postprocess_batch`, which take a padded batch (batched == one image at a time), and
`semantic_tta` (multi-scale + flip test-time augmentation, paper Sec. 4.1). Panoptic and instance outputs
(MaskFormer's and DETR's post-processing) are in inference_panoptic.py.

Shapes: Q queries, K classes (index K of the class logits is "no object"), h, w = stride-4 size of the
padded input, (Hp, Wp) = padded input size, (H, W) = output size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from maskformer_cli.inference_panoptic import instance_inference, panoptic_segments

# Elements of one upsampled chunk (64 MiB in float32): bounds the temporaries of crop_and_resize.
_CHUNK_ELEMENTS = 1 << 24


def crop_and_resize(
    mask_logits: torch.Tensor,
    image_sizes: Sequence[tuple[int, int]],
    padded_size: tuple[int, int],
    output_sizes: Sequence[tuple[int, int]],
    *,
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> list[torch.Tensor]:
    """Bring stride-4 maps back to each image's original size, in the reference order.

    mask_logits:  [B, C, h, w] (C = Q mask logits, or K class scores).
    image_sizes:  per image (h_i, w_i), the valid region inside the padded input (top-left aligned).
    padded_size:  (Hp, Wp), the padded input size the batch was run at.
    output_sizes: per image (H_i, W_i), the size to return (the original image size).
    Returns a list of B tensors [C, H_i, W_i].

    Upsample to the padded input (bilinear, align_corners=False), crop the padding, resize to the output
    size: cropping before resizing keeps the padding from being stretched into the image (resizing the
    padded map would squeeze the image content and smear the padding's logits over the border). Channels
    are processed in chunks of at most `chunk_elements` upsampled values, so a 1024x2048 output with
    Q=100 needs no [Q, Hp, Wp] temporary beyond the result itself.
    """
    b, c = mask_logits.shape[:2]
    if len(image_sizes) != b or len(output_sizes) != b:
        raise ValueError(
            f"got {b} images but {len(image_sizes)} image_sizes, {len(output_sizes)} output_sizes"
        )
    hp, wp = (int(s) for s in padded_size)
    chunk = max(1, chunk_elements // max(1, hp * wp))
    results = []
    for i in range(b):
        hi, wi = (int(s) for s in image_sizes[i])
        ho, wo = (int(s) for s in output_sizes[i])
        if not (0 < hi <= hp and 0 < wi <= wp):
            raise ValueError(f"image size {(hi, wi)} does not fit the padded size {(hp, wp)}")
        out = mask_logits.new_empty((c, ho, wo))
        for c0 in range(0, c, chunk):
            x = mask_logits[i : i + 1, c0 : c0 + chunk]
            x = F.interpolate(x, size=(hp, wp), mode="bilinear", align_corners=False)
            x = x[..., :hi, :wi]
            if (hi, wi) != (ho, wo):
                x = F.interpolate(x, size=(ho, wo), mode="bilinear", align_corners=False)
            out[c0 : c0 + chunk] = x[0]
        results.append(out)
    return results


def semantic_inference(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Semantic (a.k.a. probabilistic) inference: sum_i p_i(c) * m_i[h, w] (paper Sec. 3.4).

    class_logits: [..., Q, K+1]; mask_logits: [..., Q, H, W] -> [..., K, H, W] per-pixel class scores.
    The "no object" column is dropped after the softmax, so scores do not sum to one. The per-pixel label
    is `argmax` over K. One matrix product: [K, Q] @ [Q, H*W].
    """
    return _sum_over_queries(F.softmax(class_logits, dim=-1)[..., :-1], mask_logits.sigmoid())


def _sum_over_queries(probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """sum_i probs[i, c] * masks[i]: probs [..., Q, K], masks [..., Q, H, W] -> [..., K, H, W] (0 if Q = 0)."""
    h, w = masks.shape[-2:]
    return (probs.transpose(-1, -2) @ masks.flatten(-2)).unflatten(-1, (h, w))


def general_inference(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    threshold: float = 0.0,
    ignore_label: int = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """General inference for semantic output (paper Sec. 3.4; appendix Table VII uses threshold 0.3).

    class_logits: [Q, K+1]; mask_logits: [Q, H, W].
    Each pixel goes to argmax_i p_i(c_i) * m_i[h, w] over the queries whose most likely class c_i is not
    "no object" and whose confidence p_i(c_i) >= threshold; ties go to the lowest query index.
    Returns (labels [H, W] int64: c_i of the assigned query, `ignore_label` where no query is kept;
    assignment [H, W] int64: the query index, -1 where no query is kept). Segments of the same class
    merge by construction of the label map.
    """
    num_classes = class_logits.shape[-1] - 1
    h, w = mask_logits.shape[-2:]
    scores, classes = F.softmax(class_logits, dim=-1).max(-1)
    keep = (classes != num_classes) & (scores >= threshold)
    kept = keep.nonzero().squeeze(1)
    if kept.numel() == 0:
        labels = torch.full((h, w), ignore_label, dtype=torch.int64, device=mask_logits.device)
        return labels, torch.full((h, w), -1, dtype=torch.int64, device=mask_logits.device)
    prob_masks = scores[kept].view(-1, 1, 1) * mask_logits[kept].sigmoid()
    best = prob_masks.argmax(0)
    return classes[kept][best], kept[best]


def iterative_inference(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    ratio: float = 0.3,
    max_iters: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Iterative semantic inference (draft paper, Table 5).

    class_logits: [Q, K+1]; mask_logits: [Q, H, W].
    Semantic inference, then drop every kept query whose contribution to the result is below `ratio` of
    its own area: contribution = pixels labelled with the query's best real class c_i (argmax over K,
    "no object" excluded) inside its binary mask (m_i >= 0.5, as the reference); queries with an empty
    binary mask are never dropped. Recompute with the remaining queries and repeat until nothing is
    dropped (or `max_iters` rounds; max_iters=1 is the released reference's single pass).
    Returns (scores [K, H, W] from the kept queries, keep [Q] bool).
    """
    probs = F.softmax(class_logits, dim=-1)[..., :-1]
    masks = mask_logits.sigmoid()
    query_classes = probs.argmax(-1)
    binary = masks >= 0.5
    area = binary.flatten(1).sum(1)
    keep = torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)
    rounds = 0
    while True:
        scores = _sum_over_queries(probs[keep], masks[keep])
        if max_iters is not None and rounds >= max_iters:
            return scores, keep
        labels = scores.argmax(0)
        inside = (labels.unsqueeze(0) == query_classes.view(-1, 1, 1)) & binary
        contribution = inside.flatten(1).sum(1)
        # An empty binary mask (area 0) never satisfies the strict inequality: it is never dropped.
        drop = keep & (contribution.double() < ratio * area.double())
        rounds += 1
        if not drop.any():
            return scores, keep
        keep = keep & ~drop


def postprocess_batch(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    image_sizes: Sequence[tuple[int, int]],
    padded_size: tuple[int, int],
    output_sizes: Sequence[tuple[int, int]],
    *,
    mode: str = "semantic",
    thing_ids: Iterable[int] = (),
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
    panoptic_postprocessing: str = "maskformer",
    detr_threshold: float = 0.85,
    general_threshold: float = 0.3,
    iterative_ratio: float = 0.3,
    ignore_label: int = 255,
    resize_before_inference: bool = False,
) -> list[dict[str, Any]]:
    """Run one inference strategy on a padded batch; returns one dict per image at its output size.

    class_logits: [B, Q, K+1]; mask_logits: [B, Q, h, w] (stride 4 of the padded input).
    mode: "semantic" | "iterative" -> {"sem_seg": [K, H, W] scores, "labels": [H, W] int64};
          "general" -> {"labels": [H, W] int64 (ignore_label where nothing is kept), "assignment": [H, W]};
          "panoptic" -> {"panoptic_seg": [H, W] int32, "segments_info": [...], "labels": [H, W] int64
          (semantic view of the panoptic result, ignore_label on void)}, by `panoptic_inference` or, with
          panoptic_postprocessing="detr", `detr_panoptic_inference` (threshold detr_threshold);
          "instance" -> {"instances": [(mask, class, score), ...]}.
    For "semantic"/"iterative" the reference runs inference at the padded input size and then crops and
    resizes the [K, ...] scores (resize_before_inference=False, memory-friendly); True resizes the masks
    first, as every other mode does.
    """
    results = []
    thing_ids = tuple(thing_ids)
    for i in range(class_logits.shape[0]):
        cls_i = class_logits[i]
        if mode in ("semantic", "iterative") and not resize_before_inference:
            # Inference at the padded size, then crop + resize of the class scores.
            if mode == "semantic":
                sem = _semantic_inference_upsampled(cls_i, mask_logits[i], padded_size)
            else:
                (up,) = crop_and_resize(mask_logits[i : i + 1], [padded_size], padded_size, [padded_size])
                sem = iterative_inference(cls_i, up, ratio=iterative_ratio)[0]
            (sem,) = crop_and_resize(sem[None], [image_sizes[i]], padded_size, [output_sizes[i]])
            results.append({"sem_seg": sem, "labels": sem.argmax(0)})
            continue
        (masks,) = crop_and_resize(mask_logits[i : i + 1], [image_sizes[i]], padded_size, [output_sizes[i]])
        if mode == "semantic":
            sem = semantic_inference(cls_i, masks)
            results.append({"sem_seg": sem, "labels": sem.argmax(0)})
        elif mode == "iterative":
            sem = iterative_inference(cls_i, masks, ratio=iterative_ratio)[0]
            results.append({"sem_seg": sem, "labels": sem.argmax(0)})
        elif mode == "general":
            labels, assignment = general_inference(cls_i, masks, general_threshold, ignore_label)
            results.append({"labels": labels, "assignment": assignment})
        elif mode == "panoptic":
            pan, info = panoptic_segments(cls_i, masks, thing_ids, panoptic_postprocessing, object_mask_threshold,
                                          overlap_threshold, detr_threshold)
            lut = torch.full((len(info) + 1,), ignore_label, dtype=torch.int64, device=pan.device)
            for seg in info:
                lut[seg["id"]] = seg["category_id"]
            results.append({"panoptic_seg": pan, "segments_info": info, "labels": lut[pan.long()]})
        elif mode == "instance":
            results.append({"instances": instance_inference(cls_i, masks, thing_ids or None)})
        else:
            raise ValueError(f"unknown inference mode {mode!r}")
    return results


def _semantic_inference_upsampled(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """semantic_inference(class_logits, upsample(mask_logits, size)) -> [K, *size], accumulated over query
    chunks so that no [Q, *size] tensor exists (equal to the one-product result up to float rounding)."""
    probs = F.softmax(class_logits, dim=-1)[:, :-1]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, size[0] * size[1]))
    out = None
    for q0 in range(0, probs.shape[0], chunk):
        up = F.interpolate(
            mask_logits[None, q0 : q0 + chunk], size=size, mode="bilinear", align_corners=False
        )
        part = _sum_over_queries(probs[q0 : q0 + chunk], up[0].sigmoid())
        out = part if out is None else out.add_(part)
    if out is None:
        return mask_logits.new_zeros((probs.shape[1], *size))
    return out


def semantic_tta(
    forward_fn: Callable[[torch.Tensor], torch.Tensor | Sequence[torch.Tensor]],
    image: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    output_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Multi-scale (+ horizontal flip) test-time augmentation for semantic scores (paper Sec. 4.1).

    forward_fn: images [B, 3, h, w] -> B per-image scores [K, h, w] at the input size (a tensor
                [B, K, h, w] or a list), e.g. model + semantic inference + crop_and_resize.
    image:      [3, H, W] float (an integer image is converted to float32 first).
    output_size: (H_o, W_o) of the result, e.g. the original image size when `image` is the resized test
                input (default (H, W)).
    For every scale s the image is resized to (round(H*s), round(W*s)) (bilinear, antialiased when
    shrinking), run together with its mirror image when `flip`, and each output is flipped back, resized
    straight to the output size (bilinear, as detectron2's TTA) and averaged: returns [K, H_o, W_o].
    Scale 1.0 without flip at the input size is forward_fn(image[None])[0] exactly: no resize happens.
    """
    if not image.is_floating_point():
        image = image.float()
    h, w = image.shape[-2:]
    target = (h, w) if output_size is None else (int(output_size[0]), int(output_size[1]))
    total: torch.Tensor | None = None
    count = 0
    for s in scales:
        size = (max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5)))
        x = image[None]
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=size[0] < h)
        batch = torch.cat([x, x.flip(-1)]) if flip else x
        outputs = forward_fn(batch)
        for j in range(batch.shape[0]):
            out = outputs[j]
            if j == 1:
                out = out.flip(-1)
            if tuple(out.shape[-2:]) != target:
                out = F.interpolate(out[None], size=target, mode="bilinear", align_corners=False)[0]
            total = out.clone() if total is None else total.add_(out)
            count += 1
    if total is None:
        raise ValueError("semantic_tta needs at least one scale")
    return total / count


def build_postprocessor(cfg: Any, thing_ids: Iterable[int] = (), ignore_label: int = 255):
    """A `postprocess_batch` bound to an `InferenceConfig` (mode and thresholds) and a dataset's facts."""
    thing_ids = tuple(thing_ids)

    def run(class_logits, mask_logits, image_sizes, padded_size, output_sizes, mode: str | None = None):
        return postprocess_batch(
            class_logits,
            mask_logits,
            image_sizes,
            padded_size,
            output_sizes,
            mode=mode or cfg.mode,
            thing_ids=thing_ids,
            object_mask_threshold=cfg.object_mask_threshold,
            overlap_threshold=cfg.overlap_threshold,
            panoptic_postprocessing=cfg.panoptic_postprocessing,
            detr_threshold=cfg.detr_threshold,
            general_threshold=cfg.general_threshold,
            iterative_ratio=cfg.iterative_ratio,
            ignore_label=ignore_label,
        )

    return run
