"""Panoptic and instance outputs from probability-mask pairs: MaskFormer's panoptic inference (paper Sec. 3.4
and 4.2), DETR's panoptic post-processing (Table 3, "MaskFormer (DETR)") and instance predictions. Pure
tensor functions on one image; `postprocess.PostProcessor` chooses between them and feeds them full-
resolution masks band by band (`panoptic_segments_from_assignment` is the part after the per-pixel argmax).

Shapes: Q queries, K classes (index K of the class logits is "no object"), (H, W) = output size.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F


def panoptic_inference(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    thing_ids: Iterable[int],
    object_mask_threshold: float,
    overlap_threshold: float,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """General inference for panoptic output, exactly as the reference MaskFormer `panoptic_inference`.

    class_logits: [Q, K+1]; mask_logits: [Q, H, W]; thing_ids: contiguous ids of thing classes.
    Keep queries whose argmax is not "no object" and whose score > object_mask_threshold; assign every
    pixel to argmax_i score_i * m_i (ties: lowest kept query); a kept query becomes a segment only if its
    assigned area > 0, its binary mask area (m_i >= 0.5) > 0 and assigned / binary >= overlap_threshold;
    stuff segments of one class merge into the first one's id. Unassigned pixels are 0 (void).
    Returns (panoptic_seg [H, W] int32 with ids 1..n, segments_info: list of dict(id, category_id
    (contiguous), isthing, score (of the segment's first query), area (pixels in panoptic_seg))).
    """
    num_classes = class_logits.shape[-1] - 1
    h, w = mask_logits.shape[-2:]
    scores, classes = F.softmax(class_logits, dim=-1).max(-1)
    keep = classes.ne(num_classes) & (scores > object_mask_threshold)
    cur_scores, cur_classes = scores[keep], classes[keep]
    cur_masks = mask_logits[keep].sigmoid()
    panoptic_seg = torch.zeros((h, w), dtype=torch.int32, device=mask_logits.device)
    n = cur_masks.shape[0]
    if n == 0:
        return panoptic_seg, []
    cur_mask_ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    binary_area = (cur_masks >= 0.5).flatten(1).sum(1)
    return panoptic_segments_from_assignment(cur_mask_ids, binary_area, cur_scores, cur_classes, thing_ids,
                                             overlap_threshold)


def panoptic_segments_from_assignment(
    assignment: torch.Tensor,
    binary_area: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    thing_ids: Iterable[int],
    overlap_threshold: float,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The second half of `panoptic_inference`, given the per-pixel winner of the N kept queries.

    assignment: [H, W] int64 in 0..N-1 (argmax_i score_i * m_i); binary_area: [N] pixels with m_i >= 0.5;
    scores, classes: [N] of the kept queries. Same return contract as `panoptic_inference`.
    """
    n = scores.shape[0]
    # Every pixel belongs to exactly one kept query, so one bincount gives all assigned areas.
    mask_areas = torch.bincount(assignment.flatten(), minlength=n).tolist()
    original_areas = binary_area.tolist()
    things = {int(t) for t in thing_ids}
    segment_of_query = [0] * n
    segments_info: list[dict[str, Any]] = []
    stuff_segment: dict[int, int] = {}
    for k, (cls, score) in enumerate(zip(classes.tolist(), scores.tolist(), strict=True)):
        mask_area, original_area = mask_areas[k], original_areas[k]
        if mask_area == 0 or original_area == 0:
            continue
        if mask_area / original_area < overlap_threshold:
            continue
        isthing = cls in things
        if not isthing and cls in stuff_segment:
            segment_of_query[k] = stuff_segment[cls]
            continue
        segment_id = len(segments_info) + 1
        if not isthing:
            stuff_segment[cls] = segment_id
        segment_of_query[k] = segment_id
        segments_info.append({"id": segment_id, "category_id": cls, "isthing": isthing, "score": score})
    if not segments_info:
        return torch.zeros(assignment.shape, dtype=torch.int32, device=assignment.device), []
    lut = torch.tensor(segment_of_query, dtype=torch.int32, device=assignment.device)
    panoptic_seg = lut[assignment]
    areas = torch.bincount(panoptic_seg.flatten().long(), minlength=len(segments_info) + 1).tolist()
    for info in segments_info:
        info["area"] = areas[info["id"]]
    return panoptic_seg, segments_info


def detr_panoptic_inference(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    thing_ids: Iterable[int],
    threshold: float,
    min_area: int = 4,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """DETR's panoptic post-processing (Carion et al. 2020), the "MaskFormer (DETR)" row of Table 3.

    class_logits: [Q, K+1]; mask_logits: [Q, H, W]; thing_ids: contiguous ids of thing classes.
    Keep queries whose argmax over K+1 is not "no object" and whose score > threshold; assign every pixel
    to argmax_i m_i[h, w] over the kept queries' mask logits (no class weighting, no mask threshold; ties:
    lowest kept query). This follows DETR's released PostProcessPanoptic (what the MaskFormer authors ran,
    so what the paper's numbers come from) rather than its paper: in the first pass a thing query is its
    own segment and all kept queries of one stuff class are merged into the segment of the first of them,
    which leaves the other ("duplicate") queries of that class with area 0. Every query whose area is
    <= min_area is removed -- the duplicates always, a stuff class whose merged area is that small, a small
    thing -- and the assignment is recomputed by plain argmax over the remaining queries (the pixels of a
    removed query go to the best remaining mask logit, possibly of another class), removing queries of
    area <= min_area again until none is that small. No duplicate remains after the first removal, so later
    passes need no merging. Without duplicates and small segments the first pass is final. No kept query
    (or none left): all void.
    Returns (panoptic_seg [H, W] int32 with ids 1..n in order of each segment's first query, 0 = void,
    segments_info: list of dict(id, category_id (contiguous), isthing, score (class probability of the
    segment's first query), area (pixels in panoptic_seg))) -- the contract of `panoptic_inference`.
    """
    num_classes = class_logits.shape[-1] - 1
    h, w = mask_logits.shape[-2:]
    scores, classes = F.softmax(class_logits, dim=-1).max(-1)
    keep = classes.ne(num_classes) & (scores > threshold)
    cur_scores, cur_classes = scores[keep].tolist(), classes[keep].tolist()
    cur_masks = mask_logits[keep]
    things = {int(t) for t in thing_ids}
    alive = list(range(len(cur_classes)))  # indices into the kept queries
    while alive:
        # segment of each alive query: a thing alone, a stuff class shared (first alive query's segment);
        # only the first pass can share, as every other query of a stuff class is removed after it
        segment_of: list[int] = []
        first_query: list[int] = []
        stuff_segment: dict[int, int] = {}
        for k in alive:
            cls = cur_classes[k]
            if cls not in things and cls in stuff_segment:
                segment_of.append(stuff_segment[cls])
                continue
            if cls not in things:
                stuff_segment[cls] = len(first_query)
            segment_of.append(len(first_query))
            first_query.append(k)
        lut = torch.tensor(segment_of, dtype=torch.int64, device=mask_logits.device)
        segment_map = lut[cur_masks[alive].argmax(0)]
        areas = torch.bincount(segment_map.flatten(), minlength=len(first_query)).tolist()
        small = {s for s, a in enumerate(areas) if a <= min_area}
        # remove the queries of small segments and the duplicates (not the first query of their segment)
        remaining = [k for k, s in zip(alive, segment_of, strict=True) if s not in small and first_query[s] == k]
        if len(remaining) == len(alive):
            segments_info = [
                {"id": s + 1, "category_id": cur_classes[k], "isthing": cur_classes[k] in things,
                 "score": cur_scores[k], "area": areas[s]}
                for s, k in enumerate(first_query)
            ]
            return (segment_map + 1).to(torch.int32), segments_info
        alive = remaining
    return torch.zeros((h, w), dtype=torch.int32, device=mask_logits.device), []


def instance_inference(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    thing_ids: Iterable[int] | None = None,
    topk: int | None = None,
) -> list[tuple[torch.Tensor, int, float]]:
    """Instance predictions from a panoptic model (MaskFormer has none; this is Mask2Former's recipe).

    class_logits: [Q, K+1]; mask_logits: [Q, H, W].
    Take the `topk` (default Q) best (query, class) pairs over softmax[:, :K], keep thing classes (all
    classes when thing_ids is None), mask = logits > 0, score = p_i(c) * mean of m_i inside the mask.
    Returns a list of (mask [H, W] bool, class, score), in decreasing class probability.
    """
    q, k1 = class_logits.shape
    num_classes = k1 - 1
    probs = F.softmax(class_logits, dim=-1)[:, :-1].flatten()
    top = min(q if topk is None else topk, probs.numel())
    top_probs, top_idx = probs.topk(top, sorted=True)
    query_idx = top_idx // num_classes
    classes = top_idx % num_classes
    if thing_ids is not None:
        things = torch.tensor(sorted({int(t) for t in thing_ids}), dtype=classes.dtype, device=classes.device)
        is_thing = torch.isin(classes, things)
        top_probs, query_idx, classes = top_probs[is_thing], query_idx[is_thing], classes[is_thing]
    logits = mask_logits[query_idx]
    masks = logits > 0
    mask_scores = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    scores = (top_probs * mask_scores).tolist()
    return [(m, c, s) for m, c, s in zip(masks, classes.tolist(), scores, strict=True)]
