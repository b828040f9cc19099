"""Numeric precision of a forward pass: fp32, or autocast to bf16 / fp16 (training and inference)."""

from __future__ import annotations

from contextlib import nullcontext

import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("fp32", *AMP_DTYPES)


def check_precision(precision: str) -> str:
    """A --precision value from the command line, or one UserError naming the choices."""
    from maskformer_cli.errors import UserError

    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return precision


def resolve_precision(precision: str, device: torch.device) -> str:
    """A recipe's solver.precision for `device`: 'auto' is bf16 where the device has fast bf16 kernels (a
    CUDA GPU that supports bf16; a CPU with AVX512 or Arm bf16, which oneDNN runs natively: the quickstart's
    step is ~1.3x faster there), else fp32 (emulated bf16 would be slower than fp32). Others pass through."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """Mixed precision context for the forward pass ('fp32' = no autocast)."""
    if precision == "fp32":
        return nullcontext()
    if precision not in AMP_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; one of {PRECISIONS}")
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[precision])
