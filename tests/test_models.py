"""The network: shapes, gradients, batching, parameter counts, FLOPs, and numerics against independent
references (torchvision's ResNet, torch's transformer layers, transformers' MaskFormer)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from maskformer_cli.config import ModelConfig
from maskformer_cli.errors import UserError
from maskformer_cli.models import PIXEL_MEAN, PIXEL_STD, build_model, normalize
from maskformer_cli.models.backbone import build_backbone
from maskformer_cli.models.flops import count_flops
from maskformer_cli.models.pixel_decoder import FPNPixelDecoder, TransformerEncoderPixelDecoder
from maskformer_cli.models.position_encoding import PositionEmbeddingSine
from maskformer_cli.models.transformer import DecoderLayer, EncoderLayer
from maskformer_cli.structures import MaskFormerOutput, PerPixelOutput

# timm's tiny test network (80k parameters) keeps these tests fast; older timm lacks it.
TIMM_TINY = "test_efficientnet" if importlib.util.find_spec("timm") and __import__("timm").is_model(
    "test_efficientnet") else "resnet18"
TINY = dict(
    backbone=f"timm:{TIMM_TINY}", hidden_dim=32, conv_dim=32, mask_dim=32, nheads=4, dim_feedforward=64,
    num_queries=10, dec_layers=2, encoder_layers=2,
)
K = 5


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


def randomize_norms(model: nn.Module) -> None:
    """Give BatchNorms non-trivial statistics so that weight mapping errors cannot hide behind identity norms."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)


def all_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, PerPixelOutput):
        return [out.sem_seg_logits]
    ts = [out.pred_logits, out.pred_masks] + ([out.pred_boxes] if out.pred_boxes is not None else [])
    for aux in out.aux_outputs:
        ts += all_outputs(aux)
    return ts


# ------------------------------------------------------------------------------------------- backbones


@pytest.mark.parametrize("name", ["resnet50", "resnet101c", f"timm:{TIMM_TINY}"])
def test_backbone_features_at_strides_4_to_32_for_odd_sizes(name):
    bb = build_backbone(name).eval()
    assert set(bb.out_strides.items()) == {("res2", 4), ("res3", 8), ("res4", 16), ("res5", 32)}
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, 67, 93))
    assert list(feats) == ["res2", "res3", "res4", "res5"]
    for k, f in feats.items():
        s = bb.out_strides[k]
        assert f.shape == (1, bb.out_channels[k], math.ceil(67 / s), math.ceil(93 / s)), k


@pytest.mark.parametrize("output_stride, dilate", [(32, None), (16, [False, False, True]), (8, [False, True, True])])
def test_resnet_with_torchvision_weights_matches_torchvision(tmp_path, output_stride, dilate):
    """Our ResNet-50 with torchvision's weights is torchvision's network; with model.output_stride 16 or 8 it is
    torchvision's replace_stride_with_dilation network (res4/res5 at the finer stride, same weights)."""
    import torchvision

    tv = torchvision.models.resnet50(replace_stride_with_dilation=dilate)
    randomize_norms(tv)
    tv.eval()
    path = tmp_path / "r50.pth"
    torch.save(tv.state_dict(), path)
    ours = build_backbone("resnet50", pretrained=str(path), norm="frozen_bn", output_stride=output_stride).eval()
    assert ours.out_strides == {"res2": 4, "res3": 8, "res4": min(16, output_stride), "res5": output_stride}
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = ours(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for i, name in enumerate(["res2", "res3", "res4", "res5"]):
            y = getattr(tv, f"layer{i + 1}")(y)
            assert feats[name].shape[-2:] == (64 // ours.out_strides[name], 96 // ours.out_strides[name])
            # activations grow to ~1e3 through random blocks: compare relative to their scale
            torch.testing.assert_close(feats[name], y, atol=1e-5 * y.abs().max().item(), rtol=1e-5)


def test_timm_output_stride_is_timms_dilated_network():
    import timm

    for output_stride in (16, 8):
        bb = build_backbone("timm:resnet18", output_stride=output_stride).eval()
        ref = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3, 4), output_stride=output_stride)
        ref.load_state_dict(bb.body.state_dict())
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            ours, theirs = bb(x), ref.eval()(x)
        assert ours["res5"].shape[-1] == 64 // output_stride == 64 // bb.out_strides["res5"]
        for a, b in zip(ours.values(), theirs, strict=True):
            torch.testing.assert_close(a, b)
    with pytest.raises(UserError, match="output_stride"):
        build_backbone("swin_tiny", output_stride=16)


