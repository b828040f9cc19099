"""The post-processor (production path of evaluate, predict, train-time evaluation) against the written-out
inference on masks brought to full size by F.interpolate (the reference order: upsample to the padded
input, crop the padding, resize to the original size), batched against one image at a time, and with the
memory bound that makes it usable on 1024x2048 images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maskformer_cli import inference_tiled as tiled
from maskformer_cli.config import InferenceConfig
from maskformer_cli.inference import general_inference, iterative_inference, semantic_inference
from maskformer_cli.inference_panoptic import (
    detr_panoptic_inference,
    instance_inference,
    panoptic_inference,
)
from maskformer_cli.postprocess import PostProcessor, build_postprocessor
from maskformer_cli.structures import MaskFormerOutput, PerPixelOutput


class _Info:
    def __init__(self, num_classes, thing_ids=(), ignore_label=255):
        self.num_classes, self.thing_ids, self.ignore_label = num_classes, tuple(thing_ids), ignore_label


def reference_full_size(maps: torch.Tensor, image_size, padded_size, output_size) -> torch.Tensor:
    """[C, h, w] -> [C, H, W]: the reference (detectron2 MaskFormer) order, written with F.interpolate."""
    up = F.interpolate(maps[None], size=tuple(padded_size), mode="bilinear", align_corners=False)
    up = up[..., : image_size[0], : image_size[1]]
    if tuple(image_size) != tuple(output_size):
        up = F.interpolate(up, size=tuple(output_size), mode="bilinear", align_corners=False)
    return up[0]


def _outputs(q=9, k=5, h=16, w=12, seed=0, dtype=torch.float32, peaked=False):
    g = torch.Generator().manual_seed(seed)
    cls = torch.randn(q, k + 1, generator=g) * 3
    if peaked:  # a trained model's class head: most queries sure of one class or of "no object"
        cls = torch.randn(q, k + 1, generator=g)
        cls[torch.arange(q), torch.randint(0, k + 1, (q,), generator=g)] += 9
    return cls.to(dtype), (torch.randn(q, h, w, generator=g) * 5).to(dtype)


# padded size is 4x the mask size; (image size, output size): no resize, crop only, crop + upscale,
# crop + downscale, non-square
CASES = [((64, 48), (64, 48)), ((60, 40), (60, 40)), ((60, 40), (91, 77)), ((64, 44), (33, 29)),
         ((37, 48), (50, 121))]


def _pp(num_classes, **kw) -> PostProcessor:
    cfg = InferenceConfig(**{k: v for k, v in kw.items() if k != "thing_ids"})
    return build_postprocessor(cfg, _Info(num_classes, kw.get("thing_ids", ())))


@pytest.mark.parametrize(("image_size", "output_size"), CASES)
@pytest.mark.parametrize("tile", [1 << 13, 97])
def test_row_tiles_equal_the_reference_resize(image_size, output_size, tile):
    _, masks = _outputs(dtype=torch.float64)
    ref = reference_full_size(masks, image_size, (64, 48), output_size)
    bands = list(tiled.row_tiles(masks, image_size, (64, 48), output_size, tile_pixels=tile))
    assert [b[0] for b in bands][0] == 0 and bands[-1][1] == output_size[0]
    assert all(a[1] == b[0] for a, b in zip(bands, bands[1:], strict=False))
    got = torch.cat([b[2] for b in bands], dim=1)
    if image_size == output_size:  # the stride-4 upsampling in bands is bit-identical to the whole
        assert torch.equal(got, ref)
        assert torch.equal(torch.cat([b[2] for b in tiled.row_tiles(masks.float(), image_size, (64, 48), output_size,
                                                                    tile_pixels=tile)], 1),
                           reference_full_size(masks.float(), image_size, (64, 48), output_size))
    else:
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)


def test_padding_is_cropped_before_the_resize():
    # An image of 24x16 padded to 32x32: logits +5 on the image, -100 on the padding (stride 4: 6x4 cells).
    logits = torch.full((1, 8, 8), -100.0)
    logits[:, :6, :4] = 5.0
    ours = tiled.full_resolution(logits, (24, 16), (32, 32), (48, 32))
    naive = F.interpolate(logits[None], size=(48, 32), mode="bilinear", align_corners=False)[0]
    assert (ours[0, :40, :26] > 4.99).all()  # only pixels next to the padding are touched by it
    assert (naive[0] < 0).float().mean() > 0.3  # resizing the padded map squeezes the padding in


def _reference_maps(pp: PostProcessor, cls, masks, image_size, output_size, padded=(64, 48)):
    full = reference_full_size(masks, image_size, padded, output_size)
    if pp.mode == "semantic":
        sem = semantic_inference(cls, full).argmax(0)
    elif pp.mode == "general":
        sem = general_inference(cls, full, pp.general_threshold, pp.ignore_label)[0]
    else:
        sem = iterative_inference(cls, full, ratio=pp.iterative_ratio)[0].argmax(0)
    if pp.panoptic_postprocessing == "maskformer":
        pan = panoptic_inference(cls, full, pp.thing_ids, pp.object_mask_threshold, pp.overlap_threshold)
    else:
        pan = detr_panoptic_inference(cls, full, pp.thing_ids, pp.detr_threshold)
    return sem, pan, instance_inference(cls, full, pp.thing_ids or None)


@pytest.mark.parametrize(("image_size", "output_size"), CASES)
@pytest.mark.parametrize("mode", ["semantic", "general", "iterative"])
@pytest.mark.parametrize("panoptic", ["maskformer", "detr"])
def test_float64_maps_equal_the_written_out_inference(image_size, output_size, mode, panoptic):
    cls, masks = _outputs(seed=CASES.index((image_size, output_size)), dtype=torch.float64, peaked=True)
    pp = _pp(5, mode=mode, panoptic_postprocessing=panoptic, object_mask_threshold=0.5, overlap_threshold=0.1,
             detr_threshold=0.5, general_threshold=0.2, thing_ids=(0, 1))
    (res,) = pp.postprocess(MaskFormerOutput(cls[None], masks[None]), [image_size], (64, 48), [output_size],
                            want=("sem_seg", "panoptic", "instances"))
    sem, (pan, info), inst = _reference_maps(pp, cls, masks, image_size, output_size)
    assert torch.equal(res["sem_seg"], sem)
    assert torch.equal(res["panoptic"][0], pan) and res["panoptic"][1] == info
    assert len(res["instances"]) == len(inst)
    for (m, c, s), (rm, rc, rs) in zip(res["instances"], inst, strict=True):
        assert torch.equal(m, rm) and c == rc and s == pytest.approx(rs, rel=1e-9)
    assert info or panoptic == "detr"  # the case makes segments (DETR's 4-pixel rule may drop all)


@pytest.mark.parametrize(("image_size", "output_size"), CASES)
def test_float32_semantic_labels_differ_only_at_near_ties(image_size, output_size):
    """float32 sums in another order than one [K, Q] x [Q, HW] product: a label may flip only where the
    reference's two best class scores are within float rounding of each other."""
    flips = 0
    for seed in range(4):
        cls, masks = _outputs(q=20, k=8, seed=seed)
        (res,) = _pp(8).postprocess(MaskFormerOutput(cls[None], masks[None]), [image_size], (64, 48),
                                    [output_size])
        scores = semantic_inference(cls, reference_full_size(masks, image_size, (64, 48), output_size))
        differ = res["sem_seg"] != scores.argmax(0)
        top2 = scores.topk(2, dim=0).values
        assert ((top2[0] - top2[1])[differ] < 1e-5 * top2[0][differ]).all()
        flips += int(differ.sum())
    assert flips <= 2


