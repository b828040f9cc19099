"""Panoptic quality (PQ = SQ x RQ, Kirillov et al.), exactly as panopticapi.evaluation.pq_compute, and PQ-stuff.

Per image, the segment ids of both maps are first compacted to small indices (panopticapi instead
forms gt_id * 256^3 + pred_id per pixel and sorts them), so one bincount over the paired indices of all
pixels gives the intersection of every pair; matching (IoU > 0.5, unique by construction), void and crowd
handling then work on that small matrix with no pixel loops. The rules are panopticapi's:
- id 0 is void; a pair's union leaves out the prediction's void pixels;
- crowd ground-truth segments never match and never count as false negatives;
- an unmatched prediction is not a false positive when more than half of it lies on void plus the crowd
  region of its class (the crowd segment listed last for that class, as panopticapi keeps only that one);
- ground-truth ids absent from the segment list are neither void nor segments;
- a class with tp + fp + fn = 0 is left out of the averages (per-class values NaN; panopticapi says 0).
Ground-truth segment areas are pixel counts of the map (panopticapi reads them from the JSON; in COCO
they are the same). PQ-stuff (paper Table 2b) converts semantic maps to panoptic form (one segment per
class per image, every class stuff, the ignore label void) and reuses the same core.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from maskformer_cli.metrics import confusion_matrix

# Id maps whose largest id is below this are compacted with a dense lookup table; others by hashing.
_DENSE_LUT_LIMIT = 1 << 20


def pq_image_stats(
    intersections: torch.Tensor,
    gt_classes: torch.Tensor,
    gt_crowd: torch.Tensor,
    pred_classes: torch.Tensor,
    num_classes: int,
) -> torch.Tensor:
    """PQ counts of one image from its segment-pair intersections.

    intersections: [G+2, P+1] int64 pixel counts; row 0 = ground-truth void (id 0), rows 1..G = the
        ground-truth segments, row G+1 = ground-truth ids outside the segment list; column 0 = predicted
        void, columns 1..P = the predicted segments.
    gt_classes: [G] int64 class index, -1 for a category outside the evaluated ones (never matches, never
        counted); gt_crowd: [G] bool; pred_classes: [P] int64 class index in 0..num_classes-1.
    Returns [4, num_classes] float64: rows = IoU sum of matches, tp, fp, fn.
    """
    g, p = gt_classes.numel(), pred_classes.numel()
    inter = intersections.to(torch.int64)
    if inter.shape != (g + 2, p + 1):
        raise ValueError(f"intersections shape {tuple(inter.shape)} != {(g + 2, p + 1)}")
    stats = torch.zeros((4, num_classes), dtype=torch.float64, device=inter.device)
    gt_classes = gt_classes.to(inter.device)
    gt_crowd = gt_crowd.to(inter.device).bool()
    pred_classes = pred_classes.to(inter.device)
    gt_area = inter[1 : g + 1].sum(1)
    pred_area = inter[:, 1:].sum(0)
    pair = inter[1 : g + 1, 1:]
    pred_void = inter[0, 1:]

    union = pred_area.unsqueeze(0) + gt_area.unsqueeze(1) - pair - pred_void.unsqueeze(0)
    iou = pair.double() / union.clamp(min=1).double()
    candidate = (gt_classes.unsqueeze(1) == pred_classes.unsqueeze(0)) & ~gt_crowd.unsqueeze(1)
    candidate &= (gt_classes >= 0).unsqueeze(1) & (pair > 0)
    matched = candidate & (iou > 0.5)
    gt_matched = matched.any(1)
    pred_matched = matched.any(0)

    match_classes = gt_classes.unsqueeze(1).expand(g, p)[matched]
    stats[0].index_add_(0, match_classes, iou[matched])
    stats[1].index_add_(0, match_classes, torch.ones_like(iou[matched]))

    missed = ~gt_matched & ~gt_crowd & (gt_classes >= 0)
    stats[3].index_add_(
        0, gt_classes[missed], torch.ones(int(missed.sum()), dtype=torch.float64, device=inter.device)
    )

    # The crowd region of each class: the last crowd segment of that class in list order.
    crowd_row = torch.full((num_classes,), -1, dtype=torch.int64)
    for i in gt_crowd.nonzero().flatten().tolist():
        c = int(gt_classes[i])
        if c >= 0:
            crowd_row[c] = i
    crowd_row = crowd_row.to(inter.device)
    row = crowd_row[pred_classes]
    if g:
        on_crowd = torch.where(row >= 0, pair[row.clamp(min=0), torch.arange(p, device=inter.device)], 0)
    else:  # no ground-truth segment (all void / ignore): no crowd either; predictions off void are FPs
        on_crowd = torch.zeros(p, dtype=pair.dtype, device=inter.device)
    ignored = (pred_void + on_crowd).double() / pred_area.clamp(min=1).double() > 0.5
    false_pos = ~pred_matched & ~ignored
    stats[2].index_add_(
        0, pred_classes[false_pos], torch.ones(int(false_pos.sum()), dtype=torch.float64, device=inter.device)
    )
    return stats


def _compact_ids(id_map: torch.Tensor, segment_ids: Sequence[int]) -> torch.Tensor:
    """Map segment ids to indices: a new [N] int32 tensor with 0 = id 0 (void), 1..S = segment_ids[i-1],
    S+1 = any other id.

    No sorting of pixels: small ids go through a dense lookup table; large ones (COCO's RGB-encoded
    24-bit ids) through a hash table of the few known ids (a xor-fold hash, widened until collision-free),
    every pixel's id then checked against the id stored in its slot, so unknown ids are always detected.
    int32 arithmetic throughout: several times faster than int64 on CPU.
    """
    flat = id_map.reshape(-1)
    if flat.dtype not in (torch.int32, torch.int64):
        flat = flat.to(torch.int64)
    s = len(segment_ids)
    if flat.numel() == 0:
        return flat.to(torch.int32)
    lo, hi = (int(v) for v in torch.aminmax(flat))
    if lo < 0:
        raise ValueError(f"segment ids must be >= 0, found {lo}")
    device = flat.device
    known = torch.tensor([0, *segment_ids], dtype=torch.int64, device=device)
    codes = torch.arange(s + 1, dtype=torch.int32, device=device)
    if hi < _DENSE_LUT_LIMIT:
        lut = torch.full((hi + 1,), s + 1, dtype=torch.int32, device=device)
        inside = known <= hi
        lut[known[inside]] = codes[inside]
        return lut.index_select(0, flat)
    if hi < 1 << 31 and max(segment_ids, default=0) < 1 << 31:
        flat = flat.to(torch.int32)
        known = known.to(torch.int32)
        for bits in range(max(6, (4 * (s + 1)).bit_length()), 21):
            slots = _fold_hash(known, bits)
            if slots.unique().numel() == s + 1:
                return _lookup_hashed(flat, known, _fold_hash(flat, bits), slots.long(), bits)
        known = known.to(torch.int64)
        flat = flat.to(torch.int64)
    sorted_ids, order = known.sort()
    pos = torch.searchsorted(sorted_ids, flat.to(torch.int64)).clamp(max=s)
    return torch.where(sorted_ids[pos] == flat, order.to(torch.int32)[pos], s + 1)


def _lookup_hashed(
    flat: torch.Tensor, known: torch.Tensor, slot: torch.Tensor, known_slots: torch.Tensor, bits: int
) -> torch.Tensor:
    """Codes of int32 ids `flat` from their hash slots: one gather of (id << code_bits | code) per pixel
    when that fits in int32 (COCO: 24-bit ids and < 128 segments), then an exact id check."""
    s = known.numel() - 1
    code_bits = (s + 1).bit_length()
    codes = torch.arange(s + 1, dtype=torch.int32, device=flat.device)
    if int(known.max()) < 1 << (31 - code_bits):
        packed = torch.full((1 << bits,), -1, dtype=torch.int32, device=flat.device)
        packed[known_slots] = (known << code_bits) | codes
        entry = packed.index_select(0, slot)
        mismatch = torch.bitwise_right_shift(entry, code_bits, out=slot).bitwise_xor_(flat)  # slot is spent
        lo, hi = torch.aminmax(mismatch)
        entry.bitwise_and_((1 << code_bits) - 1)
        if int(lo) != 0 or int(hi) != 0:  # some id of the map is not a segment: code S+1
            entry.masked_fill_(mismatch != 0, s + 1)
        return entry
    code_lut = torch.full((1 << bits,), s + 1, dtype=torch.int32, device=flat.device)
    key_lut = torch.full((1 << bits,), -1, dtype=torch.int32, device=flat.device)
    code_lut[known_slots] = codes
    key_lut[known_slots] = known
    return torch.where(key_lut.index_select(0, slot) == flat, code_lut.index_select(0, slot), s + 1)


def _fold_hash(ids: torch.Tensor, bits: int) -> torch.Tensor:
    """Xor of the `bits`-wide pieces of non-negative int32 ids: a slot in 0..2^bits-1."""
    h = (ids >> bits).bitwise_xor_(ids)
    h.bitwise_xor_(h >> (2 * bits))
    return h.bitwise_and_((1 << bits) - 1)


class _PQAccumulator:
    """Per-class IoU sums and tp / fp / fn counts, mergeable; summarised like panopticapi's pq_average."""

    def __init__(self, ids: Sequence[Any], isthing: Sequence[bool], names: Sequence[str]) -> None:
        self.ids, self.isthing, self.names = list(ids), [bool(t) for t in isthing], list(names)
        self.stats = torch.zeros((4, len(self.ids)), dtype=torch.float64)

    @property
    def num_classes(self) -> int:
        return len(self.ids)

    def reset(self) -> None:
        self.stats.zero_()

    def _add(self, stats: torch.Tensor) -> None:
        self.stats += stats.to(self.stats.device)

    def merge(self, other: _PQAccumulator) -> None:
        if other.ids != self.ids or other.isthing != self.isthing:
            raise ValueError(f"cannot merge {type(self).__name__} with different categories")
        self.stats += other.stats.to(self.stats.device)

    def state(self) -> torch.Tensor:
        """A copy of [4, C] float64 (IoU sum, tp, fp, fn): all_reduce(SUM) it, then `load_state`."""
        return self.stats.clone()

    def load_state(self, state: torch.Tensor) -> None:
        if state.shape != self.stats.shape:
            raise ValueError(f"state shape {tuple(state.shape)} != {tuple(self.stats.shape)}")
        self.stats = state.to(dtype=torch.float64).clone()

    def _summary(self) -> tuple[dict[str, tuple[float, float, float, int]], list[dict[str, Any]]]:
        iou, tp, fp, fn = (row.tolist() for row in self.stats.cpu())
        per_class, groups = [], {"all": [], "th": [], "st": []}
        for c in range(self.num_classes):
            entry = {"id": self.ids[c], "name": self.names[c], "isthing": self.isthing[c]}
            entry.update(TP=int(tp[c]), FP=int(fp[c]), FN=int(fn[c]))
            if tp[c] + fp[c] + fn[c] == 0:
                entry.update(PQ=math.nan, SQ=math.nan, RQ=math.nan)
            else:
                # Same expressions, same order as panopticapi: bit-identical per-class values.
                denom = tp[c] + 0.5 * fp[c] + 0.5 * fn[c]
                pq, sq, rq = iou[c] / denom, (iou[c] / tp[c] if tp[c] != 0 else 0.0), tp[c] / denom
                entry.update(PQ=100 * pq, SQ=100 * sq, RQ=100 * rq)
                for group in ("all", "th" if self.isthing[c] else "st"):
                    groups[group].append((pq, sq, rq))
            per_class.append(entry)
        means = {}
        for group, values in groups.items():
            n = len(values)
            if n == 0:
                means[group] = (math.nan, math.nan, math.nan, 0)
            else:
                means[group] = tuple(100 * sum(v[j] for v in values) / n for j in range(3)) + (n,)
        return means, per_class


