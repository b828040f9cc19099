"""Swin backbone: equality with transformers' MaskFormerSwinBackbone, any input size, released-weight loading."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from maskformer_cli.errors import UserError
from maskformer_cli.models import swin
from maskformer_cli.models.convert_hf import hf_swin_to_official
from maskformer_cli.models.strict_load import load_into
from maskformer_cli.models.swin import (
    SwinBackbone,
    build_swin_backbone,
    load_swin_weights,
    shifted_window_mask,
)

transformers = pytest.importorskip("transformers")
from transformers.models.maskformer.configuration_maskformer_swin import MaskFormerSwinConfig  # noqa: E402
from transformers.models.maskformer.modeling_maskformer_swin import MaskFormerSwinBackbone  # noqa: E402


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (HF zero-initialises the bias tables, which would hide index errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "relative_position_bias_table" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _hf_and_ours(embed_dim, depths, heads, window):
    cfg = MaskFormerSwinConfig(embed_dim=embed_dim, depths=depths, num_heads=heads, window_size=window,
                               image_size=64, drop_path_rate=0.0, out_features=["stage1", "stage2", "stage3", "stage4"])
    hf = MaskFormerSwinBackbone(cfg).eval()
    _randomize(hf)
    ours = SwinBackbone(embed_dim, depths, heads, window, drop_path_rate=0.0).eval()
    load_into(ours, hf_swin_to_official(hf.state_dict()), source="HF swin")
    return hf, ours


CONFIGS = {
    "e24-d2222-w7": (24, [2, 2, 2, 2], [1, 2, 4, 8], 7),
    "e32-d1121-w7": (32, [1, 1, 2, 1], [1, 2, 4, 8], 7),
    "e16-d2222-w3": (16, [2, 2, 2, 2], [1, 2, 2, 4], 3),
}


@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
def test_matches_transformers_on_any_size(cfg):
    hf, ours = _hf_and_ours(*CONFIGS[cfg])
    # square; odd (patch padding, odd patch merging); window-unfriendly (30x50 tokens, not multiples of 7)
    for h, w in [(64, 64), (67, 93), (120, 200)]:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            ref = hf(x).feature_maps
            out = ours(x)
        assert list(out) == ["res2", "res3", "res4", "res5"]
        for i, (key, r) in enumerate(zip(out, ref, strict=True)):
            stride = 4 * 2**i
            assert out[key].shape == (2, ours.out_channels[key], math.ceil(h / stride), math.ceil(w / stride))
            assert out[key].shape == r.shape
            torch.testing.assert_close(out[key], r, atol=1e-4, rtol=1e-4, msg=f"{cfg} {h}x{w} {key}")


def test_shift_mask_matches_region_loop():
    """The mask equals a brute-force labelling of the 3x3 shifted regions (the official slice recipe)."""
    for hp, wp, ws, shift in [(14, 21, 7, 3), (7, 7, 7, 3), (12, 6, 3, 1)]:
        label = torch.zeros(hp, wp)
        cnt = 0
        for h0, h1 in [(0, hp - ws), (hp - ws, hp - shift), (hp - shift, hp)]:
            for w0, w1 in [(0, wp - ws), (wp - ws, wp - shift), (wp - shift, wp)]:
                label[h0:h1, w0:w1] = cnt
                cnt += 1
        windows = []
        for i in range(0, hp, ws):
            for j in range(0, wp, ws):
                windows.append(label[i : i + ws, j : j + ws].reshape(-1))
        expected = torch.stack([torch.where(v[:, None] == v[None, :], 0.0, -100.0) for v in windows])
        assert torch.equal(shifted_window_mask(hp, wp, ws, shift), expected)


def test_names_and_buffers_follow_the_official_layout():
    m = SwinBackbone(16, (2, 2, 2, 2), (1, 2, 2, 4), 7)
    keys = set(m.state_dict())
    for k in ["patch_embed.proj.weight", "patch_embed.norm.bias", "layers.0.blocks.1.norm1.weight",
              "layers.0.blocks.1.attn.qkv.weight", "layers.0.blocks.1.attn.proj.bias",
              "layers.0.blocks.1.attn.relative_position_bias_table", "layers.0.blocks.1.norm2.weight",
              "layers.0.blocks.1.mlp.fc1.weight", "layers.0.blocks.1.mlp.fc2.bias",
              "layers.2.downsample.reduction.weight", "layers.2.downsample.norm.weight", "norm3.weight"]:
        assert k in keys, k
    assert not any("relative_position_index" in k for k in keys)  # non-persistent
    assert "layers.3.downsample.reduction.weight" not in keys
    assert m.out_channels == {"res2": 16, "res3": 32, "res4": 64, "res5": 128}
    assert m.out_strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def test_every_parameter_gets_a_gradient():
    # No stochastic depth here: a dropped branch legitimately gets no gradient.
    m = SwinBackbone(16, (2, 2, 2, 2), (1, 2, 2, 4), 7, drop_path_rate=0.0).train()
    out = m(torch.randn(2, 3, 45, 61))
    sum(v.square().mean() for v in out.values()).backward()
    assert [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_param_counts_match_timm_swin():
    """Our backbone = timm's classification Swin - head (768/1024 x 1000 + 1000) - final norm + norm0..3."""
    timm = pytest.importorskip("timm")
    for name, timm_name, paper_total in [("swin_tiny", "swin_tiny_patch4_window7_224", 28.3e6),
                                         ("swin_small", "swin_small_patch4_window7_224", 49.6e6)]:
        with torch.device("meta"):  # shapes only: no time spent on initialisation
            ours = sum(p.numel() for p in build_swin_backbone(name).parameters())
            ref = timm.create_model(timm_name, pretrained=False)
            ref_total = sum(p.numel() for p in ref.parameters())
        c = ref.num_features
        stage_norms = 2 * sum(96 * 2**i for i in range(4))
        assert ours == ref_total - (c * 1000 + 1000) - 2 * c + stage_norms
        assert round(ref_total / 1e5) == round(paper_total / 1e5)  # the published 28.3M / 49.6M