def test_resnet_weights_that_do_not_fit_name_the_keys(tmp_path):
    import torchvision

    state = torchvision.models.resnet50().state_dict()
    del state["layer2.0.conv1.weight"]
    state["layer9.extra"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"missing 1: res3\.0\.conv1\.weight.*unexpected 1: layer9\.extra"):
        build_backbone("resnet50", pretrained=str(path))
    with pytest.raises(UserError, match="not found"):
        build_backbone("resnet50", pretrained=str(tmp_path / "nope.pth"))


def test_detectron2_converted_pkl_with_its_imagenet_classifier_loads(tmp_path, caplog):
    """detectron2's torchvision R-50.pkl / R-103.pkl keep the classifier as stem.fc.*: dropped and reported;
    anything else unexpected is still refused."""
    import logging
    import pickle

    import torchvision

    from maskformer_cli.models.resnet import torchvision_to_ours

    tv = torchvision.models.resnet50()
    randomize_norms(tv)
    state = {}
    for k, v in tv.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        new = "stem." + k if k.startswith("fc.") else torchvision_to_ours(k)  # as convert-torchvision-to-d2.py
        state[new] = v.numpy()
    assert {"stem.fc.weight", "stem.fc.bias"} <= set(state)
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "torchvision", "matching_heuristics": True}, f)
    with caplog.at_level(logging.INFO, logger="maskformer_cli.models.resnet"):
        ours = build_backbone("resnet50", pretrained=str(path)).eval()
    assert "stem.fc.bias, stem.fc.weight" in caplog.text
    torch.testing.assert_close(ours.state_dict()["stem.conv1.weight"], tv.conv1.weight)
    state["stem.extra.weight"] = np.zeros(3, np.float32)
    with open(path, "wb") as f:
        pickle.dump({"model": state}, f)
    with pytest.raises(UserError, match=r"unexpected 1: stem\.extra\.weight"):
        build_backbone("resnet50", pretrained=str(path))


def test_freeze_at_freezes_stem_and_res2_and_their_batchnorms():
    from torchvision.ops import FrozenBatchNorm2d

    bb = build_backbone("resnet50", norm="bn", freeze_at=2)
    assert all(not p.requires_grad for n, p in bb.named_parameters() if n.startswith(("stem.", "res2.")))
    assert all(p.requires_grad for n, p in bb.named_parameters() if n.startswith("res3."))
    assert isinstance(bb.stem.conv1.norm, FrozenBatchNorm2d) and isinstance(bb.res3[0].conv1.norm, nn.BatchNorm2d)
    # frozen_bn (the default) has no norm parameters at all
    default = build_backbone("resnet50")
    assert not any(".norm." in n for n, _ in default.named_parameters())


def test_resnet101c_has_the_deeplab_stem_and_multigrid_res5():
    bb = build_backbone("resnet101c")
    stem = [bb.stem.conv1, bb.stem.conv2, bb.stem.conv3]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in stem] == [
        (3, 64, (3, 3), (2, 2)), (64, 64, (3, 3), (1, 1)), (64, 128, (3, 3), (1, 1))]
    assert [blk.conv2.dilation for blk in bb.res5] == [(1, 1), (2, 2), (4, 4)]
    assert bb.res5[0].conv2.stride == (2, 2) and bb.res5[0].conv1.stride == (1, 1)  # stride in the 3x3
    assert [len(getattr(bb, f"res{i}")) for i in range(2, 6)] == [3, 4, 23, 3]


def test_timm_backbone_loads_a_local_weights_file(tmp_path):
    import timm

    ref = timm.create_model(TIMM_TINY)
    path = tmp_path / "tiny.pth"
    torch.save(ref.state_dict(), path)
    bb = build_backbone(f"timm:{TIMM_TINY}", pretrained=str(path))
    ours = bb.body.state_dict()
    shared = [k for k in ours if k in ref.state_dict()]
    assert len(shared) > 10
    for k in shared:
        torch.testing.assert_close(ours[k], ref.state_dict()[k])


def test_unknown_backbones_are_user_errors():
    with pytest.raises(UserError, match="unknown backbone"):
        build_backbone("resnet51")
    with pytest.raises(UserError, match="unknown timm model"):
        build_backbone("timm:not_a_model")