def test_per_pixel_baseline_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 16, 12, generator=g)
    sizes, outs = [(60, 40), (64, 48)], [(91, 77), (64, 48)]
    res = _pp(6).postprocess(PerPixelOutput(logits), sizes, (64, 48), outs)
    for i in range(2):
        assert torch.equal(res[i]["sem_seg"], reference_full_size(logits[i], sizes[i], (64, 48), outs[i]).argmax(0))


@pytest.mark.parametrize("mode", ["semantic", "general", "iterative"])
def test_batched_equals_one_image_at_a_time(mode):
    """The production post-processing (the one evaluate / predict / training use) on a padded batch."""
    g = torch.Generator().manual_seed(1)
    cls = torch.randn(3, 6, 5, generator=g) * 4
    masks = torch.randn(3, 6, 16, 12, generator=g) * 4
    sizes, outs = [(64, 40), (48, 48), (64, 48)], [(100, 62), (48, 48), (32, 24)]
    pp = _pp(4, mode=mode, object_mask_threshold=0.3, overlap_threshold=0.3, general_threshold=0.3,
             thing_ids=(0, 1))
    want = ("sem_seg", "panoptic", "instances")
    batched = pp.postprocess(MaskFormerOutput(cls, masks), sizes, (64, 48), outs, want)
    for i in range(3):
        (alone,) = pp.postprocess(MaskFormerOutput(cls[i : i + 1], masks[i : i + 1]), [sizes[i]], (64, 48),
                                  [outs[i]], want)
        assert torch.equal(batched[i]["sem_seg"], alone["sem_seg"]) and batched[i]["sem_seg"].shape == outs[i]
        assert torch.equal(batched[i]["panoptic"][0], alone["panoptic"][0])
        assert batched[i]["panoptic"][1] == alone["panoptic"][1]
        assert [(c, s) for _, c, s in batched[i]["instances"]] == [(c, s) for _, c, s in alone["instances"]]
    assert any(r["panoptic"][1] for r in batched)


