"""ResNet-50/101 and the DeepLab ResNet-101c, as MaskFormer's reference builds them with detectron2.

Bottleneck blocks put the stride in the 3x3 conv (torchvision style; the reference's STRIDE_IN_1X1=False).
ResNet-101c ("c" for the DeepLab variant) replaces the 7x7 stem with three 3x3 convs (64, 64, 128 channels)
and uses multi-grid dilations (1, 2, 4) in the three res5 blocks while keeping res5 at stride 32 (the
reference config sets RES5_MULTI_GRID [1, 2, 4] and leaves RES5_DILATION at 1).

Module names follow detectron2 (`stem.conv1`, `res2.0.conv1.norm`, `res2.0.shortcut`), so its .pkl weights
load by name; torchvision state dicts (`conv1`, `bn1`, `layer1.0.downsample.0`, ...) are renamed on load.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from maskformer_cli.errors import UserError
from maskformer_cli.models.imagenet_files import fetch_imagenet_file
from maskformer_cli.models.layers import (
    FEATURE_NAMES,
    FEATURE_STRIDES,
    ConvNorm,
    c2_msra_fill,
    freeze_module,
    get_norm,
)
from maskformer_cli.models.pickle_safe import load_pickle_restricted, load_torch_weights_only

# name -> (blocks per stage res2..res5, stem, res5 multi-grid, torchvision constructor or None)
RESNET_SPECS: dict[str, tuple[tuple[int, ...], str, tuple[int, ...], str | None]] = {
    "resnet50": ((3, 4, 6, 3), "basic", (1, 1, 1), "resnet50"),
    "resnet101": ((3, 4, 23, 3), "basic", (1, 1, 1), "resnet101"),
    "resnet101c": ((3, 4, 23, 3), "deeplab", (1, 2, 4), None),
}


class BasicStem(nn.Module):
    """7x7 conv (stride 2) + norm + ReLU, then 3x3 max-pool (stride 2): [B, 3, H, W] -> [B, 64, H/4, W/4]."""

    def __init__(self, norm: str, out_channels: int = 64) -> None:
        super().__init__()
        self.conv1 = ConvNorm(3, out_channels, 7, stride=2, padding=3, norm=get_norm(norm, out_channels), relu=True)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)


class DeepLabStem(nn.Module):
    """Three 3x3 convs (stride 2, 1, 1; C/2, C/2, C channels) each + norm + ReLU, then 3x3 max-pool."""

    def __init__(self, norm: str, out_channels: int = 128) -> None:
        super().__init__()
        half = out_channels // 2
        self.conv1 = ConvNorm(3, half, 3, stride=2, padding=1, norm=get_norm(norm, half), relu=True)
        self.conv2 = ConvNorm(half, half, 3, padding=1, norm=get_norm(norm, half), relu=True)
        self.conv3 = ConvNorm(half, out_channels, 3, padding=1, norm=get_norm(norm, out_channels), relu=True)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3(self.conv2(self.conv1(x)))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class Bottleneck(nn.Module):
    """1x1 (reduce) -> 3x3 (stride, dilation) -> 1x1 (expand), plus the identity or a projection shortcut."""

    def __init__(
        self, in_channels: int, bottleneck_channels: int, out_channels: int, stride: int, dilation: int, norm: str
    ) -> None:
        super().__init__()
        self.shortcut = (
            ConvNorm(in_channels, out_channels, 1, stride=stride, norm=get_norm(norm, out_channels))
            if in_channels != out_channels or stride != 1
            else None
        )
        self.conv1 = ConvNorm(in_channels, bottleneck_channels, 1, norm=get_norm(norm, bottleneck_channels), relu=True)
        self.conv2 = ConvNorm(
            bottleneck_channels, bottleneck_channels, 3, stride=stride, padding=dilation, dilation=dilation,
            norm=get_norm(norm, bottleneck_channels), relu=True,
        )
        self.conv3 = ConvNorm(bottleneck_channels, out_channels, 1, norm=get_norm(norm, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


class ResNet(nn.Module):
    """[B, 3, H, W] -> {"res2": [B, 256, H/4, W/4], "res3": 512 @ /8, "res4": 1024 @ /16, "res5": 2048 @ /32}
    (sizes rounded up for H, W not divisible by 32); output_stride 16 or 8 keeps res5 (and res4) at that
    stride with dilated 3x3 convolutions instead."""

    def __init__(
        self,
        blocks: tuple[int, ...] = (3, 4, 6, 3),
        stem: str = "basic",
        norm: str = "frozen_bn",
        res5_multi_grid: tuple[int, ...] = (1, 1, 1),
        output_stride: int = 32,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        self.stem = DeepLabStem(norm) if stem == "deeplab" else BasicStem(norm)
        in_channels, bottleneck, out_channels = self.stem.out_channels, 64, 256
        self.out_channels: dict[str, int] = {}
        self.out_strides = {k: min(v, output_stride) for k, v in FEATURE_STRIDES.items()}
        previous = 1
        for i, (name, n) in enumerate(zip(FEATURE_NAMES, blocks, strict=True)):
            # A stage past the output stride keeps the resolution and dilates instead (x2 per stride dropped);
            # its first block keeps the previous stage's dilation, as torchvision's and timm's dilated ResNets.
            dilate = FEATURE_STRIDES[name] // self.out_strides[name]
            first_stride = 1 if i == 0 or dilate > 1 else 2
            grid = res5_multi_grid if name == "res5" else (1,) * n
            if len(grid) != n:
                raise ValueError(f"res5 multi-grid {res5_multi_grid} needs one dilation per block ({n})")
            dilations = tuple(g * (previous if j == 0 else dilate) for j, g in enumerate(grid))
            previous = dilate
            stage = [
                Bottleneck(
                    in_channels if j == 0 else out_channels, bottleneck, out_channels,
                    first_stride if j == 0 else 1, dilations[j], norm,
                )
                for j in range(n)
            ]
            self.add_module(name, nn.Sequential(*stage))
            self.out_channels[name] = out_channels
            in_channels, bottleneck, out_channels = out_channels, bottleneck * 2, out_channels * 2
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                c2_msra_fill(m)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(x)
        out = {}
        for name in FEATURE_NAMES:
            x = getattr(self, name)(x)
            out[name] = x
        return out

    def freeze(self, freeze_at: int) -> ResNet:
        """detectron2's FREEZE_AT: 1 freezes the stem, 2 also res2, ..., 5 everything."""
        names = ["stem", *FEATURE_NAMES][: max(0, freeze_at)]
        for name in names:
            setattr(self, name, freeze_module(getattr(self, name)))
        return self


