"""Focal + dice of mask logits upsampled to the target size, fused and computed in chunks of masks.

Same values as `losses.sigmoid_focal_loss` and `losses.dice_loss` on `F.interpolate(logits, size)`
(the paper's dense mask loss), but as one autograd node: the full-resolution logits, probabilities
and the dozen intermediates autograd would keep are never stored. Forward and backward walk the masks
a few at a time, so every intermediate stays small (in cache on a CPU) and the memory of the loss no
longer grows with M x H x W. Backward recomputes the upsampled logits of a chunk (one bilinear
interpolation) instead of reading them back, and returns the gradient at the logits' own resolution
through the adjoint of the interpolation (a stencil for the integer factors training uses).

With q = 1 - p_t = p + t - 2pt and a_t = alpha t + (1 - alpha)(1 - t), per pixel:
    focal = a_t * ce(x, t) * q^gamma
    d focal / dx = a_t * ((p - t) q^gamma + gamma ce q^(gamma-1) p (1 - p) (1 - 2t))
and per mask, with I = sum p t, D = sum p + sum t + 1:
    dice = 1 - (2I + 1) / D,   d dice / dx = (2I + 1 - 2 t D) / D^2 * p (1 - p).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# Elements of one chunk's full-resolution tensors: ~2 MiB in fp32 on a CPU (cache-sized); on a GPU
# large enough to fill the device while bounding the loss's transient memory.
_CHUNK_ELEMENTS = {"cpu": 1 << 19, "cuda": 1 << 24}


def _chunk_rows(n: int, pixels: int, device: torch.device) -> int:
    budget = _CHUNK_ELEMENTS.get(device.type, 1 << 24)
    return max(1, min(n, budget // max(pixels, 1)))


def _upsample(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """[c, h, w] logits -> [c, H*W] at `size` (bilinear, align_corners=False), or [c, P] as given."""
    if x.dim() == 3 and tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return x.reshape(x.shape[0], -1)


def _adjoint_weights(scale: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[scale, 3]: how output k of each group of `scale` splits between source pixels i-1, i, i+1.

    Bilinear upsampling by an integer factor s with align_corners=False reads output s*i + k at source
    coordinate i + d_k, d_k = (2k + 1 - s) / 2s: from i-1 and i when d_k < 0, from i and i+1 otherwise.
    At the borders PyTorch clamps the coordinate, which equals replicating the edge pixel.
    """
    w = torch.zeros(scale, 3, dtype=torch.float64)
    for k in range(scale):
        d = (2 * k + 1 - scale) / (2 * scale)
        if d < 0:
            w[k, 0], w[k, 1] = -d, 1 + d
        else:
            w[k, 1], w[k, 2] = 1 - d, d
    return w.to(device=device, dtype=dtype)


def _fold(parts: torch.Tensor, dim: int) -> torch.Tensor:
    """[..., n, ..., 3] shares for (i-1, i, i+1) -> [..., n, ...] summed at their pixel along `dim`."""
    to_prev, to_self, to_next = parts.unbind(-1)
    out = to_self.contiguous()
    n = out.shape[dim]
    out.narrow(dim, 0, n - 1).add_(to_prev.narrow(dim, 1, n - 1))
    out.narrow(dim, 0, 1).add_(to_prev.narrow(dim, 0, 1))  # from the replicated left/top edge
    out.narrow(dim, 1, n - 1).add_(to_next.narrow(dim, 0, n - 1))
    out.narrow(dim, n - 1, 1).add_(to_next.narrow(dim, n - 1, 1))  # from the replicated right/bottom edge
    return out


def _upsample_backward(grad: torch.Tensor, low_size: tuple[int, int]) -> torch.Tensor:
    """Gradient of bilinear upsampling (align_corners=False): [c, H, W] -> [c, h, w].

    For integer factors (training: targets are padded to a multiple of the mask stride) a separable
    stencil, a small matrix product per axis: no atomic adds (aten's CUDA kernel has them, and refuses to
    run under torch.use_deterministic_algorithms) and ~3x faster on a CPU than aten's scatter. Other sizes
    use aten's kernel.
    """
    c, big_h, big_w = grad.shape
    h, w = low_size
    if big_h % h or big_w % w:
        return torch.ops.aten.upsample_bilinear2d_backward(grad[:, None], [big_h, big_w], [c, 1, h, w], False)[:, 0]
    sh, sw = big_h // h, big_w // w
    wx = _adjoint_weights(sw, grad.dtype, grad.device)
    gx = _fold(grad.view(c, big_h, w, sw) @ wx, dim=2)  # [c, H, w]
    wy = _adjoint_weights(sh, grad.dtype, grad.device)
    return _fold(torch.einsum("cysx,sk->cyxk", gx.view(c, h, sh, w), wy), dim=1)  # [c, h, w]