def test_a_cityscapes_image_needs_no_query_sized_tensor(monkeypatch):
    """1024x2048 output, Q=100, K=19: the largest upsampled tensor is a band, far below [Q, H, W] (800 MB)."""
    largest = []
    real = F.interpolate

    def spy(x, *args, **kwargs):
        out = real(x, *args, **kwargs)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(tiled.F, "interpolate", spy)
    g = torch.Generator().manual_seed(0)
    cls = torch.randn(100, 20, generator=g, dtype=torch.float64)
    masks = torch.randn(100, 256, 512, generator=g, dtype=torch.float64) * 4
    labels = tiled.semantic_labels(cls.softmax(-1)[:, :-1], masks, (1024, 2048), (1024, 2048), (1024, 2048))
    assert labels.shape == (1024, 2048)
    assert max(largest) * 8 < 40e6  # < 40 MB per band in float64 (the whole: 100 * 1024 * 2048 * 8 = 1.7 GB)
    # and the band-wise result is the reference on a slice (rows 500..520), computed the expensive way:
    # rows 480..544 come from mask rows 120..136, whose interior rows need no neighbour outside the slice
    rows = reference_full_size(masks[:, 120:136], (64, 2048), (64, 2048), (64, 2048))
    assert torch.equal(labels[500:520], semantic_inference(cls, rows).argmax(0)[20:40])


def test_accelerator_tiles_are_large_bounded_and_give_the_same_maps():
    """On a GPU the bands are as large as GPU_BAND_VALUES allows (a 512x683 image with Q = 100 in one band:
    small bands cost kernel launches there); the maps do not depend on the tile (float64: bit-equal)."""
    import dataclasses

    assert tiled.tile_pixels_for("cpu", 100) == tiled.TILE_PIXELS
    gpu_tile = tiled.tile_pixels_for("cuda", 150)  # a torch.device, no CUDA needed to size it
    assert 512 * 683 <= gpu_tile * tiled.UPSAMPLE_BANDS and gpu_tile * 150 <= tiled.GPU_BAND_VALUES
    assert tiled.tile_pixels_for("cuda", 10**9) == tiled.TILE_PIXELS  # never below the CPU's
    cls, masks = _outputs(q=12, k=5, h=40, w=52, seed=3, dtype=torch.float64, peaked=True)
    for mode in ("semantic", "general"):
        pp = _pp(5, mode=mode, object_mask_threshold=0.5, overlap_threshold=0.1, general_threshold=0.2,
                 thing_ids=(0, 1))
        want = ("sem_seg", "panoptic", "instances")
        args = (MaskFormerOutput(cls[None], masks[None]), [(150, 200)], (160, 208), [(233, 301)], want)
        (small,) = dataclasses.replace(pp, tile_pixels=97).postprocess(*args)  # many bands
        (large,) = dataclasses.replace(pp, tile_pixels=gpu_tile).postprocess(*args)  # one band
        assert torch.equal(small["sem_seg"], large["sem_seg"])
        assert torch.equal(small["panoptic"][0], large["panoptic"][0]) and small["panoptic"][1] == large["panoptic"][1]
        assert small["panoptic"][1]
        assert all(torch.equal(a[0], b[0]) for a, b in zip(small["instances"], large["instances"], strict=True))


def test_inference_defaults_have_one_home():
    """Thresholds come from InferenceConfig only: the post-processor has no defaults of its own."""
    import dataclasses

    cfg = InferenceConfig()
    pp = build_postprocessor(cfg, _Info(3))
    for f in ("object_mask_threshold", "overlap_threshold", "detr_threshold", "general_threshold", "iterative_ratio"):
        assert getattr(pp, f) == getattr(cfg, f)
        field = next(x for x in dataclasses.fields(PostProcessor) if x.name == f)
        assert field.default is dataclasses.MISSING, f
    assert build_postprocessor(InferenceConfig(mode="panoptic"), _Info(3)).mode == "semantic"


def test_post_processor_refuses_pq_from_per_pixel_scores_with_a_true_message():
    pp = PostProcessor(num_classes=3, ignore_label=255, thing_ids=(2,), mode="semantic", object_mask_threshold=0.8,
                       overlap_threshold=0.8, panoptic_postprocessing="maskformer", detr_threshold=0.85,
                       general_threshold=0.3, iterative_ratio=0.3, tta=False, tta_scales=(1.0,), tta_flip=False)
    outputs = PerPixelOutput(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="need a mask-classification model"):
        pp.postprocess(outputs, [(16, 16)], (16, 16), [(16, 16)], want=("panoptic",))
    (res,) = pp.postprocess(outputs, [(16, 16)], (16, 16), [(16, 16)], want=("sem_seg",))
    assert res["sem_seg"].shape == (16, 16)
