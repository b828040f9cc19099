"""Timing shared by the benchmark scripts: device-synchronised wall clock, peers run alternately."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(fns: dict[str, Callable[[], object]], steps: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each fn, calling them in turn for `steps` rounds (warm them up first).

    Alternating step by step makes a shared machine's drifts in speed hit every peer alike.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return times