def _terms(x: torch.Tensor, t: torch.Tensor, alpha: float, gamma: float):
    """(p, ce, q, a_t or None) of one chunk; x, t: [c, P] fp32."""
    p = torch.sigmoid(x)
    # BCE with logits, max(x, 0) - x t + log(1 + e^-|x|), with log(1 + e^-|x|) = -log(max(p, 1 - p)):
    # reuses p (one log of a value in [0.5, 1], no underflow) where F.binary_cross_entropy_with_logits
    # pays a log-sigmoid, the loss's costliest op on a CPU.
    ce = x.clamp_min(0).sub_(x * t).sub_(torch.maximum(p, 1 - p).log_())
    q = torch.addcmul(p + t, p, t, value=-2.0)  # 1 - p_t
    a_t = (t * (2 * alpha - 1)).add_(1 - alpha) if alpha >= 0 else None
    return p, ce, q, a_t


class _FocalDice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, alpha, gamma):  # noqa: ANN001 - autograd signature
        n = logits.shape[0]
        size = tuple(targets.shape[1:])
        pixels = targets[0].numel() if n else 0
        rows = _chunk_rows(n, pixels, logits.device)
        focal = logits.new_empty(n)
        inter = logits.new_empty(n)  # sum p t per mask, and D = sum p + sum t + 1: kept for the backward
        denom = logits.new_empty(n)
        for s in range(0, n, rows):
            x = _upsample(logits[s : s + rows], size)
            t = targets[s : s + rows].reshape(x.shape[0], -1).to(x.dtype)
            p, ce, q, a_t = _terms(x, t, alpha, gamma)
            loss = ce.mul_(q.pow_(gamma) if gamma != 1 else q)
            if a_t is not None:
                loss.mul_(a_t)
            focal[s : s + rows] = loss.mean(1)
            inter[s : s + rows] = torch.linalg.vecdot(p, t)
            denom[s : s + rows] = p.sum(1) + t.sum(1) + 1
        dice = 1 - (2 * inter + 1) / denom
        ctx.save_for_backward(logits, targets, inter, denom)
        ctx.alpha, ctx.gamma, ctx.size = alpha, gamma, size
        return focal, dice

    @staticmethod
    @once_differentiable  # the backward is hand-written: a second derivative must fail loudly, not be wrong
    def backward(ctx, grad_focal, grad_dice):  # noqa: ANN001 - autograd signature
        logits, targets, inter, denom = ctx.saved_tensors
        alpha, gamma, size = ctx.alpha, ctx.gamma, ctx.size
        n = logits.shape[0]
        pixels = targets[0].numel() if n else 0
        rows = _chunk_rows(n, pixels, logits.device)
        grad = torch.zeros_like(logits)
        if grad_focal is None:
            grad_focal = logits.new_zeros(n)
        if grad_dice is None:
            grad_dice = logits.new_zeros(n)
        upsampled = logits.dim() == 3 and tuple(logits.shape[-2:]) != size
        for s in range(0, n, rows):
            low = logits[s : s + rows]
            x = _upsample(low, size)
            c = x.shape[0]
            t = targets[s : s + rows].reshape(c, -1).to(x.dtype)
            p, ce, q, a_t = _terms(x, t, alpha, gamma)
            s_p = p * (1 - p)  # dp/dx
            # dice: (2I + 1 - 2 t D) / D^2 * p(1-p), times the incoming gradient of each mask
            i_c, d_c = inter[s : s + rows], denom[s : s + rows]
            g_d = grad_dice[s : s + rows] / d_c**2
            g = (t * (-2 * d_c * g_d)[:, None]).add_(((2 * i_c + 1) * g_d)[:, None]).mul_(s_p)
            # focal: a_t ((p - t) q^gamma + gamma ce q^(gamma-1) p(1-p)(1-2t)) / P
            q_g1 = q.pow(gamma - 1) if gamma != 2 else q
            one_minus_2t = (t * -2).add_(1)
            f = ce.mul_(q_g1).mul_(s_p).mul_(one_minus_2t).mul_(gamma)
            f.add_((p - t).mul_(q_g1.mul_(q) if gamma != 2 else q.square()))
            if a_t is not None:
                f.mul_(a_t)
            g.add_(f.mul_((grad_focal[s : s + rows] / x.shape[1])[:, None]))
            if upsampled:
                g = _upsample_backward(g.view(c, *size), tuple(low.shape[-2:]))
            grad[s : s + rows] = g.view_as(low)
        return grad, None, None, None


def focal_dice_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-mask focal loss (mean over pixels) and dice loss of logits upsampled to the targets' size.

    logits:  [M, h, w] mask logits (bilinear-upsampled to H, W when the sizes differ), or [M, P].
    targets: [M, H, W] (or [M, P]) in [0, 1], any dtype (bool keeps them at one byte per pixel).
    alpha < 0 disables the focal class-balance weighting; gamma >= 1.
    Returns (focal [M], dice [M]) in logits' dtype; the losses of `losses.sigmoid_focal_loss` and
    `losses.dice_loss` are `focal.sum() / num_masks` and `dice.sum() / num_masks`.
    """
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(f"{logits.shape[0]} mask logits but {targets.shape[0]} targets")
    if gamma < 1:
        raise ValueError(f"focal gamma must be >= 1 for the fused loss, got {gamma}")
    return _FocalDice.apply(logits, targets, float(alpha), float(gamma))