class PanopticMetrics(_PQAccumulator):
    """PQ, SQ, RQ over all / thing / stuff classes and per class, as panopticapi.evaluation.pq_compute.

    categories: list of dict(id, isthing (0/1 or bool), optional name): segment `category_id`s are these
        dataset ids. Or thing_ids + num_classes: category ids are the contiguous 0..K-1.
    """

    def __init__(
        self,
        categories: Sequence[Mapping[str, Any]] | None = None,
        *,
        thing_ids: Iterable[int] | None = None,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if categories is not None:
            ids = [c["id"] for c in categories]
            isthing = [bool(c.get("isthing", 0)) for c in categories]
            names = [str(c.get("name", c["id"])) for c in categories]
        elif num_classes is not None:
            things = set(thing_ids or ())
            ids = list(range(num_classes))
            isthing = [i in things for i in ids]
            names = [str(i) for i in ids]
        else:
            raise ValueError("PanopticMetrics needs `categories` or `num_classes` (+ `thing_ids`)")
        if class_names is not None:
            if len(class_names) != len(ids):
                raise ValueError(f"{len(class_names)} class names for {len(ids)} categories")
            names = list(class_names)
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate category ids")
        super().__init__(ids, isthing, names)
        self._index = {cid: i for i, cid in enumerate(ids)}

    def update(
        self,
        pred_pan: torch.Tensor,
        pred_segments: Sequence[Mapping[str, Any]],
        gt_pan: torch.Tensor,
        gt_segments: Sequence[Mapping[str, Any]],
    ) -> None:
        """Add one image. pred_pan / gt_pan: [H, W] integer segment-id maps (0 = void).

        pred_segments: dict(id, category_id) for every id in pred_pan except 0 (and no others);
        gt_segments: dict(id, category_id, iscrowd (optional, 0/1)).
        """
        if pred_pan.shape != gt_pan.shape:
            raise ValueError(
                f"prediction shape {tuple(pred_pan.shape)} != ground-truth shape {tuple(gt_pan.shape)}"
            )
        gt_ids = [int(s["id"]) for s in gt_segments]
        pred_ids = [int(s["id"]) for s in pred_segments]
        for what, ids in (("ground-truth", gt_ids), ("predicted", pred_ids)):
            if len(set(ids)) != len(ids) or 0 in ids:
                raise ValueError(f"{what} segment ids must be unique and non-zero: {ids}")
        try:
            pred_classes = torch.tensor(
                [self._index[s["category_id"]] for s in pred_segments], dtype=torch.int64
            )
        except KeyError as e:
            raise ValueError(f"predicted segment has unknown category_id {e.args[0]}") from None
        gt_classes = torch.tensor(
            [self._index.get(s["category_id"], -1) for s in gt_segments], dtype=torch.int64
        )
        gt_crowd = torch.tensor([int(s.get("iscrowd", 0)) == 1 for s in gt_segments], dtype=torch.bool)

        g, p = len(gt_ids), len(pred_ids)
        gi = _compact_ids(gt_pan, gt_ids)
        pi = _compact_ids(pred_pan, pred_ids)
        counts = torch.bincount(gi.mul_(p + 2).add_(pi), minlength=(g + 2) * (p + 2)).view(g + 2, p + 2)
        if int(counts[:, p + 1].sum()) > 0:
            raise ValueError("the predicted map has segment ids that are not in pred_segments")
        if p and bool((counts[:, 1 : p + 1].sum(0) == 0).any()):
            raise ValueError("pred_segments lists segment ids that are absent from the predicted map")
        self._add(pq_image_stats(counts[:, : p + 1], gt_classes, gt_crowd, pred_classes, self.num_classes))

    def compute(self) -> dict[str, Any]:
        """Percent: PQ, SQ, RQ, PQ_th, SQ_th, RQ_th, PQ_st, SQ_st, RQ_st, n/n_th/n_st, and `per_class`."""
        means, per_class = self._summary()
        res: dict[str, Any] = {}
        for group, suffix in (("all", ""), ("th", "_th"), ("st", "_st")):
            pq, sq, rq, n = means[group]
            res.update({f"PQ{suffix}": pq, f"SQ{suffix}": sq, f"RQ{suffix}": rq, f"n{suffix}": n})
        res["per_class"] = per_class
        return res


class PQStuffMetrics(_PQAccumulator):
    """PQ-stuff of semantic label maps (paper Table 2b): every class is stuff, one segment per class per image.

    num_classes: K; ignore_label: ground-truth void. Predicted labels outside 0..K-1 are predicted void.
    """

    def __init__(
        self, num_classes: int, ignore_label: int = 255, class_names: Sequence[str] | None = None
    ) -> None:
        names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        if len(names) != num_classes:
            raise ValueError(f"{len(names)} class names for {num_classes} classes")
        super().__init__(list(range(num_classes)), [False] * num_classes, names)
        self.ignore_label = ignore_label

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """Add one image: pred [H, W] and gt [H, W] integer label maps."""
        k = self.num_classes
        # Panoptic form: one segment per class present, void = the ignore label; the confusion matrix
        # (row / column K = void) is then the pair-intersection matrix, once void is moved first.
        counts = confusion_matrix(pred, gt, k, self.ignore_label)
        gt_classes = (counts[:k].sum(1) > 0).nonzero().flatten()
        pred_classes = (counts[:, :k].sum(0) > 0).nonzero().flatten()
        void = torch.full((1,), k, dtype=torch.int64, device=counts.device)
        inter = counts.index_select(0, torch.cat([void, gt_classes])).index_select(
            1, torch.cat([void, pred_classes])
        )
        inter = torch.cat([inter, inter.new_zeros((1, inter.shape[1]))])  # no ids outside the segment list
        crowd = torch.zeros(gt_classes.numel(), dtype=torch.bool)
        self._add(pq_image_stats(inter, gt_classes, crowd, pred_classes, k))

    def compute(self) -> dict[str, Any]:
        """Percent: PQ_stuff, SQ_stuff, RQ_stuff, n_stuff, and `per_class` (same `_stuff` suffix).

        The paper writes PQ^St both for this metric (semantic tables) and for the stuff part of panoptic PQ
        (COCO tables); a panoptic dataset evaluated with both would mix them, so this one is `PQ_stuff`
        (as `--metric pq-stuff`) and `PQ_st` stays panopticapi's "Stuff" row.
        """
        means, per_class = self._summary()
        pq, sq, rq, n = means["st"]
        rows = [{"id": r["id"], "name": r["name"],
                 **{f"{k}_stuff": r[k] for k in ("TP", "FP", "FN", "PQ", "SQ", "RQ")}} for r in per_class]
        return {"PQ_stuff": pq, "SQ_stuff": sq, "RQ_stuff": rq, "n_stuff": n, "per_class": rows}
