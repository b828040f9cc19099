"""Samplers: an infinite, resumable training stream and exact evaluation shards; DataLoader worker seeding.

The training stream (detectron2's TrainingSampler, made resumable in O(1)):

    G = perm(seed + 0) ++ perm(seed + 1) ++ perm(seed + 2) ++ ...      (one permutation of range(size) per epoch)
    rank r of W yields G[g0 + r], G[g0 + r + W], G[g0 + r + 2W], ...    (g0: the global position resumed from)

Every element of G depends only on (seed, its epoch, its offset), so the stream can be recreated at
any global position without replaying it. Within one epoch the ranks' samples are disjoint and together
cover the dataset; all ranks advance in lock step, so their state is the same and rank 0's is enough.

Resuming with a DataLoader. The DataLoader's workers prefetch, so what the sampler has handed out
is ahead of what training has consumed; the sampler therefore does NOT count what it yields. The engine
counts what it consumed and tells the sampler:

    sampler.set_position(step * per_rank_batch * grad_accum)  # samples THIS rank consumed, before saving
    ckpt["sampler"] = sampler.state_dict()   # {"epoch", "position"} in the global stream (same on all ranks)
    ...
    sampler.load_state_dict(ckpt["sampler"]) # on resume, BEFORE iter(dataloader); or set_position again
    it = iter(dataloader)                    # starts exactly at the consumed position

`set_position`/`load_state_dict` only affect iterators created afterwards. Since the state is a position
in the global stream (per-rank samples x world size), a run may be resumed with a different number of
ranks (same global batch) and still visits the same sequence of samples.
"""

from __future__ import annotations

import functools
import os
import random
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from maskformer_cli.distributed import shard_indices


class TrainingSampler(Sampler[int]):
    """Infinite stream of dataset indices for one rank; the same `seed` must be used on every rank."""

    def __init__(
        self, size: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if size <= 0:
            raise ValueError(f"TrainingSampler needs a non-empty dataset, got size={size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.size = size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self._start = 0  # global position (samples consumed by all ranks) the next iterator starts at

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The permutation of range(size) visited in `epoch` (the same on every rank)."""
        if not self.shuffle:
            return torch.arange(self.size)
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(self.size, generator=g)

    def __iter__(self) -> Iterator[int]:
        pos = self._start + self.rank
        epoch, offset = divmod(pos, self.size)
        while True:
            order = self.epoch_order(epoch).tolist()
            while offset < self.size:
                yield order[offset]
                offset += self.world_size
            epoch, offset = epoch + offset // self.size, offset % self.size

    def set_position(self, samples_consumed: int) -> None:
        """Start the next iterator after THIS rank has consumed `samples_consumed` samples.

        Every rank consumes the same number, so the global stream position is samples_consumed x world_size.
        """
        if samples_consumed < 0:
            raise ValueError(f"samples_consumed must be >= 0, got {samples_consumed}")
        self._start = int(samples_consumed) * self.world_size

    def set_global_position(self, global_consumed: int) -> None:
        """Start the next iterator after `global_consumed` samples of the global stream (all ranks together)."""
        if global_consumed < 0:
            raise ValueError(f"global_consumed must be >= 0, got {global_consumed}")
        self._start = int(global_consumed)

    @property
    def global_position(self) -> int:
        """Samples of the global stream consumed before the next iterator's first sample."""
        return self._start

    def state_dict(self) -> dict[str, int]:
        """{"epoch": e, "position": p}: the next sample is element p of epoch e's permutation."""
        epoch, position = divmod(self._start, self.size)
        return {"epoch": epoch, "position": position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.size:
            raise ValueError(f"sampler state {state} does not fit a dataset of {self.size} samples")
        self._start = epoch * self.size + position


class InferenceSampler(Sampler[int]):
    """This rank's exact shard of range(size): contiguous, disjoint across ranks, no padding."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = shard_indices(size, rank, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def seed_worker(worker_id: int, rank: int | None = None) -> None:
    """DataLoader `worker_init_fn`: give every (rank, worker) its own python/numpy/torch random stream.

    The DataLoader seeds each worker's torch RNG with base_seed + worker_id, where base_seed is drawn from
    the main process's torch RNG; ranks seeded identically would thus augment identically. The seed
    here mixes in the rank (default: $RANK, set by torchrun and inherited by workers) so streams differ
    across ranks, and stays a function of the main process's RNG state, so it is reproducible.
    """
    # A scheduler's SIGTERM often goes to the whole process group (SLURM, systemd, torchrun passing it on):
    # the main process saves a checkpoint and shuts its workers down; a worker dying of the signal first
    # would crash the run before it can save. (PyTorch's workers already ignore SIGINT; a worker whose
    # parent is gone still exits, through the loader's parent watchdog.)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    base = torch.initial_seed()  # base_seed + worker_id, a 64-bit integer
    seq = np.random.SeedSequence([base & 0xFFFFFFFF, base >> 32, rank, worker_id])
    words = seq.generate_state(4, dtype=np.uint32)
    np.random.seed(int(words[0]))
    random.seed(int(words[1]) << 32 | int(words[2]))
    torch.manual_seed(int(words[3]) << 32 | int(words[1]))


def worker_init_fn(worker_id: int) -> None:
    """`seed_worker` with the rank read from $RANK (pass `make_worker_init_fn(rank)` to set it explicitly)."""
    seed_worker(worker_id)


def make_worker_init_fn(rank: int) -> functools.partial[None]:
    """A picklable `worker_init_fn` for an explicit rank (works with the 'spawn' start method)."""
    return functools.partial(seed_worker, rank=rank)
