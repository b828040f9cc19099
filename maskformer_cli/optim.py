"""AdamW with per-parameter hyper-parameters, the poly (or step) learning-rate schedule, full-model clipping.

Paper Sec. 4: AdamW, poly schedule (power 0.9), backbone learning rate x0.1 for CNN backbones (x1.0 for
Swin), weight decay 1e-4 (0.01 for Swin); the reference also exempts normalisation layers, embeddings and
Swin's position tables from weight decay and clips the gradient norm of the whole model at 0.01.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from maskformer_cli.config import SolverConfig

# Module types whose parameters are normalisation affine weights/biases. FrozenBatchNorm has no
# parameters (only buffers), so it never reaches the optimizer; it is detected by name below anyway
# in case a variant registers its affine terms as parameters.
NORM_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*, LazyBatchNorm*
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

# Parameter names (last component) of Swin that behave like embeddings (no decay in the reference).
EMBED_PARAM_NAMES: tuple[str, ...] = ("relative_position_bias_table", "absolute_pos_embed")

# Prefixes that wrappers put in front of the model's own parameter names.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_MODULE_TYPES) or "FrozenBatchNorm" in type(module).__name__


def _strip_wrappers(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def build_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_multiplier: float,
    weight_decay_norm: float = 0.0,
    weight_decay_embed: float = 0.0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with the reference's per-parameter learning rate and weight decay.

    - parameters whose name starts with "backbone." (after a DDP "module." or torch.compile "_orig_mod."
      prefix) get `lr * backbone_multiplier`;
    - parameters owned directly by a normalisation module (BatchNorm, SyncBN, FrozenBN, GroupNorm,
      LayerNorm, ...; detected by module type) get `weight_decay_norm`;
    - `nn.Embedding` weights and Swin's `relative_position_bias_table` / `absolute_pos_embed` (by name)
      get `weight_decay_embed`;
    - every other trainable parameter gets `weight_decay`.

    Parameters with `requires_grad=False` are skipped and a parameter shared by several modules is counted
    once (at its first occurrence in `model.named_modules()` order). Parameters with identical (lr,
    weight_decay) are merged into one group, in a deterministic order, so that optimizer state dicts
    line up on resume. Each group also carries a "name" string for logging.
    """
    seen: set[int] = set()
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for module_name, module in model.named_modules():
        is_norm = _is_norm(module)
        is_embedding = isinstance(module, nn.Embedding)
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = _strip_wrappers(f"{module_name}.{param_name}" if module_name else param_name)
            in_backbone = full_name.startswith("backbone.")
            group_lr = lr * backbone_multiplier if in_backbone else lr
            if is_norm:
                group_wd, kind = weight_decay_norm, "norm"
            elif is_embedding or param_name in EMBED_PARAM_NAMES:
                group_wd, kind = weight_decay_embed, "embed"
            else:
                group_wd, kind = weight_decay, "default"
            key = (group_lr, group_wd)
            if key not in groups:
                where = "backbone" if in_backbone else "head"
                groups[key] = {
                    "params": [],
                    "lr": group_lr,
                    "weight_decay": group_wd,
                    "name": f"{where}/{kind}",
                }
            groups[key]["params"].append(param)
    return list(groups.values())


def build_optimizer(model: nn.Module, solver_cfg: SolverConfig) -> torch.optim.AdamW:
    """AdamW over `build_param_groups(model, ...)` with the recipe's lr, betas and weight decays."""
    groups = build_param_groups(
        model,
        lr=solver_cfg.lr,
        weight_decay=solver_cfg.weight_decay,
        backbone_multiplier=solver_cfg.backbone_multiplier,
        weight_decay_norm=solver_cfg.weight_decay_norm,
        weight_decay_embed=solver_cfg.weight_decay_embed,
    )
    params = [p for g in groups for p in g["params"]]
    # The fused kernel is one pass over each parameter instead of ~10 elementwise kernels: 4x faster on
    # a CPU (measured: 14 vs 58 ms per step for the quickstart's 12M parameters, ~15% of its bf16 step);
    # the same update up to float rounding. It needs every parameter on one CPU or CUDA device.
    devices = {p.device.type for p in params}
    fused = len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        groups, lr=solver_cfg.lr, betas=tuple(solver_cfg.betas), weight_decay=solver_cfg.weight_decay,
        fused=fused or None,
    )