def _official_classification_state(model: SwinBackbone) -> dict:
    """The layout of the official ImageNet release: no norm0..3, plus head, final norm, derived buffers."""
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("norm")}
    c = model.out_channels["res5"]
    sd.update({"norm.weight": torch.ones(c), "norm.bias": torch.zeros(c), "head.weight": torch.zeros(10, c),
               "head.bias": torch.zeros(10), "layers.0.blocks.1.attn_mask": torch.zeros(4, 49, 49),
               "layers.0.blocks.0.attn.relative_position_index": torch.zeros(49, 49, dtype=torch.long)})
    return sd


@pytest.fixture
def tiny_variant(monkeypatch):
    monkeypatch.setitem(swin.SWIN_VARIANTS, "swin_test", (16, (2, 2, 2, 2), (1, 2, 2, 4), 7))
    return "swin_test"


def test_pretrained_official_pth_loads(tmp_path, tiny_variant):
    src = SwinBackbone(16, (2, 2, 2, 2), (1, 2, 2, 4), 7)
    _randomize(src, seed=3)
    path = tmp_path / "swin_test_patch4_window7_224.pth"
    torch.save({"model": _official_classification_state(src)}, path)
    m = build_swin_backbone(tiny_variant, drop_path_rate=0.0, pretrained=str(path))
    for k, v in src.state_dict().items():
        if not k.startswith("norm"):
            assert torch.equal(m.state_dict()[k], v), k


def test_pretrained_d2_pkl_and_maskformer_checkpoint_load(tmp_path, tiny_variant):
    """The two other files users have: convert-pretrained-swin-model-to-d2 .pkl (numpy arrays) and a whole
    MaskFormer state dict (backbone.* next to the head)."""
    src = SwinBackbone(16, (2, 2, 2, 2), (1, 2, 2, 4), 7)
    _randomize(src, seed=5)
    arrays = {k: v.numpy() for k, v in _official_classification_state(src).items()}
    with open(tmp_path / "swin_test.pkl", "wb") as f:
        pickle.dump({"model": arrays, "__author__": "third_party", "matching_heuristics": True}, f)
    m = build_swin_backbone(tiny_variant, pretrained=str(tmp_path / "swin_test.pkl"))
    assert torch.equal(m.layers[2].blocks[1].attn.qkv.weight, src.layers[2].blocks[1].attn.qkv.weight)
    whole = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    whole["sem_seg_head.predictor.query_embed.weight"] = torch.zeros(3, 4)
    torch.save({"model": whole}, tmp_path / "maskformer.pth")
    m = build_swin_backbone(tiny_variant, pretrained=str(tmp_path / "maskformer.pth"))
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in m.state_dict().items())


def test_pretrained_strict_key_check(tmp_path, tiny_variant):
    src = SwinBackbone(16, (2, 2, 2, 2), (1, 2, 2, 4), 7)
    sd = _official_classification_state(src)
    extra = dict(sd, **{"layers.0.blocks.0.attn.surprise": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(UserError, match=r"unexpected.*layers\.0\.blocks\.0\.attn\.surprise"):
        build_swin_backbone(tiny_variant, pretrained=str(tmp_path / "extra.pth"))
    missing = {k: v for k, v in sd.items() if k != "layers.1.blocks.0.mlp.fc1.weight"}
    torch.save({"model": missing}, tmp_path / "missing.pth")
    with pytest.raises(UserError, match=r"missing.*layers\.1\.blocks\.0\.mlp\.fc1\.weight"):
        build_swin_backbone(tiny_variant, pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(UserError, match="not found"):
        build_swin_backbone(tiny_variant, pretrained=str(tmp_path / "nope.pth"))


def test_bias_table_for_another_window_is_resized():
    src = SwinBackbone(16, (2, 2, 2, 2), (1, 2, 2, 4), 7)
    sd = _official_classification_state(src)
    for k in sd:
        if k.endswith("relative_position_bias_table"):
            sd[k] = torch.full_like(sd[k], 0.5)
    m = SwinBackbone(16, (2, 2, 2, 2), (1, 2, 2, 4), 12)
    load_swin_weights(m, sd)
    table = m.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.shape == (23 * 23, 1)
    torch.testing.assert_close(table, torch.full_like(table, 0.5))


def test_unknown_name_is_a_user_error():
    with pytest.raises(UserError, match="swin_tiny"):
        build_swin_backbone("swin_huge")
