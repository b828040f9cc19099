"""Atomic checkpoints under SIGKILL, the checkpoint directory, RNG capture and resume compatibility."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from maskformer_cli import checkpoint as ckpt_mod
from maskformer_cli.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    CheckpointManager,
    atomic_save,
    capture_rng_state,
    check_compatible,
    load,
    restore_rng_state,
)
from maskformer_cli.config import Recipe, SolverConfig, to_dict
from maskformer_cli.data.sampler import TrainingSampler
from maskformer_cli.errors import UserError
from maskformer_cli.optim import build_optimizer, build_scheduler

# A child that rewrites the same checkpoint forever with a 32 MB tensor whose every element equals the
# version number, so a torn or mixed write is detectable, not just a truncated one.
_WRITER = textwrap.dedent(
    """
    import sys, torch
    from maskformer_cli.checkpoint import atomic_save
    path = sys.argv[1]
    data = torch.zeros(8 * 1024 * 1024)
    i = 0
    while True:
        data.fill_(float(i))  # in place: the child spends its time writing, not allocating
        atomic_save({"version": i, "data": data}, path)
        if i == 0:
            print("ready", flush=True)
        i += 1
    """
)


def test_atomic_save_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    rng = random.Random(0)
    killed_mid_write = trials = 0
    # Kill only once a write is visibly in progress (its temp file exists), after a random few ms so
    # that kills land at different points of torch.save / fsync / rename. A kill can still land just
    # after the rename: keep going (at most 20 trials) until one has hit a write in progress.
    while trials < 3 or (killed_mid_write == 0 and trials < 20):
        trials += 1
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 0.3))
            deadline = time.monotonic() + 30
            while not list(tmp_path.glob(".ckpt.pt.*.tmp")) and time.monotonic() < deadline:
                time.sleep(0.0005)
            time.sleep(rng.uniform(0.0, 0.02))
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        killed_mid_write += bool(list(tmp_path.glob(".ckpt.pt.*.tmp")))
        obj = torch.load(path, weights_only=True)  # never truncated
        assert obj["version"] >= 0
        assert torch.all(obj["data"] == float(obj["version"]))  # never a mix of two versions
        ckpt_mod.remove_stale_temps(tmp_path)
        assert not list(tmp_path.glob(".*.tmp"))
    # the test is about atomicity: at least one kill must have hit a write in progress
    assert killed_mid_write >= 1


def test_atomic_save_replaces_and_cleans_up_on_error(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "x.pt"
    atomic_save({"a": torch.ones(2)}, path)
    atomic_save({"a": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(3))
    if os.name == "posix":  # the usual permissions, not the temp file's private 0600
        umask = os.umask(0)
        os.umask(umask)
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"bad": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.pt"]


def _state(step: int) -> dict:
    return {"format_version": CHECKPOINT_FORMAT_VERSION, "step": step, "w": torch.full((4,), float(step))}


def test_keep_last_best_and_last(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in range(1, 6):
        mgr.save(step * 10, _state(step * 10), is_best=step == 3)
    assert [s for s, _ in mgr.step_files()] == [40, 50]
    assert load(mgr.last_path)["step"] == 50
    assert load(mgr.best_path)["step"] == 30  # survives the pruning of its step file
    assert mgr.latest_valid() == mgr.step_path(50)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pt",
        "last.pt",
        "step_00000040.pt",
        "step_00000050.pt",
    ]


def test_keep_all_and_resumed_timeline(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=0)
    for step in (1, 2, 3):
        mgr.save(step, _state(step))
    assert [s for s, _ in mgr.step_files()] == [1, 2, 3]
    # a run resumed from step 1 saves step 2 again: its newest is step 2, even though step_3 exists
    mgr.save(2, {**_state(2), "w": torch.full((4,), -2.0)})
    path, obj = mgr.load_latest()
    assert path == mgr.step_path(2) and obj["w"][0] == -2.0


def test_latest_valid_skips_corrupt_newest(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        mgr.save(step, _state(step))
    newest = mgr.step_path(3)
    data = newest.read_bytes()
    with open(newest, "r+b") as f:  # in place: last.pt is the same file, so it is corrupt too
        f.truncate(len(data) // 2)
    with pytest.warns(RuntimeWarning, match="step_00000003"):
        assert mgr.latest_valid() == mgr.step_path(2)
    with pytest.raises(UserError, match="cannot load checkpoint"):
        load(newest)
    for step in (1, 2):
        mgr.step_path(step).write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning):
        assert mgr.latest_valid() is None
    assert CheckpointManager(tmp_path / "empty").latest_valid() is None


def test_last_is_a_copy_without_hardlinks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_link(*args, **kwargs):
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_link)
    mgr = CheckpointManager(tmp_path, keep_last=2)
    mgr.save(1, _state(1))
    mgr.save(2, _state(2))
    mgr.step_path(2).write_bytes(b"garbage")  # the copy in last.pt is unaffected
    path, obj = mgr.load_latest()
    assert path == mgr.last_path and obj["step"] == 2


def test_load_refuses_pickled_objects(tmp_path: Path) -> None:
    p = tmp_path / "evil.pt"
    torch.save({"obj": Path("x")}, p)  # an arbitrary class: not weights_only-loadable
    with pytest.raises(UserError, match="evil.pt"):
        load(p)
    with pytest.raises(UserError, match="not found"):
        load(tmp_path / "missing.pt")


def _draws() -> tuple:
    return (
        random.random(),
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        np.random.randn(),
        torch.rand(3).tolist(),
    )


def test_rng_capture_restore_reproduces_numbers(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws()  # leave a cached gaussian in both python and numpy
    atomic_save({"rng": [capture_rng_state()]}, tmp_path / "rng.pt")
    expected = _draws()
    _draws()
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"][0])
    assert _draws() == expected


@pytest.mark.gpu
def test_cuda_rng_capture_restore() -> None:
    torch.cuda.init()
    torch.cuda.manual_seed(5)
    state = capture_rng_state()
    assert state["cuda"] is not None
    expected = torch.rand(4, device="cuda").tolist()
    torch.rand(4, device="cuda")
    restore_rng_state(state)
    assert torch.rand(4, device="cuda").tolist() == expected


def test_engine_state_round_trips_weights_only(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Embedding(2, 4))
    solver = SolverConfig(max_iters=10)
    opt = build_optimizer(model, solver)
    sched = build_scheduler(opt, solver)
    model[0](torch.randn(2, 3)).sum().backward()
    opt.step()
    sched.step()
    sampler = TrainingSampler(7, seed=1)
    sampler.set_position(9)
    state = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "step": 1,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
        "rng": [capture_rng_state(), capture_rng_state()],
        "sampler": sampler.state_dict(),
        "best_metric": None,
        "recipe": to_dict(Recipe()),
        "classes": ["a", "b"],
        "dataset": "synthetic",
    }
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, state)
    back = mgr.load(mgr.last_path)
    opt2 = build_optimizer(model, solver)
    opt2.load_state_dict(back["optimizer"])
    torch.testing.assert_close(opt2.state_dict()["state"], opt.state_dict()["state"])
    assert back["sampler"] == {"epoch": 1, "position": 2}
    assert back["recipe"] == to_dict(Recipe())


def test_check_compatible() -> None:
    base = to_dict(Recipe())
    ckpt = {"format_version": 1, "recipe": base, "classes": ["a", "b"], "dataset": "synthetic"}
    check_compatible(ckpt, base, classes=["a", "b"])  # identical: fine

    other_solver = to_dict(Recipe(solver=SolverConfig(max_iters=5, lr=1.0)))
    check_compatible(ckpt, other_solver)  # a longer/shorter schedule may change

    changed = to_dict(Recipe())
    changed["model"]["hidden_dim"] = 128
    changed["model"]["num_queries"] = 50
    with pytest.raises(UserError, match=r"model\.hidden_dim: checkpoint 256, recipe 128.*model\.num_queries"):
        check_compatible(ckpt, changed)

    ds = to_dict(Recipe())
    ds["data"]["dataset"] = "ade20k"
    with pytest.raises(UserError, match=r"data\.dataset: checkpoint 'synthetic', recipe 'ade20k'"):
        check_compatible(ckpt, ds)
    with pytest.raises(UserError, match="classes"):
        check_compatible(ckpt, base, classes=["a", "c"])

    # a key the old checkpoint lacks counts as its default (a newer schema is not a mismatch) ...
    old = {**ckpt, "recipe": {**base, "model": {k: v for k, v in base["model"].items() if k != "box_head"}}}
    check_compatible(old, base)
    # ... unless the recipe sets it to something else
    with pytest.raises(UserError, match="model.box_head"):
        check_compatible(old, {**base, "model": {**base["model"], "box_head": True}})

    with pytest.raises(UserError, match="newer"):
        check_compatible({**ckpt, "format_version": CHECKPOINT_FORMAT_VERSION + 1}, base)
    with pytest.raises(UserError, match="format_version"):
        check_compatible({"model": {}}, base)