# ------------------------------------------------------------------------------- transformer pieces


def test_position_encoding_matches_transformers():
    from transformers.models.maskformer.modeling_maskformer import MaskFormerSinePositionEmbedding

    x = torch.randn(2, 32, 5, 7)
    ref = MaskFormerSinePositionEmbedding(num_position_features=16, normalize=True)(x.shape, x.device, x.dtype)
    torch.testing.assert_close(PositionEmbeddingSine(16, normalize=True)(x), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_layers_without_positions_match_torch_transformer_layers(pre_norm):
    d, h, f = 32, 4, 64
    enc = EncoderLayer(d, h, f, dropout=0.0, pre_norm=pre_norm).eval()
    ref = nn.TransformerEncoderLayer(d, h, f, dropout=0.0, batch_first=True, norm_first=pre_norm).eval()
    names = {"self_attn_norm": "norm1", "ffn_norm": "norm2"}
    ref.load_state_dict({re.sub(r"^(\w+_norm)", lambda m: names[m[1]], k): v for k, v in enc.state_dict().items()})
    src = torch.randn(2, 9, d)
    torch.testing.assert_close(enc(src), ref(src), atol=1e-5, rtol=1e-5)

    dec = DecoderLayer(d, h, f, dropout=0.0, pre_norm=pre_norm).eval()
    ref = nn.TransformerDecoderLayer(d, h, f, dropout=0.0, batch_first=True, norm_first=pre_norm).eval()
    names = {"self_attn_norm": "norm1", "cross_attn_norm": "norm2", "ffn_norm": "norm3", "cross_attn": "multihead_attn"}
    ref.load_state_dict(
        {re.sub(r"^(\w+_norm|cross_attn)", lambda m: names[m[1]], k): v for k, v in dec.state_dict().items()}
    )
    tgt, memory = torch.randn(2, 6, d), torch.randn(2, 9, d)
    torch.testing.assert_close(dec(tgt, memory), ref(tgt, memory), atol=1e-5, rtol=1e-5)


def _hf_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename transformers' MaskFormer (ResNet backbone) keys to ours; a test-local map, independent of
    convert.py, so this test checks the network and not the converter."""
    stage = r"pixel_level_module\.encoder\.encoder\.stages\.(\d)\.layers\.(\d+)\."
    rules = [
        (r"pixel_level_module\.encoder\.embedder\.embedder\.convolution\.", "backbone.stem.conv1."),
        (r"pixel_level_module\.encoder\.embedder\.embedder\.normalization\.", "backbone.stem.conv1.norm."),
        (stage + r"shortcut\.convolution\.", lambda m: f"backbone.res{int(m[1]) + 2}.{m[2]}.shortcut."),
        (stage + r"shortcut\.normalization\.", lambda m: f"backbone.res{int(m[1]) + 2}.{m[2]}.shortcut.norm."),
        (stage + r"layer\.(\d)\.convolution\.", lambda m: f"backbone.res{int(m[1]) + 2}.{m[2]}.conv{int(m[3]) + 1}."),
        (stage + r"layer\.(\d)\.normalization\.",
         lambda m: f"backbone.res{int(m[1]) + 2}.{m[2]}.conv{int(m[3]) + 1}.norm."),
        (r"pixel_level_module\.decoder\.fpn\.stem\.0\.", "pixel_decoder.output_convs.res5."),
        (r"pixel_level_module\.decoder\.fpn\.stem\.1\.", "pixel_decoder.output_convs.res5.norm."),
        # fpn.layers run from res4 (index 0) down to res2
        (r"pixel_level_module\.decoder\.fpn\.layers\.(\d)\.proj\.0\.",
         lambda m: f"pixel_decoder.lateral_convs.res{4 - int(m[1])}."),
        (r"pixel_level_module\.decoder\.fpn\.layers\.(\d)\.proj\.1\.",
         lambda m: f"pixel_decoder.lateral_convs.res{4 - int(m[1])}.norm."),
        (r"pixel_level_module\.decoder\.fpn\.layers\.(\d)\.block\.0\.",
         lambda m: f"pixel_decoder.output_convs.res{4 - int(m[1])}."),
        (r"pixel_level_module\.decoder\.fpn\.layers\.(\d)\.block\.1\.",
         lambda m: f"pixel_decoder.output_convs.res{4 - int(m[1])}.norm."),
        (r"pixel_level_module\.decoder\.mask_projection\.", "pixel_decoder.mask_features."),
        (r"transformer_module\.queries_embedder\.", "query_pos."),
        (r"transformer_module\.input_projection\.", "input_proj."),
        (r"transformer_module\.decoder\.layernorm\.", "decoder.norm."),
        (r"transformer_module\.decoder\.layers\.", "decoder.layers."),
        (r"\.encoder_attn_layer_norm\.", ".cross_attn_norm."),
        (r"\.self_attn_layer_norm\.", ".self_attn_norm."),
        (r"\.final_layer_norm\.", ".ffn_norm."),
        (r"\.encoder_attn\.", ".cross_attn."),
        (r"\.mlp\.fc1\.", ".linear1."),
        (r"\.mlp\.fc2\.", ".linear2."),
        (r"\.o_proj\.", ".out_proj."),
        (r"^class_predictor\.", "class_embed."),
        (r"^mask_embedder\.(\d)\.0\.", lambda m: f"mask_embed.layers.{m[1]}."),
    ]
    out, qkv = {}, {}
    for k, v in state.items():
        if k.startswith("criterion") or k.endswith("num_batches_tracked"):
            continue
        k = k.removeprefix("model.")
        for pat, rep in rules:
            k = re.sub(pat, rep, k)
        m = re.fullmatch(r"(.*)\.([qkv])_proj\.(weight|bias)", k)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = v
        else:
            out[k] = v
    for (prefix, kind), d in qkv.items():
        out[f"{prefix}.in_proj_{kind}"] = torch.cat([d["q"], d["k"], d["v"]])  # nn.MultiheadAttention order
    return out


def test_maskformer_matches_transformers_with_the_same_weights():
    from transformers import MaskFormerConfig, MaskFormerForInstanceSegmentation, ResNetConfig

    backbone_cfg = ResNetConfig(
        depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck",
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    decoder_cfg = dict(model_type="detr", d_model=32, decoder_layers=2, decoder_attention_heads=4,
                       encoder_attention_heads=4, decoder_ffn_dim=64, num_queries=10)
    hf = MaskFormerForInstanceSegmentation(MaskFormerConfig(
        backbone_config=backbone_cfg, decoder_config=decoder_cfg, fpn_feature_size=32, mask_feature_size=32,
        num_labels=K,
    ))
    randomize_norms(hf)
    hf.eval()
    ours = build_model(tiny(backbone="resnet50"), K).eval()
    missing, unexpected = ours.load_state_dict(_hf_to_ours(hf.state_dict()), strict=False)
    assert not missing and not unexpected
    x = torch.randn(2, 3, 67, 93)  # odd size: exercises the nearest upsampling to the lateral's size
    with torch.no_grad():
        ref = hf(pixel_values=x)
        out = ours(x)
    torch.testing.assert_close(out.pred_logits, ref.class_queries_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.pred_masks, ref.masks_queries_logits, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------- the models


VARIANTS = {
    "maskformer": {},
    "one_decoder_layer": {"dec_layers": 1},
    "no_self_attention": {"dec_self_attn": False},
    "box_head": {"box_head": True},
    "transformer_encoder_pixel_decoder": {"pixel_decoder": "transformer_encoder_fpn"},
    "no_deep_supervision": {"deep_supervision": False},
    "pre_norm_input_project": {"pre_norm": True, "enforce_input_project": True},
    "per_pixel_baseline": {"meta_architecture": "per_pixel_baseline"},
    "per_pixel_baseline_plus": {"meta_architecture": "per_pixel_baseline_plus", "num_queries": K},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_output_shapes(variant):
    cfg = tiny(**VARIANTS[variant])
    model = build_model(cfg, K).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 67, 93))
    hw = (math.ceil(67 / 4), math.ceil(93 / 4))
    if cfg.meta_architecture != "maskformer":
        assert isinstance(out, PerPixelOutput)
        assert out.sem_seg_logits.shape == (2, K, *hw)
        return
    assert isinstance(out, MaskFormerOutput)
    assert out.pred_logits.shape == (2, cfg.num_queries, K + 1)
    assert out.pred_masks.shape == (2, cfg.num_queries, *hw)
    assert len(out.aux_outputs) == (cfg.dec_layers - 1 if cfg.deep_supervision else 0)
    for aux in out.aux_outputs:
        assert aux.pred_logits.shape == out.pred_logits.shape and aux.pred_masks.shape == out.pred_masks.shape
        assert not aux.aux_outputs
    if cfg.box_head:
        assert out.pred_boxes.shape == (2, cfg.num_queries, 4)
        assert ((out.pred_boxes >= 0) & (out.pred_boxes <= 1)).all()
        assert all(a.pred_boxes is not None for a in out.aux_outputs)
    else:
        assert out.pred_boxes is None


def test_deep_supervision_gives_one_aux_output_per_earlier_layer():
    model = build_model(tiny(dec_layers=3), K).train()
    out = model(torch.randn(1, 3, 64, 64))
    assert len(out.aux_outputs) == 2
    # each layer predicts differently: the aux outputs are not copies of the final one
    assert not torch.allclose(out.aux_outputs[-1].pred_masks, out.pred_masks)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_parameter_gets_a_gradient(variant):
    model = build_model(tiny(**VARIANTS[variant]), K).train()
    with torch.no_grad():  # biases as after some training (they start at zero, which hides connections)
        for n, p in model.named_parameters():
            if n.endswith("bias") and not n.startswith("backbone."):
                p.normal_(0, 0.1)
    out = model(torch.randn(2, 3, 64, 64))
    # random weights so that no output's sum is invariant (e.g. under a norm)
    loss = sum((t * torch.randn_like(t)).sum() for t in all_outputs(out))
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad
    # and a non-zero one in our modules. Two exceptions are real properties, not bugs: timm zero-initialises
    # the last BN of each residual branch (zero gradients inside those branches at init); the first decoder
    # layer's self-attention sees all-zero queries (DETR starts them at zero), so its values are the same
    # bias for every query and its q/k/v projection weights cannot matter (nor, with pre-norm, the weight of
    # the LayerNorm that normalises those zeros).
    exempt = ("backbone.", "decoder.layers.0.self_attn.in_proj_weight")
    if VARIANTS[variant].get("pre_norm"):
        exempt += ("decoder.layers.0.self_attn_norm.weight",)
    zero = [n for n, p in model.named_parameters()
            if p.requires_grad and not n.startswith(exempt) and not p.grad.abs().sum() > 0]
    assert not zero, zero


def test_resnet50_maskformer_trains_every_parameter_with_frozen_bn():
    model = build_model(tiny(backbone="resnet50", dec_self_attn=False), K).train()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    out = model(torch.randn(1, 3, 64, 64))
    sum((t * torch.randn_like(t)).sum() for t in all_outputs(out)).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("variant", ["maskformer", "transformer_encoder_pixel_decoder", "per_pixel_baseline_plus"])
def test_batch_of_two_equals_two_batches_of_one(variant):
    model = build_model(tiny(**VARIANTS[variant]), K).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        both = all_outputs(model(x))
        one = [all_outputs(model(x[i : i + 1])) for i in range(2)]
    for j, t in enumerate(both):
        torch.testing.assert_close(t, torch.cat([one[0][j], one[1][j]]), atol=1e-5, rtol=1e-5)


def test_pixel_decoders_contract():
    in_channels = {"res2": 16, "res3": 24, "res4": 40, "res5": 64}
    feats = {k: torch.randn(2, c, math.ceil(67 / s), math.ceil(93 / s))
             for (k, c), s in zip(in_channels.items(), (4, 8, 16, 32), strict=True)}
    fpn = FPNPixelDecoder(in_channels, conv_dim=32, mask_dim=48, mask_feature_kernel=1)
    mask_features, transformer_input = fpn(feats)
    assert mask_features.shape == (2, 48, 17, 24)
    assert transformer_input is feats["res5"]
    assert fpn.mask_features.kernel_size == (1, 1)
    assert not hasattr(fpn.lateral_convs, "res5")
    # convs followed by GroupNorm carry no bias; GN has 32 groups
    assert all(m.bias is None and m.norm.num_groups == 32 for m in fpn.output_convs.values())
    enc = TransformerEncoderPixelDecoder(in_channels, conv_dim=32, mask_dim=48, nheads=4, dim_feedforward=64,
                                         enc_layers=2)
    mask_features, transformer_input = enc(feats)
    assert mask_features.shape == (2, 48, 17, 24)
    assert transformer_input.shape == (2, 32, 3, 3)
    # the 3x3 conv on res5 reads the encoder output: the encoder output is what the decoder receives
    assert enc.output_convs["res5"].in_channels == 32


def test_input_projection_only_when_needed():
    assert isinstance(build_model(tiny(pixel_decoder="transformer_encoder_fpn"), K).input_proj, nn.Identity)
    assert isinstance(build_model(tiny(pixel_decoder="transformer_encoder_fpn", enforce_input_project=True), K)
                      .input_proj, nn.Conv2d)
    assert isinstance(build_model(tiny(), K).input_proj, nn.Conv2d)  # res5 channels != hidden_dim


def test_normalize_uses_imagenet_statistics_on_the_0_255_scale():
    img = torch.tensor(PIXEL_MEAN).round().to(torch.uint8).view(3, 1, 1).expand(3, 4, 5)
    x = normalize(img)
    expected = (torch.tensor(PIXEL_MEAN).round() - torch.tensor(PIXEL_MEAN)) / torch.tensor(PIXEL_STD)
    torch.testing.assert_close(x[:, 2, 3], expected)
    assert normalize(torch.zeros(2, 3, 4, 4)).shape == (2, 3, 4, 4)


# ------------------------------------------------------------------------------------ size and cost


PAPER_PARAMS = {  # paper Table 1, ADE20K-150 (M)
    "maskformer_r50": ({}, 41),
    "maskformer_r101": ({"backbone": "resnet101"}, 60),
    "per_pixel_baseline_r50": ({"meta_architecture": "per_pixel_baseline"}, 31),
    "per_pixel_baseline_plus_r50": ({"meta_architecture": "per_pixel_baseline_plus", "num_queries": 150}, 41),
    "maskformer_swin_tiny": ({"backbone": "swin_tiny"}, 42),
    "maskformer_swin_small": ({"backbone": "swin_small"}, 63),
}


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_parameter_counts_match_the_paper(name):
    kw, paper = PAPER_PARAMS[name]
    if kw.get("backbone", "").startswith("swin") and importlib.util.find_spec("maskformer_cli.models.swin") is None:
        pytest.skip("Swin backbone not available yet")
    model = build_model(ModelConfig(**kw), 150)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - paper) / paper < 0.02, f"{name}: {n:.2f}M vs paper {paper}M"


def test_flop_count_is_multiply_adds_of_a_conv():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    # brute force: one multiply-add per kernel tap per output element
    assert count_flops(conv, torch.zeros(1, 3, 10, 12)) == 8 * 3 * 3 * 3 * 10 * 12


def test_flops_double_with_image_area():
    model = build_model(tiny(), K)
    small = count_flops(model, torch.zeros(1, 3, 64, 64))
    large = count_flops(model, torch.zeros(1, 3, 64, 128))
    assert small > 0
    assert 1.8 < large / small < 2.2
    assert model.training  # restored


# --------------------------------------------------------------------------------------------- info


def test_info_command_prints_parameters_and_flops():
    from typer.testing import CliRunner

    from maskformer_cli.cli import app

    overrides = [f"model.{k}={v}" for k, v in TINY.items() if k != "encoder_layers"]  # fpn: no encoder
    r = CliRunner().invoke(app, ["info", *overrides, "--num-classes", "7", "--size", "64x96"])
    assert r.exit_code == 0, r.output
    assert "total" in r.output and "FLOPs" in r.output and "K=7" in r.output


def test_run_info_numbers_and_class_count(tmp_path):
    from maskformer_cli.commands.info import run_info

    recipe = tmp_path / "r.yaml"
    model = {k: v for k, v in TINY.items() if k != "encoder_layers"}  # the fpn decoder has no encoder
    import yaml

    recipe.write_text(yaml.safe_dump({"model": model, "data": {"dataset": "synthetic", "synthetic_num_classes": 7}}))
    info = run_info(recipe, [], num_classes=None, size="64", count_flops=False)
    assert info["num_classes"] == 7 and info["flops"] is None and info["size"] == (64, 64)
    ref = build_model(dataclasses.replace(tiny()), 7)
    assert info["total_params"] == sum(p.numel() for p in ref.parameters()) == sum(info["params"].values())
    info = run_info(recipe, ["data.dataset=not_a_dataset"], num_classes=None, size="64x64", count_flops=False)
    assert info["num_classes"] == 150
    with pytest.raises(UserError, match="--size"):
        run_info(recipe, [], size="64y", count_flops=False)