def _warmup(it: int, warmup_iters: int, warmup_factor: float) -> float:
    """Linear warmup multiplier: warmup_factor at it = 0 rising to 1 at it = warmup_iters, then 1."""
    if it >= warmup_iters:
        return 1.0
    alpha = it / warmup_iters
    return warmup_factor * (1.0 - alpha) + alpha


def poly_lr_lambda(
    max_iters: int, power: float = 0.9, warmup_iters: int = 0, warmup_factor: float = 1.0
) -> Callable[[int], float]:
    """Learning-rate multiplier at iteration `it` (detectron2's WarmupPolyLR with linear warmup).

    factor(it) = w(it) * (1 - it / max_iters) ** power, where w(it) = warmup_factor * (1 - a) + a with
    a = it / warmup_iters for it < warmup_iters, and w(it) = 1 afterwards. The base is clamped at 0 so
    iterations past `max_iters` give 0 instead of a complex number.
    """
    if max_iters <= 0:
        raise ValueError(f"max_iters must be > 0, got {max_iters}")

    def factor(it: int) -> float:
        return _warmup(it, warmup_iters, warmup_factor) * math.pow(max(0.0, 1.0 - it / max_iters), power)

    # A plain function (not a callable object): LambdaLR then keeps it out of its state dict, so a
    # resumed run uses the schedule of the current recipe and the state dict stays weights_only-loadable.
    return factor


def step_lr_lambda(
    steps: Sequence[int], gamma: float = 0.1, warmup_iters: int = 0, warmup_factor: float = 1.0
) -> Callable[[int], float]:
    """Learning-rate multiplier of detectron2's WarmupMultiStepLR: gamma ** (number of steps <= it).

    The same linear warmup as `poly_lr_lambda`. `steps` must be increasing.
    """
    steps = tuple(int(s) for s in steps)
    if list(steps) != sorted(steps):
        raise ValueError(f"lr_steps must be increasing, got {list(steps)}")

    def factor(it: int) -> float:
        return _warmup(it, warmup_iters, warmup_factor) * gamma ** bisect.bisect_right(steps, it)

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, solver_cfg: SolverConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule (poly or step); call `scheduler.step()` once per optimizer step."""
    if solver_cfg.lr_schedule == "step":
        fn = step_lr_lambda(
            solver_cfg.lr_steps,
            gamma=solver_cfg.lr_gamma,
            warmup_iters=solver_cfg.warmup_iters,
            warmup_factor=solver_cfg.warmup_factor,
        )
    else:
        fn = poly_lr_lambda(
            solver_cfg.max_iters,
            power=solver_cfg.poly_power,
            warmup_iters=solver_cfg.warmup_iters,
            warmup_factor=solver_cfg.warmup_factor,
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def clip_grad_norm_full_model(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale all gradients together so that their joint L2 norm is at most `max_norm`; return that norm.

    This is the reference's "full_model" clipping: ONE norm over every parameter of every group (not per
    parameter). `max_norm <= 0` disables the clipping but still returns the norm. The returned norm is a
    0-dim float32 tensor on the gradients' device (no host sync here); when it is non-finite the gradients
    are left untouched so that the caller can detect it (e.g. `distributed.any_nonfinite`) and skip
    the step. With fp16 loss scaling, unscale the gradients before calling this.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    device = grads[0].device
    per_grad = [torch.linalg.vector_norm(g.detach(), 2, dtype=torch.float32).to(device) for g in grads]
    total = torch.linalg.vector_norm(torch.stack(per_grad), 2)
    if max_norm > 0:
        # Same coefficient as torch.nn.utils.clip_grad_norm_ (eps 1e-6, never scale up); a non-finite
        # norm gives coefficient 1 instead of poisoning the gradients with NaN.
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        coef = torch.where(torch.isfinite(total), coef, torch.ones_like(coef))
        for g in grads:
            g.detach().mul_(coef.to(g.device, g.dtype))
    return total
