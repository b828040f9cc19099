"""Swin Transformer backbone (Liu et al. 2021) as MaskFormer uses it: four stages -> res2..res5.

This follows the segmentation variant of Swin (the one behind MaskFormer's D2SwinTransformer), not the
classification one: it takes any input size. The image is padded on the right/bottom to a multiple of the
patch size; every block pads its token grid to a multiple of the window, builds the shifted-window mask
for that padded grid, and crops back; patch merging pads odd grids by one. Stage i therefore outputs
ceil(H / 2^(i+2)) x ceil(W / 2^(i+2)) tokens, each normalised by its own LayerNorm (`norm{i}`).

Parameter names are those of the official Swin / D2SwinTransformer, so released weights load 1:1 (inside
MaskFormer they sit under `backbone.`). With C_i = embed_dim * 2^i, w the window and h_i the heads:

  patch_embed.proj.{weight [C_0, 3, 4, 4], bias}, patch_embed.norm.{weight, bias}
  layers.{i}.blocks.{j}.norm1.*, .attn.qkv.{weight [3C_i, C_i] (q, k, v stacked), bias},
      .attn.proj.*, .attn.relative_position_bias_table [(2w-1)^2, h_i], .norm2.*, .mlp.fc1.*, .mlp.fc2.*
  layers.{i}.downsample.reduction.weight [2C_i, 4C_i] (no bias), layers.{i}.downsample.norm.* [4C_i]  (i < 3)
  norm{i}.{weight, bias} [C_i]  the LayerNorm on stage i's output (res{i+2})

The relative position index is a non-persistent buffer: it is derived from the window size, not learned.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from maskformer_cli.errors import UserError
from maskformer_cli.models.imagenet_files import fetch_imagenet_file

log = logging.getLogger(__name__)

# name -> (embed_dim, depths, num_heads, default window). Base and large use window 12 in the paper
# (ImageNet-22K, 384x384 pre-training); tiny and small use window 7 (ImageNet-1K, 224x224).
SWIN_VARIANTS: dict[str, tuple[int, tuple[int, ...], tuple[int, ...], int]] = {
    "swin_tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7),
    "swin_small": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7),
    "swin_base": (128, (2, 2, 18, 2), (4, 8, 16, 32), 12),
    "swin_large": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12),
}

# The value the reference puts on attention logits between tokens of different shifted regions.
_MASK_VALUE = -100.0


def _windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """x: [B, Hp, Wp, C] with Hp, Wp multiples of `window` -> [B * nW, window * window, C], row-major windows."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(2, 3)
    return x.reshape(-1, window * window, c)


