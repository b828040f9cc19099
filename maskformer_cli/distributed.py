"""Process-group setup and the few collectives the engine needs; exact sharding (`--gpus N` relaunch: launch.py).

Everything works unchanged in a single process (no torchrun variables): the collectives become
no-ops and rank/world size are 0/1. Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) a process group is
always created, even for one process, so the same code path runs at every scale: NCCL when the device
is CUDA, gloo otherwise. With NCCL, tensors passed to the collectives must be on this rank's GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from maskformer_cli.errors import UserError

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its global rank, the number of processes, its rank on this node."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool


def under_torchrun() -> bool:
    return all(v in os.environ for v in _TORCHRUN_VARS)


def resolve_device(device: str = "auto", local_rank: int | None = None) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a device (UserError if unusable); `local_rank` overrides N."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device '{device}' (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise UserError(f"unsupported device '{device}' (use auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise UserError(f"device '{device}' requested but CUDA is not available (use --device cpu)")
    index = local_rank if local_rank is not None else (dev.index if dev.index is not None else 0)
    if index >= torch.cuda.device_count():
        raise UserError(f"CUDA device {index} requested but only {torch.cuda.device_count()} are visible")
    return torch.device("cuda", index)


def init_distributed(device: str = "auto") -> DistInfo:
    """Set up this process: a single process, or one rank of a torchrun job.

    Under torchrun: joins the process group (env:// rendezvous, NCCL for CUDA else gloo) and, for CUDA,
    binds this process to cuda:LOCAL_RANK. Calling it again after initialisation returns the same info.
    """
    if not under_torchrun():
        dev = resolve_device(device, None)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(rank=0, world_size=1, local_rank=0, device=dev, is_main=True)
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://"}
        if backend == "nccl":
            kwargs["device_id"] = dev  # binds the communicator to this GPU (and silences barrier warnings)
        dist.init_process_group(**kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, is_main=rank == 0)


def cleanup(*, sync: bool = False) -> None:
    """Leave the process group (no-op in a single process).

    sync: wait at a barrier first, so that no rank tears gloo down while a peer is still finishing its last
    collective (seen under load as one rank aborting in C++ at exit, 'terminate called without an active
    exception', after a run that had finished). Only on the success path: after a failure a peer may never
    reach the barrier."""
    if dist.is_available() and dist.is_initialized():
        if sync:
            barrier()
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if _active() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if not _active():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place and return it (identity in a single process). `t` may live on any device:
    NCCL reduces only this rank's GPU tensors and gloo is used here for CPU ones, so a tensor elsewhere (a
    metric's CPU state under NCCL, say) travels to the backend's device and back."""
    if _active() and get_world_size() > 1:
        where = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                 else torch.device("cpu"))
        if t.device == where:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        else:
            moved = t.to(where)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            t.copy_(moved)
    return t


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects; [obj] in a single process)."""
    if not _active() or get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (other ranks' `obj` is ignored)."""
    if not _active() or get_world_size() == 1:
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy every buffer (BatchNorm running statistics) from rank `src` to all ranks.

    DDP broadcasts buffers only at the start of each training forward, so after the last step every rank
    holds the statistics of its own last batch; evaluation and checkpoints must all see rank 0's.
    """
    if not _active():
        return
    for b in module.buffers():
        torch.distributed.broadcast(b.data, src)


def parameter_checksum(model: torch.nn.Module) -> float:
    """A position-weighted sum of every parameter and float buffer: equal for identical replicas, different otherwise."""
    total = torch.zeros((), dtype=torch.float64)
    for i, p in enumerate([*model.parameters(), *model.buffers()]):
        if not p.is_floating_point():
            continue
        w = torch.arange(1, p.numel() + 1, dtype=torch.float64, device=p.device) % 9973 + i
        total += (p.detach().double().flatten() * w).sum().cpu()
    return float(total)


def any_nonfinite(loss: torch.Tensor | float) -> bool:
    """True on EVERY rank when the loss (any element) is NaN/inf on ANY rank, so all ranks skip together.

    This is a collective: every rank must call it at the same point. It syncs with the host once.
    """
    t = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
    flag = (~torch.isfinite(t)).any().to(torch.float32).reshape(1)
    if _active() and get_world_size() > 1:
        if dist.get_backend() == "nccl" and flag.device.type != "cuda":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on EVERY rank when `flag` is true on ANY rank (a collective under a process group; with NCCL,
    `device` must be this rank's GPU). Used where ranks must take the same branch, e.g. all stop together."""
    if not _active() or get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """The contiguous share of range(n) that `rank` evaluates: sizes differ by at most one, no padding.

    The shards of ranks 0..world_size-1 are disjoint, in order, and their union is range(n), so
    gathered results need no de-duplication (unlike DistributedSampler, which pads with repeats).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (1 if rank < extra else 0)))


# --------------------------------------------------------------------------------------------- relaunch