def build_resnet(name: str, pretrained: str | None = None, norm: str = "frozen_bn", freeze_at: int = 0,
                 output_stride: int = 32) -> ResNet:
    """ResNet by registry name, optionally with weights ('imagenet' or a local torchvision/detectron2 file)."""
    blocks, stem, multi_grid, _ = RESNET_SPECS[name]
    model = ResNet(blocks, stem, norm, multi_grid, output_stride)
    if pretrained:
        state = imagenet_state_dict(name) if pretrained == "imagenet" else read_state_dict(Path(pretrained))
        load_resnet_weights(model, state, source=str(pretrained))
    return model.freeze(freeze_at)


# ------------------------------------------------------------------------------------------- weights


def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """ImageNet weights of the reference: torchvision's V1 ResNets (torchvision checks their sha256 prefix),
    detectron2's DeepLab R-103.pkl for 101c (verified by `fetch_imagenet_file`). UserError when offline."""
    tv_name = RESNET_SPECS[name][3]
    if tv_name is None:
        return read_state_dict(fetch_imagenet_file(name))
    try:
        import torchvision

        return getattr(torchvision.models, tv_name)(weights="IMAGENET1K_V1").state_dict()
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise UserError(
            f"could not download ImageNet weights for {name} (offline?): {e}. "
            f"Download them elsewhere and pass the file: model.pretrained=/path/to/weights"
        ) from None


log = logging.getLogger(__name__)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .pth/.pt (torch), .safetensors or detectron2 .pkl file, unwrapping {"model": ...}."""
    if not path.is_file():
        raise UserError(f"backbone weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif path.suffix == ".pkl":
            state = load_pickle_restricted(path)  # a .pkl from the internet must not run code
        else:
            state = load_torch_weights_only(path, what="backbone weights")
    except UserError:
        raise
    except Exception as e:  # any unreadable file is the user's to fix
        raise UserError(f"cannot read backbone weights {path}: {e}") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state dict, got {type(state).__name__}")
    out = {}
    for k, v in state.items():
        if hasattr(v, "shape") and not isinstance(v, torch.Tensor):
            v = torch.as_tensor(v)  # numpy arrays in detectron2 pickles
        if isinstance(v, torch.Tensor):
            out[k] = v
    return out


_TV_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.(.+)$")


def torchvision_to_ours(key: str) -> str | None:
    """Rename one torchvision ResNet key to this module's (detectron2) layout; None for keys we drop (fc)."""
    if key.startswith("fc."):
        return None
    if key.startswith("conv1."):
        return "stem." + key
    if key.startswith("bn1."):
        return "stem.conv1.norm." + key[len("bn1.") :]
    m = _TV_BLOCK.match(key)
    if m is None:
        return key
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    rest = re.sub(r"^downsample\.0\.", "shortcut.", rest)
    rest = re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)
    return f"res{stage}.{block}.{rest}"


# The ImageNet classifier an ImageNet checkpoint carries: torchvision's `fc.*`, which detectron2's
# conversion script (convert-torchvision-to-d2.py) renames `stem.fc.*` in R-50.pkl / R-101.pkl / R-103.pkl.
_CLASSIFIER = re.compile(r"^(stem\.)?fc\.(weight|bias)$")


def load_resnet_weights(model: ResNet, state: dict[str, torch.Tensor], source: str = "weights") -> None:
    """Load torchvision-, detectron2- or our-format ResNet weights; a UserError lists missing/unexpected keys.

    The ImageNet classifier (`fc.*`, `stem.fc.*`) is dropped and reported at INFO level; every other key
    must match exactly."""
    state = {k.removeprefix("backbone."): v for k, v in state.items()}
    if any(k.startswith(("layer1.", "bn1.")) for k in state):
        state = {new: v for k, v in state.items() if (new := torchvision_to_ours(k)) is not None}
    own = model.state_dict()
    classifier = sorted(k for k in state if k not in own and _CLASSIFIER.match(k))
    if classifier:
        log.info("%s: ignoring the ImageNet classifier the backbone does not use: %s", source, ", ".join(classifier))
        state = {k: v for k, v in state.items() if k not in classifier}
    # Counters are not weights; FrozenBatchNorm2d has none and BatchNorm2d restarts from 0.
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked") or k in own}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    bad_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                 if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or bad_shape:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8})" if len(keys) > 8 else "")

        parts = [f"{label} {len(keys)}: {show(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", bad_shape)) if keys]
        raise UserError(f"{source} does not fit this ResNet: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)