def _unwindow(x: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `_windows`: [B * nW, window * window, C] -> [B, h, w, C]."""
    c = x.shape[-1]
    x = x.reshape(-1, h // window, w // window, window, window, c).transpose(2, 3)
    return x.reshape(-1, h, w, c)


def shifted_window_mask(hp: int, wp: int, window: int, shift: int, device=None) -> torch.Tensor:
    """Additive attention mask for shifted windows on a padded [hp, wp] grid: [nW, window^2, window^2].

    After the cyclic roll by -shift, the last `window` rows/columns hold tokens from up to three different
    regions along each axis (body, the strip that stays, the strip that wrapped around). Tokens of a window
    may attend only to tokens of the same region pair; others get `_MASK_VALUE`.
    """

    def regions(n: int) -> torch.Tensor:
        i = torch.arange(n, device=device)
        return (i >= n - window).long() + (i >= n - shift).long()

    label = regions(hp)[:, None] * 3 + regions(wp)[None, :]  # [hp, wp]
    label = _windows(label[None, :, :, None], window)[..., 0]  # [nW, window^2]
    different = label[:, :, None] != label[:, None, :]
    return torch.zeros(different.shape, device=device).masked_fill(different, _MASK_VALUE)


def relative_position_index(window: int) -> torch.Tensor:
    """[window^2, window^2] index into the (2*window-1)^2 bias table for every (query, key) pair in a window."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window - 1
    dx = xs[:, None] - xs[None, :] + window - 1
    return dy * (2 * window - 1) + dx


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability p (training only)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch conv + LayerNorm: [B, 3, H, W] -> [B, C, ceil(H/p), ceil(W/p)]."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p))
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window with a learned relative position bias.

    x: [B * nW, N, C] (N = window^2), mask: [nW, N, N] additive or None -> [B * nW, N, C].
    """

    def __init__(self, dim: int, window: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # [B*nW, heads, N, N]
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        attn = attn + bias.reshape(n, n, -1).permute(2, 0, 1)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.reshape(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.reshape(bw, self.num_heads, n, n)
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """(Shifted-)window attention + MLP, pre-norm residuals. x: [B, H*W, C] with its grid size (H, W)."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        if not 0 <= shift < window:
            raise ValueError(f"shift {shift} must be in [0, window={window})")
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, h: int, w: int, mask: torch.Tensor | None) -> torch.Tensor:
        b, _, c = x.shape
        ws = self.window
        y = self.norm1(x).reshape(b, h, w, c)
        # Pad after the norm, as the reference does: padded tokens are exact zeros, not normalised zeros.
        y = F.pad(y, (0, 0, 0, (ws - w % ws) % ws, 0, (ws - h % ws) % ws))
        hp, wp = y.shape[1:3]
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = _unwindow(self.attn(_windows(y, ws), mask if self.shift else None), ws, hp, wp)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        y = y[:, :h, :w].reshape(b, h * w, c)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat + LayerNorm + linear 4C -> 2C: [B, H*W, C] -> [B, ceil(H/2)*ceil(W/2), 2C]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, c = x.shape
        x = F.pad(x.reshape(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
        # Channel order (row, col) = (0,0), (1,0), (0,1), (1,1): the order the released weights expect.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class SwinStage(nn.Module):
    """`depth` blocks alternating regular and shifted windows, then (except the last stage) patch merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        drop_path: Sequence[float],
        downsample: bool,
    ) -> None:
        super().__init__()
        self.window = window
        self.shift = window // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio, drop_path[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """x: [B, h*w, C] -> (stage output [B, h*w, C], next stage input, its h, its w)."""
        ws = self.window
        mask = None
        if self.shift and len(self.blocks) > 1:
            # Size arithmetic on non-negative numbers only, here and in the pads: in an exported graph the
            # sizes are symbolic, and ONNX's integer Div / Mod truncate where Python's // and % floor, so
            # -(-h // ws) or (-w) % ws gave wrong window counts (math.ceil of a float fixed the size instead).
            mask = shifted_window_mask((h + ws - 1) // ws * ws, (w + ws - 1) // ws * ws, ws, self.shift, x.device)
            mask = mask.to(x.dtype)
        for blk in self.blocks:
            x = blk(x, h, w, mask)
        if self.downsample is None:
            return x, x, h, w
        return x, self.downsample(x, h, w), (h + 1) // 2, (w + 1) // 2


class SwinBackbone(nn.Module):
    """Swin Transformer: [B, 3, H, W] (any H, W) -> {"res2": [B, C, ceil(H/4), ceil(W/4)], ..., "res5": /32}.

    Channels are embed_dim * (1, 2, 4, 8); `out_channels` and `out_strides` describe them.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.3,
        patch_size: int = 4,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(f"Swin needs four stages; got depths={depths}, num_heads={num_heads}")
        self.window_size = window_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        # Stochastic depth grows linearly from 0 to drop_path_rate over all blocks.
        n = sum(depths)
        rates = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        dims = [embed_dim * 2**i for i in range(4)]
        self.layers = nn.ModuleList()
        for i in range(4):
            start = sum(depths[:i])
            self.layers.append(
                SwinStage(dims[i], depths[i], num_heads[i], window_size, mlp_ratio,
                          rates[start : start + depths[i]], downsample=i < 3)
            )
        for i in range(4):
            self.add_module(f"norm{i}", nn.LayerNorm(dims[i]))
        self.out_channels = {f"res{i + 2}": dims[i] for i in range(4)}
        self.out_strides = {f"res{i + 2}": patch_size * 2**i for i in range(4)}
        self.size_divisibility = 32
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: [B, 3, H, W] normalised image -> {"res2".."res5": [B, C_i, ceil(H/s_i), ceil(W/s_i)]}."""
        if x.dim() != 4:
            raise ValueError(f"Swin expects [B, C, H, W], got {tuple(x.shape)}")
        x = self.patch_embed(x)
        b, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        out = {}
        for i, stage in enumerate(self.layers):
            y, x, nh, nw = stage(x, h, w)
            y = getattr(self, f"norm{i}")(y)
            out[f"res{i + 2}"] = y.transpose(1, 2).reshape(b, -1, h, w).contiguous()
            h, w = nh, nw
        return out


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------------- building


def build_swin_backbone(
    name: str, window_size: int | None = None, drop_path_rate: float = 0.3, pretrained: str | None = None
) -> SwinBackbone:
    """Swin-T/S/B/L by name ('swin_tiny', ...). `pretrained`: None (random init), 'imagenet' (the official
    release: 1K-224 for tiny/small, 22K-384 for base/large) or a local file (official .pth {"model": ...},
    a plain state dict, .safetensors, or a detectron2-style .pkl)."""
    if name not in SWIN_VARIANTS:
        raise UserError(f"unknown Swin backbone '{name}'; choose one of {', '.join(SWIN_VARIANTS)}")
    embed_dim, depths, heads, default_window = SWIN_VARIANTS[name]
    model = SwinBackbone(embed_dim, depths, heads, window_size or default_window, drop_path_rate=drop_path_rate)
    if pretrained:
        # 'imagenet': the official release file (models/imagenet_files.py), fetched once and verified
        path = fetch_imagenet_file(name) if pretrained == "imagenet" else Path(pretrained)
        load_swin_weights(model, _read_weights(path), source=str(pretrained))
    return model


def _read_weights(path: Path) -> dict:
    """What a Swin weights file holds, as stored (an official .pth is {"model": state dict}, which
    `load_swin_weights` unwraps); UserError for a missing file. Torch and .pkl files load without running code."""
    if not path.is_file():
        raise UserError(f"Swin weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix == ".pkl":
        from maskformer_cli.models.pickle_safe import load_pickle_restricted

        data = load_pickle_restricted(path)
    else:
        from maskformer_cli.models.pickle_safe import load_torch_weights_only

        data = load_torch_weights_only(path, what="Swin weights")
    return data


_IGNORED_SUFFIXES = ("relative_position_index", "attn_mask")
_IGNORED_KEYS = ("norm.weight", "norm.bias", "head.weight", "head.bias")


def load_swin_weights(model: SwinBackbone, state: dict, source: str = "weights") -> None:
    """Load official Swin weights into `model`, strictly.

    Accepts {"model": sd}, {"state_dict": sd} or sd; with "backbone."-prefixed keys (a whole MaskFormer)
    only those are used; numpy arrays are converted. Dropped on purpose: the classification head and final norm, derived buffers
    (relative_position_index, attn_mask). ImageNet checkpoints have no per-stage output norms
    (norm0..norm3): when all four are absent they keep their fresh init, as in the reference. A bias table
    for another window size is resized bicubically (as the Swin segmentation code does). Any other missing
    or unexpected key, or a shape mismatch, is a UserError listing them.
    """
    import numpy as np

    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise UserError(f"{source}: expected a state dict, got {type(state).__name__}")
    if any(k.startswith("backbone.") for k in state):  # a whole detector/segmenter: take its backbone
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    sd: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.endswith(_IGNORED_SUFFIXES) or k in _IGNORED_KEYS:
            continue
        sd[k] = torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v
    own = model.state_dict()
    norms = [k for k in own if k.split(".")[0] in {f"norm{i}" for i in range(4)}]
    if not any(k in sd for k in norms):
        for k in norms:
            sd[k] = own[k]
    for k, v in list(sd.items()):
        if k.endswith("relative_position_bias_table") and k in own and v.shape != own[k].shape:
            sd[k] = _resize_bias_table(v, own[k].shape[0])
            log.info("%s: resized %s from %s to %s", source, k, tuple(v.shape), tuple(own[k].shape))
    from maskformer_cli.models.strict_load import load_into

    load_into(model, sd, source=source)


def _resize_bias_table(table: torch.Tensor, length: int) -> torch.Tensor:
    """[(2w-1)^2, heads] -> [length, heads] by bicubic resampling of the (2w-1) x (2w-1) grid."""
    old, new = math.isqrt(table.shape[0]), math.isqrt(length)
    grid = table.float().T.reshape(1, -1, old, old)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return grid.reshape(-1, new * new).T.contiguous().to(table.dtype)
