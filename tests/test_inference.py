"""Inference strategies against slow per-pixel / per-query loops written here, and their properties."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maskformer_cli.inference import (
    general_inference,
    iterative_inference,
    semantic_inference,
    semantic_tta,
)
from maskformer_cli.inference_panoptic import instance_inference, panoptic_inference


def _random_outputs(q=6, k=4, h=7, w=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(q, k + 1, generator=g) * 3, torch.randn(q, h, w, generator=g) * 4


# --------------------------------------------------------------------------------------------- semantic


def test_semantic_inference_equals_per_pixel_loop():
    cls, masks = _random_outputs()
    q, k1 = cls.shape
    out = semantic_inference(cls, masks)
    probs = torch.softmax(cls.double(), -1)
    ref = torch.zeros(k1 - 1, *masks.shape[1:], dtype=torch.float64)
    for c in range(k1 - 1):
        for y in range(masks.shape[1]):
            for x in range(masks.shape[2]):
                ref[c, y, x] = sum(probs[i, c] * torch.sigmoid(masks[i, y, x].double()) for i in range(q))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # Batched leading dims give the same as one image at a time.
    batched = semantic_inference(torch.stack([cls, cls.flip(0)]), torch.stack([masks, masks.flip(0)]))
    torch.testing.assert_close(batched[0], out)
    torch.testing.assert_close(batched[1], semantic_inference(cls.flip(0), masks.flip(0)))


def _general_loop(cls, masks, threshold, ignore):
    k = cls.shape[1] - 1
    probs = torch.softmax(cls, -1)
    kept = [
        i for i in range(cls.shape[0]) if int(probs[i].argmax()) != k and float(probs[i].max()) >= threshold
    ]
    labels = torch.full(masks.shape[1:], ignore, dtype=torch.int64)
    assign = torch.full(masks.shape[1:], -1, dtype=torch.int64)
    for y in range(masks.shape[1]):
        for x in range(masks.shape[2]):
            best, best_v = -1, None
            for i in kept:
                v = float(probs[i].max() * torch.sigmoid(masks[i, y, x]))
                if best_v is None or v > best_v:  # strict: ties keep the lower query index
                    best, best_v = i, v
            if best >= 0:
                labels[y, x], assign[y, x] = int(probs[best].argmax()), best
    return labels, assign


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.6])
def test_general_inference_equals_loop(threshold):
    cls, masks = _random_outputs(q=8, seed=1)
    cls[2] = cls[5]  # an identical pair: ties go to the lower index
    masks[2] = masks[5]
    cls[3, -1] = 50.0  # a "no object" query never takes pixels
    labels, assign = general_inference(cls, masks, threshold, ignore_label=255)
    ref_labels, ref_assign = _general_loop(cls, masks, threshold, 255)
    assert torch.equal(labels, ref_labels) and torch.equal(assign, ref_assign)
    assert not (assign == 3).any() and not (assign == 5).any()


def test_general_inference_threshold_is_inclusive():
    cls, masks = _random_outputs(q=4, seed=6)
    masks[1] = 30.0  # query 1 would win wherever it is kept
    cls[1, -1] = -30.0  # and its best class is a real one
    score = float(torch.softmax(cls[1], -1).max())  # exactly representable: float32 -> float
    _, assign = general_inference(cls, masks, threshold=score)
    assert (assign == 1).all()
    _, assign = general_inference(cls, masks, threshold=score + 1e-6)
    assert not (assign == 1).any()


def test_general_inference_keeps_nothing_gives_ignore():
    cls, masks = _random_outputs()
    cls[:, -1] = 100.0
    labels, assign = general_inference(cls, masks, 0.0, ignore_label=7)
    assert (labels == 7).all() and (assign == -1).all()


def _iterative_loop(cls, masks, ratio, max_iters):
    probs = torch.softmax(cls, -1)[:, :-1]
    sig = torch.sigmoid(masks)
    q = cls.shape[0]
    keep = [True] * q
    rounds = 0
    while True:
        scores = sum(
            (probs[i].view(-1, 1, 1) * sig[i] for i in range(q) if keep[i]),
            torch.zeros(probs.shape[1], *masks.shape[1:]),
        )
        if max_iters is not None and rounds >= max_iters:
            return scores, keep
        labels = scores.argmax(0)
        dropped = False
        for i in range(q):
            binary = sig[i] >= 0.5
            area = int(binary.sum())
            if not keep[i] or area == 0:
                continue
            inside = int((binary & (labels == int(probs[i].argmax()))).sum())
            if inside / area < ratio:
                keep[i], dropped = False, True
        rounds += 1
        if not dropped:
            return scores, keep


@pytest.mark.parametrize("seed", [2, 3, 4])
@pytest.mark.parametrize("ratio", [0.3, 0.6])
@pytest.mark.parametrize("max_iters", [None, 1, 0])
def test_iterative_inference_equals_loop(max_iters, ratio, seed):
    cls, masks = _random_outputs(q=10, k=3, h=12, w=12, seed=seed)
    masks[4] = -20.0  # an empty binary mask is never dropped
    masks = masks.round()  # logit 0 -> m = 0.5 exactly: on the binary mask (m >= 0.5, as the reference)
    scores, keep = iterative_inference(cls, masks, ratio=ratio, max_iters=max_iters)
    ref_scores, ref_keep = _iterative_loop(cls, masks, ratio, max_iters)
    assert keep.tolist() == ref_keep
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-5)
    if max_iters == 0:
        torch.testing.assert_close(scores, semantic_inference(cls, masks))
    if max_iters is None:
        assert 0 < sum(keep.tolist()) < 10 and keep[4]
        # Converged: every kept query with a mask contributes at least `ratio` of its area.
        labels = scores.argmax(0)
        for i in keep.nonzero().flatten().tolist():
            binary = torch.sigmoid(masks[i]) >= 0.5
            if binary.any():
                cls_i = int(torch.softmax(cls[i], -1)[:-1].argmax())
                assert (binary & (labels == cls_i)).sum() >= ratio * binary.sum()


# --------------------------------------------------------------------------------------------- panoptic


def _panoptic_reference_loop(cls, masks, thing_ids, object_mask_threshold, overlap_threshold):
    """The reference algorithm written with per-pixel loops."""
    k = cls.shape[1] - 1
    probs = torch.softmax(cls, -1)
    sig = torch.sigmoid(masks)
    kept = [
        i
        for i in range(cls.shape[0])
        if int(probs[i].argmax()) != k and float(probs[i].max()) > object_mask_threshold
    ]
    h, w = masks.shape[1:]
    seg = torch.zeros(h, w, dtype=torch.int32)
    if not kept:
        return seg, []
    owner = torch.zeros(h, w, dtype=torch.int64)
    for y in range(h):
        for x in range(w):
            vals = [float(probs[i].max() * sig[i, y, x]) for i in kept]
            owner[y, x] = vals.index(max(vals))  # first maximum
    info, stuff_ids, next_id = [], {}, 1
    for j, i in enumerate(kept):
        region = owner == j
        area, original = int(region.sum()), int((sig[i] >= 0.5).sum())
        if area == 0 or original == 0 or area / original < overlap_threshold:
            continue
        c = int(probs[i].argmax())
        if c not in thing_ids and c in stuff_ids:
            seg[region] = stuff_ids[c]
            continue
        if c not in thing_ids:
            stuff_ids[c] = next_id
        seg[region] = next_id
        info.append({"id": next_id, "category_id": c, "isthing": c in thing_ids})
        next_id += 1
    return seg, info


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(("omt", "ot"), [(0.8, 0.8), (0.3, 0.5), (0.0, 0.0)])
def test_panoptic_inference_equals_reference_loop(seed, omt, ot):
    cls, masks = _random_outputs(q=12, k=5, h=10, w=11, seed=seed)
    cls = cls * 2
    cls[7], masks[7] = cls[1], masks[1]  # exact ties go to the lower query
    masks = masks.round()  # quantised logits: more ties inside a query pair's score * mask
    seg, info = panoptic_inference(cls, masks, {0, 1, 2}, omt, ot)
    ref_seg, ref_info = _panoptic_reference_loop(cls, masks, {0, 1, 2}, omt, ot)
    assert torch.equal(seg, ref_seg)
    assert [{k: s[k] for k in ("id", "category_id", "isthing")} for s in info] == ref_info
    for s in info:
        assert s["area"] == int((seg == s["id"]).sum()) > 0


def _hand_made_panoptic():
    """q0 thing (left half), q1 + q2 stuff of one class (top / bottom right: merged), q3 low confidence,
    q4 thing hidden behind q0 except 4 px, q5 "no object", q6 confident but with an empty mask."""
    k, h, w = 3, 16, 16
    cls = torch.zeros(7, k + 1)
    cls[0, 0], cls[1, 1], cls[2, 1], cls[3, 2], cls[4, 0], cls[5, k], cls[6, 0] = 10, 8, 8, 1, 9, 10, 10
    masks = torch.full((7, h, w), -10.0)
    masks[0, :, :8] = 10
    masks[1, :8, 8:] = 10
    masks[2, 8:, 8:] = 10
    masks[3, 4:12, 4:12] = 10
    masks[4, :8, :8] = 10
    masks[4, :2, 8:10] = 10
    masks[5] = 10
    return cls, masks


def test_panoptic_thresholds_drop_merge_and_void():
    cls, masks = _hand_made_panoptic()
    seg, info = panoptic_inference(
        cls, masks, thing_ids=[0], object_mask_threshold=0.8, overlap_threshold=0.8
    )
    expected = torch.zeros(16, 16, dtype=torch.int32)
    expected[:, :8] = 1
    expected[:, 8:] = 2
    expected[:2, 8:10] = 0  # won by q4, whose visible share 4/68 < 0.8: void
    assert torch.equal(seg, expected)
    assert [(s["id"], s["category_id"], s["isthing"], s["area"]) for s in info] == [
        (1, 0, True, 128),
        (2, 1, False, 124),
    ]
    assert info[0]["score"] == pytest.approx(torch.softmax(cls[0], -1).max().item())
    # A lower overlap threshold keeps q4 as a third segment.
    seg, info = panoptic_inference(
        cls, masks, thing_ids=[0], object_mask_threshold=0.8, overlap_threshold=0.05
    )
    assert [(s["id"], s["category_id"], s["area"]) for s in info][-1] == (3, 0, 4)
    assert (seg[:2, 8:10] == 3).all()
    # Nothing above the threshold: all void.
    seg, info = panoptic_inference(cls, masks, thing_ids=[0], object_mask_threshold=0.99999, overlap_threshold=0.8)
    assert info == [] and (seg == 0).all() and seg.dtype == torch.int32


def test_instance_inference_equals_loop():
    cls, masks = _random_outputs(q=5, k=4, seed=4)
    out = instance_inference(cls, masks, thing_ids=[1, 3], topk=8)
    probs = torch.softmax(cls, -1)[:, :-1]
    pairs = sorted(((float(probs[i, c]), i, c) for i in range(5) for c in range(4)), reverse=True)[:8]
    ref = []
    for p, i, c in pairs:
        if c in (1, 3):
            m = masks[i] > 0
            ref.append((m, c, p * float((torch.sigmoid(masks[i]) * m).sum() / (m.sum() + 1e-6))))
    assert len(out) == len(ref) > 0
    for (m, c, s), (rm, rc, rs) in zip(out, ref, strict=True):
        assert torch.equal(m, rm) and c == rc and s == pytest.approx(rs, rel=1e-5)


# ------------------------------------------------------------------------------------------------- TTA


def _conv_forward(kernel_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(4, 3, kernel_size, kernel_size, generator=g)

    def forward(images):
        return F.conv2d(images, weight, padding=kernel_size // 2)

    return forward


def test_tta_identity_and_flip():
    image = torch.rand(3, 20, 30)
    fwd = _conv_forward(3)
    assert torch.equal(semantic_tta(fwd, image, scales=(1.0,), flip=False), fwd(image[None])[0])
    # A per-pixel model commutes with the flip: averaging a map with its flipped-back twin changes nothing.
    pointwise = _conv_forward(1)
    assert torch.equal(semantic_tta(pointwise, image, scales=(1.0,), flip=True), pointwise(image[None])[0])
    # A 3x3 model does not: the flipped run must be flipped back before averaging.
    manual = (fwd(image[None])[0] + fwd(image.flip(-1)[None])[0].flip(-1)) / 2
    torch.testing.assert_close(semantic_tta(fwd, image, scales=(1.0,), flip=True), manual)


def test_tta_scales_resize_in_and_back():
    seen = []
    pointwise = _conv_forward(1)

    def fwd(images):
        seen.append(tuple(images.shape))
        return list(pointwise(images))

    image = torch.ones(3, 20, 30) * torch.tensor([0.2, 0.5, 0.9]).view(3, 1, 1)  # flat colour
    out = semantic_tta(fwd, image, scales=(0.5, 1.0, 1.5), flip=True)
    assert seen == [(2, 3, 10, 15), (2, 3, 20, 30), (2, 3, 30, 45)]
    torch.testing.assert_close(out, pointwise(image[None])[0], atol=1e-5, rtol=1e-5)
    assert out.shape == (4, 20, 30)
    # Straight to the original size: every run's output is resized once, to output_size.
    fwd3 = _conv_forward(3)
    out = semantic_tta(fwd3, image, scales=(1.0,), output_size=(41, 57))
    ref = F.interpolate(fwd3(image[None]), size=(41, 57), mode="bilinear", align_corners=False)[0]
    assert torch.equal(out, ref)
