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


def autocast(device: torch.device, precision: str):
    """Mixed precision context for the forward pass ('fp32' = no autocast)."""
    if precision == "fp32":
        return nullcontext()
    if precision not in AMP_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; one of {PRECISIONS}")
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[precision])
