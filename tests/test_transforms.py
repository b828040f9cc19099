"""Joint augmentation: labels stay aligned with pixels, the crop constraint holds, padding/flip/resize as specified."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from maskformer_cli.config import DataConfig
from maskformer_cli.data import transforms as T

IGNORE = 255
# class -> pure color; blends of two of them are never near a third
PALETTE = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255), IGNORE: (255, 255, 255)}


def _scene(h: int = 64, w: int = 80, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose pixel colors encode the label ([3,H,W] uint8) and its labels [2,H,W]: class, segment id."""
    g = np.random.default_rng(seed)
    blocks = g.integers(0, 3, size=(h // 16 + 1, w // 16 + 1))
    blocks[0, 0] = IGNORE
    cls = np.kron(blocks, np.ones((16, 16), dtype=np.int64))[:h, :w]
    ids = np.kron(np.arange(blocks.size).reshape(blocks.shape) + 1, np.ones((16, 16), dtype=np.int64))[:h, :w]
    ids[cls == IGNORE] = 0
    img = np.zeros((h, w, 3), dtype=np.uint8)
    for c, rgb in PALETTE.items():
        img[cls == c] = rgb
    return torch.from_numpy(img).permute(2, 0, 1).contiguous(), torch.from_numpy(np.stack([cls, ids]))


def _check_aligned(image: torch.Tensor, labels: torch.Tensor, radius: int = 2) -> int:
    """Away from label boundaries, the nearest palette color (or the grey pad) gives the label. Returns the
    number of pixels checked."""
    cls = labels[0].float()[None, None]
    k = 2 * radius + 1
    lo = -F.max_pool2d(-cls, k, stride=1, padding=radius)
    hi = F.max_pool2d(cls, k, stride=1, padding=radius)
    interior = (lo == hi)[0, 0]
    colors = torch.tensor([*PALETTE.values(), (T.IMAGE_PAD_VALUE,) * 3], dtype=torch.float32)
    names = torch.tensor([*PALETTE.keys(), IGNORE])
    dist = ((image.float().permute(1, 2, 0)[..., None, :] - colors) ** 2).sum(-1)
    predicted = names[dist.argmin(-1)]
    assert torch.equal(predicted[interior], labels[0][interior])
    # the segment-id channel moved with the class channel: each id has exactly one class, void only on ignore
    for sid in labels[1].unique().tolist():
        classes = labels[0][labels[1] == sid].unique().tolist()
        assert (classes == [IGNORE]) if sid == 0 else (len(classes) == 1 and classes[0] != IGNORE)
    return int(interior.sum())


@pytest.mark.parametrize("seed", range(8))
def test_semantic_recipe_keeps_labels_aligned(seed):
    torch.manual_seed(seed)
    image, labels = _scene(seed=seed)
    tf = T.TrainSemanticTransform(crop_size=(48, 56), min_scale=0.5, max_scale=2.0, base_short_side=64,
                                  max_long_side=200, cat_max_ratio=0.9, color_jitter=False, flip=True)
    out_img, out_lab = tf(image, labels, (IGNORE, 0))
    assert out_img.shape == (3, 48, 56) and out_img.dtype == torch.uint8
    assert out_lab.shape == (2, 48, 56) and out_lab.dtype == torch.int64
    assert _check_aligned(out_img, out_lab) > 48 * 56 // 4


@pytest.mark.parametrize("seed", range(6))
def test_detr_recipe_keeps_labels_aligned(seed):
    torch.manual_seed(seed)
    image, labels = _scene(seed=seed)
    tf = T.TrainDETRTransform(flip=True, scales=(40, 56, 72), max_size=100, crop_scales=(48, 64), crop_range=(24, 40))
    out_img, out_lab = tf(image, labels, (IGNORE, 0))
    assert out_img.shape[-2:] == out_lab.shape[-2:]
    assert min(out_img.shape[-2:]) in (40, 56, 72) or max(out_img.shape[-2:]) == 100
    _check_aligned(out_img, out_lab)


def test_detr_recipe_sizes_with_the_paper_constants():
    image, labels = _scene(60, 80)
    aspects = set()
    for seed in range(10):
        torch.manual_seed(seed)
        out_img, out_lab = T.TrainDETRTransform()(image, labels, (IGNORE, 0))
        h, w = out_img.shape[-2:]
        assert min(h, w) in T.DETR_SCALES and max(h, w) <= T.DETR_MAX_SIZE
        assert out_lab.shape[-2:] == (h, w)
        aspects.add(round(w / h, 2))
    assert len(aspects) > 1  # the crop branch changes the aspect ratio, the plain branch keeps 4:3


def test_test_transform_resizes_short_side_and_caps_long_side():
    image, labels = _scene(50, 100)
    out, lab = T.TestTransform(64, 2048)(image, labels, (IGNORE, 0))
    assert out.shape == (3, 64, 128) and lab.shape == (2, 64, 128)
    _check_aligned(out, lab)
    out, _ = T.TestTransform(64, 100)(image, labels)
    assert out.shape == (3, 50, 100)
    for keep in (0, None):
        out, lab = T.TestTransform(keep)(image, labels)
        assert out is image and lab is labels


def test_shortest_edge_size_matches_detectron2_rounding():
    assert T.shortest_edge_size(480, 640, 800, 1333) == (800, 1067)
    assert T.shortest_edge_size(100, 1000, 800, 1333) == (133, 1333)
    assert T.shortest_edge_size(512, 683, 256, 2048) == (256, 342)  # 341.5 rounds half up
    assert T.shortest_edge_size(300, 200, 100, None) == (150, 100)


@pytest.mark.parametrize("size", [(74, 106), (20, 30), (37, 80), (11, 7), (37, 53)])
def test_label_resize_matches_pil_nearest(size):
    lab = np.random.default_rng(0).integers(0, 256, size=(37, 53)).astype(np.uint8)
    ref = np.asarray(Image.fromarray(lab).resize((size[1], size[0]), Image.NEAREST))
    ours = T.resize_nearest(torch.from_numpy(lab.astype(np.int64))[None], size)[0].numpy()
    assert np.array_equal(ours, ref)


def test_crop_constraint_is_respected():
    cls = torch.zeros(64, 64, dtype=torch.int64)
    cls[:, 36:48] = 1
    cls[:4] = IGNORE

    def share(top: int, left: int, h: int, w: int) -> tuple[int, float]:
        win = cls[top : top + h, left : left + w]
        counts = torch.bincount(win[win != IGNORE])
        counts = counts[counts > 0]
        return len(counts), counts.max().item() / counts.sum().item()

    constrained, free = [], []
    for seed in range(30):
        torch.manual_seed(seed)
        box = T.category_constrained_crop(cls, (32, 32), 0.75, IGNORE)
        assert box[2:] == (32, 32)
        constrained.append(share(*box))
        torch.manual_seed(seed)
        free.append(share(*T.category_constrained_crop(cls, (32, 32), 1.0, IGNORE)))
    assert all(n > 1 and s < 0.75 for n, s in constrained)
    assert any(n == 1 or s >= 0.75 for n, s in free)  # without the constraint such crops do happen

    # unsatisfiable (one category): gives up after the tries and still returns a crop
    one = torch.zeros(40, 40, dtype=torch.int64)
    assert T.category_constrained_crop(one, (64, 16), 0.5, IGNORE)[2:] == (40, 16)


def test_semantic_recipe_crop_is_constrained_end_to_end():
    image, labels = _scene(64, 64, seed=1)
    labels[0, :, :40] = 0
    tf = T.TrainSemanticTransform((32, 32), 1.0, 1.0, base_short_side=64, cat_max_ratio=0.75,
                                  color_jitter=False, flip=False)
    for seed in range(10):
        torch.manual_seed(seed)
        _, lab = tf(image, labels, (IGNORE, 0))
        counts = torch.bincount(lab[0][lab[0] != IGNORE])
        counts = counts[counts > 0]
        assert len(counts) > 1 and counts.max() < 0.75 * counts.sum()


def test_small_image_is_padded_to_crop_size():
    image, labels = _scene(40, 30)
    tf = T.TrainSemanticTransform((48, 48), 1.0, 1.0, base_short_side=30, color_jitter=False, flip=False)
    out, lab = tf(image, labels, (IGNORE, 0))
    assert out.shape == (3, 48, 48)
    assert torch.equal(out[:, :40, :30], image) and torch.equal(lab[:, :40, :30], labels)
    pad = torch.ones(48, 48, dtype=torch.bool)
    pad[:40, :30] = False
    assert (out[:, pad] == T.IMAGE_PAD_VALUE).all()
    assert (lab[0][pad] == IGNORE).all() and (lab[1][pad] == 0).all()


def test_flip_mirrors_image_and_labels_together():
    image, labels = _scene(48, 64, seed=2)
    tf = T.TrainSemanticTransform((48, 64), 1.0, 1.0, base_short_side=48, color_jitter=False, flip=True)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out, lab = tf(image, labels, (IGNORE, 0))
        if torch.equal(out, image):
            assert torch.equal(lab, labels)
            seen.add("same")
        else:
            assert torch.equal(out, image.flip(-1)) and torch.equal(lab, labels.flip(-1))
            seen.add("flipped")
    assert seen == {"same", "flipped"}


def test_hsv_conversion_matches_colorsys():
    rgb = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    rgb[:, 0, 0] = torch.tensor([0.3, 0.3, 0.3])  # grey: hue and saturation 0
    rgb[:, 0, 1] = torch.tensor([1.0, 1.0, 0.0])  # a tie between two maxima
    hsv = T._rgb_to_hsv(rgb)
    for y in range(8):
        for x in range(8):
            ref = colorsys.rgb_to_hsv(*rgb[:, y, x].tolist())
            assert hsv[:, y, x].tolist() == pytest.approx(list(ref), abs=1e-5)
    assert torch.allclose(T._hsv_to_rgb(hsv), rgb, atol=1e-5)


def test_color_jitter_is_a_pointwise_color_map_with_bounded_hue_shift():
    g = torch.Generator().manual_seed(0)
    base = torch.randint(60, 140, (4, 3), generator=g, dtype=torch.uint8)
    base[:, 0] += 60  # clearly saturated colors: their hue is well defined
    image = base[torch.randint(0, 4, (16, 16), generator=g)].permute(2, 0, 1).contiguous()
    changed, max_shift = 0, 0.0
    for seed in range(20):
        torch.manual_seed(seed)
        out = T.color_aug_ssd(image)
        assert out.dtype == torch.uint8 and out.shape == image.shape
        for c in range(4):  # equal input colors stay equal: the jitter cannot misalign anything
            where = (image == base[c][:, None, None]).all(0)
            assert (out[:, where] == out[:, where][:, :1]).all()
        changed += int(not torch.equal(out, image))
        h_in = T._rgb_to_hsv(image.float() / 255)[0]
        h_out = T._rgb_to_hsv(out.float() / 255)[0]
        d = (h_out - h_in).abs()
        max_shift = max(max_shift, torch.minimum(d, 1 - d).max().item())
    assert changed >= 15
    assert 0.02 < max_shift <= 18 / 180 + 0.03


def test_build_transforms_reads_the_recipe():
    cfg = DataConfig(crop_size=(96, 128), min_scale=0.75, max_scale=1.5, cat_max_ratio=0.5, flip=False,
                     color_jitter=False, max_long_side=1000)
    tf = T.build_transforms(cfg, train=True)
    assert isinstance(tf, T.TrainSemanticTransform)
    assert (tf.crop_size, tf.min_scale, tf.max_scale, tf.base_short_side) == ((96, 128), 0.75, 1.5, 96)
    assert (tf.cat_max_ratio, tf.flip, tf.color_jitter, tf.max_long_side) == (0.5, False, False, 1000)
    assert T.build_transforms(DataConfig(base_short_side=1024), train=True).base_short_side == 1024
    assert isinstance(T.build_transforms(DataConfig(augmentation="detr"), train=True), T.TrainDETRTransform)
    test = T.build_transforms(cfg, train=False)
    assert isinstance(test, T.TestTransform) and test.short_side == 96
    assert T.build_transforms(DataConfig(test_short_side=0), train=False).short_side == 0


def test_scale_jitter_picks_the_reference_short_sides_by_default(monkeypatch):
    """'choice' (the reference's MIN_SIZE_TRAIN_SAMPLING): the short side before the crop is one of
    int(x * 0.1 * 512), x = 5..20; 'uniform' draws any size in between."""
    import maskformer_cli.data.transforms as T

    seen = []
    real = T.shortest_edge_size

    def spy(h, w, short, max_long):
        seen.append(short)
        return real(h, w, short, max_long)

    monkeypatch.setattr(T, "shortest_edge_size", spy)
    image, labels = torch.zeros(3, 100, 120, dtype=torch.uint8), torch.zeros(1, 100, 120, dtype=torch.uint8)
    torch.manual_seed(0)
    for _ in range(300):
        T.TrainSemanticTransform((64, 64), base_short_side=512)(image, labels, (255,))
    assert set(seen) == {256, 307, 358, 409, 460, 512, 563, 614, 665, 716, 768, 819, 870, 921, 972, 1024}
    seen.clear()
    for _ in range(50):
        T.TrainSemanticTransform((64, 64), base_short_side=512, scale_sampling="uniform")(image, labels, (255,))
    assert len(set(seen)) == 50 and all(256 <= s <= 1024 for s in seen)
