"""Mask-classification inference: probability-mask pairs -> semantic predictions (the written-out forms).

Paper Sec. 3.4 (general and semantic inference), appendix Table VII (general inference with a confidence
filter), draft Table 5 (iterative inference), and `semantic_tta` (multi-scale + flip test-time
augmentation, paper Sec. 4.1). Pure tensor functions on one image whose masks are already at the output
size. `postprocess.PostProcessor` runs them at full resolution without [Q, H, W] tensors
(`inference_tiled`); these forms are its specification, and the tests compare the two. Panoptic and
instance outputs are in inference_panoptic.py.

Shapes: Q queries, K classes (index K of the class logits is "no object"), (H, W) = output size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


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
    threshold: float,
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
    ratio: float,
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


def semantic_tta(
    forward_fn: Callable[[torch.Tensor], torch.Tensor | Sequence[torch.Tensor]],
    image: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    output_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Multi-scale (+ horizontal flip) test-time augmentation for semantic scores (paper Sec. 4.1).

    forward_fn: images [B, 3, h, w] -> B per-image scores [K, h, w] at the input size (a tensor
                [B, K, h, w] or a list), e.g. model + semantic inference at the input size.
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
