"""DETR's panoptic post-processing ("MaskFormer (DETR)", paper Table 3) against a brute-force reference
written here with plain python loops over pixels, hand-made cases, and its threading through the config,
the post-processor (`PostProcessor.postprocess`)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from maskformer_cli.config import load_recipe
from maskformer_cli.errors import UserError
from maskformer_cli.inference_panoptic import detr_panoptic_inference, panoptic_inference
from maskformer_cli.postprocess import PostProcessor
from maskformer_cli.structures import MaskFormerOutput


def _detr_reference(cls, masks, thing_ids, threshold=0.85, min_area=4, events=None):
    """DETR's released post-processing, one pixel at a time: (segment-id map as nested lists, segments_info).

    First round: every pixel to the best kept query, then the pixels of every stuff query relabelled to the
    first kept query of its class (so the others, the duplicates, get no pixel); later rounds: plain argmax.
    Each round drops the queries with area <= min_area and the duplicates, until it drops nothing."""
    probs = torch.softmax(cls.double(), -1).tolist()
    m = masks.tolist()
    no_object = len(probs[0]) - 1
    h, w = len(m[0]), len(m[0][0])
    best = [max(range(no_object + 1), key=lambda c, p=p: p[c]) for p in probs]
    kept = [i for i, p in enumerate(probs) if best[i] != no_object and p[best[i]] > threshold]
    first_of = {}  # stuff class -> its first kept query (in the first round)
    for i in kept:
        if best[i] not in thing_ids:
            first_of.setdefault(best[i], i)
    duplicates = [i for i in kept if best[i] not in thing_ids and first_of[best[i]] != i]

    rounds = 0
    while kept:
        owner = [[max(kept, key=lambda i, y=y, x=x: m[i][y][x]) for x in range(w)] for y in range(h)]
        if rounds == 0:
            owner = [[first_of.get(best[i], i) if best[i] not in thing_ids else i for i in row] for row in owner]
        area = Counter(i for row in owner for i in row)
        small = [i for i in kept if area[i] <= min_area or (rounds == 0 and i in duplicates)]
        if not small:
            break
        kept = [i for i in kept if i not in small]
        rounds += 1
    if events is not None:
        events["removal"] += rounds > 0
        events["all void"] += not kept
        events["duplicate dropped"] += bool(duplicates)
    if not kept:
        return [[0] * w for _ in range(h)], []
    ids = {i: n + 1 for n, i in enumerate(kept)}
    info = [{"id": ids[i], "category_id": best[i], "isthing": best[i] in thing_ids, "score": probs[i][best[i]],
             "area": area[i]} for i in kept]
    return [[ids[i] for i in row] for row in owner], info


def _check_against_reference(cls, masks, thing_ids, threshold, min_area, events=None):
    seg, info = detr_panoptic_inference(cls, masks, thing_ids, threshold=threshold, min_area=min_area)
    ref_seg, ref_info = _detr_reference(cls, masks, set(thing_ids), threshold, min_area, events)
    assert seg.dtype == torch.int32 and seg.shape == masks.shape[1:]
    assert seg.tolist() == ref_seg
    assert [{k: s[k] for k in ("id", "category_id", "isthing", "area")} for s in info] == [
        {k: s[k] for k in ("id", "category_id", "isthing", "area")} for s in ref_info
    ]
    for s, r in zip(info, ref_info, strict=True):
        assert s["score"] == pytest.approx(r["score"], abs=1e-6)
        assert s["area"] > min_area
    return seg, info


@pytest.mark.parametrize("min_area", [4, 0, 9])
def test_detr_panoptic_equals_brute_force_reference(min_area):
    events = Counter()
    for seed in range(24):
        g = torch.Generator().manual_seed(seed)
        # K = 4 classes: 0, 1 things, 2, 3 stuff; less confident classes for every third seed
        cls = torch.randn(10, 5, generator=g) * (1.5 if seed % 3 == 0 else 3)
        masks = torch.randn(10, 6, 7, generator=g) * 4
        if seed % 2:
            masks = masks.round()  # quantised logits: exact ties go to the lower kept query
            cls[6], masks[6] = cls[2], masks[2]
        for threshold in (0.85, 0.5, 0.0):
            _check_against_reference(cls, masks, (0, 1), threshold, min_area, events)
    # the random cases do exercise every branch
    assert events["all void"] > 0 and events["duplicate dropped"] > 0 and events["removal"] > 0


def _hand_made():
    """A 6x6 image, K = 3 (0 thing; 1, 2 stuff). q0 thing (rows 0-2: 18 px); q1 stuff 1 (rows 3-5, cols 0-2:
    9 px); q2 a thing of class 0 too, winning 3 px of the lower-right block, where q1 is second best;
    q3 stuff 2, the rest of the lower-right block (6 px); q4 "no object" and q5 unsure (p ~ 0.55), both with
    the largest mask logits everywhere."""
    k, h, w = 3, 6, 6
    cls = torch.full((6, k + 1), -5.0)
    cls[0, 0], cls[1, 1], cls[2, 0], cls[3, 2], cls[4, k] = 10, 10, 10, 10, 10
    cls[5, 2], cls[5, k] = 1.0, 0.8
    masks = torch.full((6, h, w), -10.0)
    masks[0, :3] = 5
    masks[1, 3:, :3] = 5
    masks[3, 3:, 3:] = 4
    small = ([3, 3, 4], [3, 4, 3])  # q2's pixels
    masks[2][small] = 5
    masks[1][small] = 4.5
    masks[4] = 20
    masks[5] = 15
    return cls, masks


def test_detr_small_segment_removed_and_reassigned_to_next_best():
    cls, masks = _hand_made()
    seg, info = _check_against_reference(cls, masks, (0,), 0.85, 4)
    expected = torch.zeros(6, 6, dtype=torch.int32)
    expected[:3] = 1
    expected[3:, :3] = 2
    expected[3:, 3:] = 3
    expected[3, 3] = expected[3, 4] = expected[4, 3] = 2  # q2 (3 px, a thing: not merged with q0) is
    # removed, its pixels go to the next-best kept query there, q1
    assert torch.equal(seg, expected)
    assert [(s["id"], s["category_id"], s["isthing"], s["area"]) for s in info] == [
        (1, 0, True, 18), (2, 1, False, 12), (3, 2, False, 6)]
    assert info[0]["score"] == pytest.approx(torch.softmax(cls[0], -1).max().item())
    # q3 (6 px) is small too with min_area 6: removed in the same round; its pixels go to the best remaining
    # logit, -10 for both q0 and q1 there: a tie, won by the lower query q0
    seg, info = _check_against_reference(cls, masks, (0,), 0.85, 6)
    assert [(s["category_id"], s["area"]) for s in info] == [(0, 24), (1, 12)]


def test_detr_duplicate_stuff_queries_dropped_merged_area_counts_only_in_first_pass():
    k, h, w = 2, 4, 6  # class 0 thing, class 1 stuff
    cls = torch.full((5, k + 1), -5.0)
    cls[:2, 0] = 10
    cls[2:4, 1] = 10
    cls[4, k] = 10  # "no object" with the best masks everywhere: never kept
    masks = torch.full((5, h, w), -10.0)
    masks[0, :2, :3], masks[1, 2:, :3] = 5, 5  # two things of class 0, 6 px each: two segments
    masks[2, :2, 3:], masks[3, 2:, 3:] = 5, 5  # two stuff queries of class 1, 6 px each
    masks[1, 2:, 3:] = 0  # q1 second best under q3
    masks[4] = 50
    seg, info = _check_against_reference(cls, masks, (0,), 0.85, 4)
    # q3 is merged into q2 in the first pass, so left with no pixel and dropped; its pixels then go to the
    # best remaining query there, the thing q1 (not q2, whose logit is lower)
    assert [(s["id"], s["category_id"], s["isthing"], s["area"]) for s in info] == [
        (1, 0, True, 6), (2, 0, True, 12), (3, 1, False, 6)]
    assert (seg[:2, 3:] == 3).all() and (seg[2:, 3:] == 2).all()
    # q2, q3 3 px each (stuff); q1 a 2 px thing with q2 second best; q0 second best wherever nobody else is.
    # First pass: q2 survives with its merged area (6 px), q1 (2 px) and q3 (duplicate) are dropped; second
    # pass: q2 alone has 3 px + q1's 2 px = 5 px and stays; q3's pixels go to q0.
    masks[:4] = -10
    masks[0, :, :3], masks[0, :, 3:] = 5, 0
    masks[2, 0, 3:], masks[3, 3, 3:] = 5, 5
    masks[1, 1, 3:5], masks[2, 1, 3:5] = 5, 4
    seg, info = _check_against_reference(cls, masks, (0,), 0.85, 4)
    assert [(s["id"], s["category_id"], s["area"]) for s in info] == [(1, 0, 19), (2, 1, 5)]
    expected = torch.ones(h, w, dtype=torch.int32)
    expected[0, 3:] = expected[1, 3:5] = 2
    assert torch.equal(seg, expected)


def test_detr_no_kept_query_is_all_void_and_threshold_is_strict():
    cls, masks = _hand_made()
    seg, info = detr_panoptic_inference(cls, masks, (0,), threshold=1.0)
    assert info == [] and seg.dtype == torch.int32 and (seg == 0).all()
    # q5 exactly at the threshold is not kept (score > threshold); just below it, it takes every pixel and
    # the other kept queries, left with no pixel, are removed
    p = torch.softmax(cls, -1)[5].max().item()
    at, above = (detr_panoptic_inference(cls, masks, (0,), threshold=t) for t in (p, 0.9))
    assert torch.equal(at[0], above[0]) and at[1] == above[1]
    seg, info = detr_panoptic_inference(cls, masks, (0,), threshold=p * (1 - 1e-4))
    assert [(s["id"], s["category_id"], s["area"]) for s in info] == [(1, 2, 36)] and (seg == 1).all()
    # every kept segment too small, round after round: all void
    seg, info = detr_panoptic_inference(cls, masks, (0,), threshold=p * (1 - 1e-4), min_area=36)
    assert info == [] and (seg == 0).all()
    seg, info = detr_panoptic_inference(cls[:0], masks[:0], (0,), threshold=0.85)
    assert info == [] and seg.shape == (6, 6) and (seg == 0).all()


def test_detr_panoptic_postprocessing_through_config_evaluator_and_batch():
    recipe = load_recipe(None, ["inference.panoptic_postprocessing=detr", "inference.detr_threshold=0.5"])
    assert recipe.inference.panoptic_postprocessing == "detr" and recipe.inference.detr_threshold == 0.5
    assert load_recipe(None).inference.panoptic_postprocessing == "maskformer"
    assert load_recipe(None).inference.detr_threshold == 0.85
    with pytest.raises(UserError, match="panoptic_postprocessing.*'maskformer' \\| 'detr'"):
        load_recipe(None, ["inference.panoptic_postprocessing=DETR"])

    g = torch.Generator().manual_seed(3)
    cls, masks = torch.randn(8, 5, generator=g) * 4, torch.randn(8, 12, 12, generator=g) * 4
    things = (0, 1)
    detr = detr_panoptic_inference(cls, masks, things, threshold=0.5)
    ours = panoptic_inference(cls, masks, things, 0.5, 0.5)
    assert not torch.equal(detr[0], ours[0])  # the two post-processings differ on this input
    base = dict(num_classes=4, ignore_label=255, thing_ids=things, mode="semantic", object_mask_threshold=0.5,
                overlap_threshold=0.5, detr_threshold=0.5, general_threshold=0.3, iterative_ratio=0.3, tta=False,
                tta_scales=(1.0,), tta_flip=False)
    for name, expected in (("detr", detr), ("maskformer", ours)):
        pp = PostProcessor(panoptic_postprocessing=name, **base)
        (res,) = pp.postprocess(MaskFormerOutput(cls[None], masks[None]), [(12, 12)], (12, 12), [(12, 12)],
                                want=("panoptic",))
        pan, info = res["panoptic"]
        assert torch.equal(pan, expected[0]) and info == expected[1]
    # the production path at another size: crop of the padding and resize, then DETR's post-processing
    pp = PostProcessor(panoptic_postprocessing="detr", **{**base, "detr_threshold": 0.5})
    (res,) = pp.postprocess(MaskFormerOutput(cls[None], masks[None, :, :6, :6]), [(20, 24)], (24, 24), [(30, 36)],
                            want=("panoptic",))
    up = F.interpolate(masks[None, :, :6, :6], size=(24, 24), mode="bilinear", align_corners=False)[..., :20, :24]
    up = F.interpolate(up, size=(30, 36), mode="bilinear", align_corners=False)[0]
    pan, info = detr_panoptic_inference(cls, up, things, threshold=0.5)
    assert torch.equal(res["panoptic"][0], pan) and res["panoptic"][1] == info
    with pytest.raises(ValueError, match="post-processing"):
        PostProcessor(panoptic_postprocessing="box", **base)
