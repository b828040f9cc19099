"""Strict loading of a state dict into a module: every key must match in name and shape, and the error lists
the offenders. Every weight file (ours, official, Hugging Face, backbone weights) ends here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from maskformer_cli.errors import UserError


def _preview(keys: list[str], n: int = 20) -> str:
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_into(model: torch.nn.Module, state_dict: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Copy `state_dict` into `model`, strictly: any missing or unexpected key, or a shape mismatch, raises
    a UserError listing the offending keys (the first 20 and the count). Numpy arrays are accepted."""
    own = model.state_dict()
    # BatchNorm's step counter is bookkeeping, not a weight (it only matters with momentum=None), and
    # most released checkpoints omit it: keep the model's own value when it is absent.
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_preview(unexpected)}")
    tensors = {}
    wrong = []
    for k, v in state_dict.items():
        if k not in own:
            continue
        t = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
        if tuple(t.shape) != tuple(own[k].shape):
            wrong.append(f"{k} {tuple(t.shape)} vs model {tuple(own[k].shape)}")
        tensors[k] = t
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {_preview(wrong)}")
    if problems:
        raise UserError(f"{source}: the weights do not fit the model: " + "; ".join(problems))
    for k in own:
        if k not in tensors and k.endswith("num_batches_tracked"):
            tensors[k] = own[k]
    model.load_state_dict(tensors, strict=True)
