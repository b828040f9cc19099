"""Layers shared by the backbones, the pixel decoders and the heads (as timm's `layers/`): the feature levels
every backbone gives, the norm factory, conv + norm, detectron2's weight initialisations and freezing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d as _TorchvisionFrozenBN

from maskformer_cli.errors import UserError

# ImageNet statistics on the 0-255 scale (the reference's PIXEL_MEAN / PIXEL_STD, RGB order).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
FEATURE_NAMES = ("res2", "res3", "res4", "res5")
FEATURE_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
NORMS = ("frozen_bn", "bn", "sync_bn", "gn", "none")


class FrozenBatchNorm2d(_TorchvisionFrozenBN):
    """BatchNorm with fixed statistics and affine parameters (buffers, not parameters), as detectron2's.

    torchvision's forward builds a scale and a shift, then multiplies and adds: two passes over the
    activation, and under bf16 autocast its float32 buffers promote the activation back to float32. Here
    the forward is one inference-mode batch_norm kernel: the same function (values equal up to float
    rounding), 2x faster in float32 and 3x in bf16 (which it keeps) on a CPU; gradients still flow to
    the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                            momentum=0.0, eps=self.eps)


def get_norm(kind: str, channels: int) -> nn.Module | None:
    """A 2-D normalisation layer: 'frozen_bn' (ImageNet statistics, no parameters, as the reference
    backbones), 'bn', 'sync_bn', 'gn' (GroupNorm with 32 groups, as the reference pixel decoder) or 'none'."""
    if kind == "frozen_bn":
        return FrozenBatchNorm2d(channels)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "sync_bn":
        # Outside torch.distributed (or in eval) SyncBatchNorm behaves as plain BatchNorm.
        return nn.SyncBatchNorm(channels)
    if kind == "gn":
        return nn.GroupNorm(32, channels)
    if kind == "none":
        return None
    raise UserError(f"unknown norm '{kind}'; choose one of {', '.join(NORMS)}")


class ConvNorm(nn.Conv2d):
    """Conv2d followed by an optional norm (stored as `.norm`) and ReLU.

    Keeping the norm inside the conv gives detectron2's key layout (`conv1.weight`, `conv1.norm.weight`), so
    released weights map onto these modules by name.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        bias: bool = False,
        norm: nn.Module | None = None,
        relu: bool = False,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=bias
        )
        self.norm = norm
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        return F.relu(x) if self.relu else x


def c2_xavier_fill(module: nn.Conv2d | nn.Linear) -> None:
    """Caffe2's XavierFill as detectron2 uses it: kaiming-uniform with a=1 (fan_in), zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def c2_msra_fill(module: nn.Conv2d | nn.Linear) -> None:
    """Caffe2's MSRAFill: kaiming-normal (fan_out, ReLU gain), zero bias."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def freeze_module(module: nn.Module) -> nn.Module:
    """Stop gradients into `module` and turn its BatchNorms into FrozenBatchNorm2d (their statistics must not
    drift either), as detectron2's `freeze_at`. Returns the (possibly replaced) module."""
    for p in module.parameters():
        p.requires_grad_(False)
    if isinstance(module, nn.BatchNorm2d | nn.SyncBatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        if module.affine:
            frozen.weight.copy_(module.weight.detach())
            frozen.bias.copy_(module.bias.detach())
        frozen.running_mean.copy_(module.running_mean)
        frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = freeze_module(child)
        if new is not child:
            setattr(module, name, new)
    return module
