"""The resumable training stream, exact inference shards and per-(rank, worker) seeding."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from maskformer_cli.data.sampler import (
    InferenceSampler,
    TrainingSampler,
    make_worker_init_fn,
    seed_worker,
    worker_init_fn,
)


def _take(sampler, n: int) -> list[int]:
    return list(itertools.islice(iter(sampler), n))


def _reference_stream(size: int, seed: int, epochs: int) -> list[int]:
    """The global stream written out: one seeded permutation per epoch, concatenated."""
    out: list[int] = []
    for e in range(epochs):
        out += torch.randperm(size, generator=torch.Generator().manual_seed(seed + e)).tolist()
    return out


def test_single_rank_is_a_permutation_per_epoch() -> None:
    size = 11
    stream = _take(TrainingSampler(size, seed=5), 4 * size)
    assert stream == _reference_stream(size, 5, 4)
    for e in range(4):
        assert sorted(stream[e * size : (e + 1) * size]) == list(range(size))
    assert stream[:size] != stream[size : 2 * size]  # a new order each epoch
    assert _take(TrainingSampler(size, shuffle=False), 2 * size) == list(range(size)) * 2


@pytest.mark.parametrize("size,world", [(12, 3), (10, 3), (5, 4), (2, 3)])
def test_ranks_are_disjoint_within_an_epoch_and_cover_it(size: int, world: int) -> None:
    steps = 3 * size  # per rank; several epochs
    streams = [_take(TrainingSampler(size, seed=7, rank=r, world_size=world), steps) for r in range(world)]
    ref = _reference_stream(size, 7, (steps * world) // size + 2)
    # interleaving the ranks' k-th samples reproduces the global stream (detectron2's stride over it)
    interleaved = [streams[r][k] for k in range(steps) for r in range(world)]
    assert interleaved == ref[: steps * world]
    # hence within every epoch, the ranks' samples are disjoint and cover range(size)
    for e in range(steps * world // size):
        epoch_part = interleaved[e * size : (e + 1) * size]
        assert sorted(epoch_part) == list(range(size))


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("consumed_per_rank", [0, 4, 9, 17, 40])
def test_resume_mid_epoch_continues_the_same_stream(world: int, consumed_per_rank: int) -> None:
    size, seed, more = 13, 3, 30
    for rank in range(world):
        full = _take(TrainingSampler(size, seed=seed, rank=rank, world_size=world), consumed_per_rank + more)
        # the engine saves where IT is (samples this rank consumed), then a new process resumes from that
        saving = TrainingSampler(size, seed=seed, rank=rank, world_size=world)
        saving.set_position(consumed_per_rank)
        state = saving.state_dict()
        assert set(state) == {"epoch", "position"}
        assert state["epoch"] * size + state["position"] == consumed_per_rank * world
        resumed = TrainingSampler(size, seed=seed, rank=rank, world_size=world)
        resumed.load_state_dict(state)
        assert _take(resumed, more) == full[consumed_per_rank:]
        again = TrainingSampler(size, seed=seed, rank=rank, world_size=world)
        again.set_position(consumed_per_rank)  # or recreated from the step count alone
        assert _take(again, more) == full[consumed_per_rank:]


def test_set_position_across_epoch_boundaries() -> None:
    size = 6
    ref = _reference_stream(size, 0, 6)
    s = TrainingSampler(size, seed=0)
    for pos in [0, 5, 6, 7, 12, 17, 25]:
        s.set_position(pos)
        assert _take(s, 8) == ref[pos : pos + 8], pos
    s.set_position(13)
    assert s.state_dict() == {"epoch": 2, "position": 1}
    two = TrainingSampler(size, seed=0, rank=1, world_size=2)
    two.set_position(4)  # per rank: global position 8 = epoch 1, offset 2; rank 1 starts one later
    assert two.state_dict() == {"epoch": 1, "position": 2}
    assert _take(two, 4) == ref[9:17:2]
    two.set_global_position(11)
    assert _take(two, 2) == [ref[12], ref[14]]
    with pytest.raises(ValueError):
        s.load_state_dict({"epoch": 0, "position": size})


def test_resume_with_a_different_world_size_keeps_the_global_order() -> None:
    size = 9
    ref = _reference_stream(size, 2, 4)
    state = {"epoch": 1, "position": 4}  # saved by a 2-rank run (global position 13)
    streams = []
    for r in range(3):
        s = TrainingSampler(size, seed=2, rank=r, world_size=3)
        s.load_state_dict(state)
        streams.append(_take(s, 5))
    assert [streams[r][k] for k in range(5) for r in range(3)] == ref[13 : 13 + 15]


class _Echo(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> int:
        return i


def test_works_as_a_dataloader_sampler_with_prefetching_workers() -> None:
    s = TrainingSampler(10, seed=4)
    loader = DataLoader(_Echo(), batch_size=3, sampler=s, num_workers=1, prefetch_factor=4)
    it = iter(loader)
    consumed = [next(it).tolist() for _ in range(2)]  # workers have prefetched more than this
    del it
    s.set_position(6)  # what the engine consumed, not what was prefetched
    resumed = TrainingSampler(10, seed=4)
    resumed.load_state_dict(s.state_dict())
    nxt = next(iter(DataLoader(_Echo(), batch_size=3, sampler=resumed))).tolist()
    assert sum(consumed, []) + nxt == _reference_stream(10, 4, 1)[:9]


@pytest.mark.parametrize("size,world", [(10, 3), (2, 4), (0, 2), (8, 1)])
def test_inference_sampler_is_an_exact_partition(size: int, world: int) -> None:
    shards = [list(InferenceSampler(size, r, world)) for r in range(world)]
    assert sum(shards, []) == list(range(size))  # disjoint, ordered, complete, no padding
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert [len(InferenceSampler(size, r, world)) for r in range(world)] == list(map(len, shards))


def _worker_draws(rank: int, worker_id: int, base_seed: int) -> tuple:
    import random

    torch.manual_seed(base_seed + worker_id)  # what the DataLoader does in each worker
    seed_worker(worker_id, rank=rank)
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_worker_seeds_differ_per_rank_and_worker_and_are_reproducible(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    draws = {(r, w): _worker_draws(r, w, 1234) for r in range(3) for w in range(3)}
    flat = [x for d in draws.values() for x in d]
    assert len(set(flat)) == len(flat)  # all streams distinct
    assert _worker_draws(1, 2, 1234) == draws[(1, 2)]  # reproducible
    monkeypatch.setenv("RANK", "2")
    torch.manual_seed(1234 + 1)
    make_worker_init_fn(2)(1)
    a = float(np.random.rand())
    torch.manual_seed(1234 + 1)
    worker_init_fn(1)  # reads $RANK
    assert float(np.random.rand()) == a == draws[(2, 1)][1]
