"""Rank helpers in one process, and the collectives under a real 2-process torchrun job (gloo on CPU)."""

from __future__ import annotations

import json
import math
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from maskformer_cli import distributed as D
from maskformer_cli.errors import UserError


@pytest.fixture
def no_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("n,world", [(10, 3), (3, 5), (0, 2), (7, 1), (100, 8)])
def test_shard_indices_is_an_exact_partition(n: int, world: int) -> None:
    shards = [D.shard_indices(n, r, world) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(n)) and len(flat) == n  # disjoint and complete, no padding
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert all(s == list(range(s[0], s[-1] + 1)) for s in shards if s)  # contiguous
    with pytest.raises(ValueError):
        D.shard_indices(n, world, world)


def test_single_process_helpers(no_torchrun: None) -> None:
    info = D.init_distributed("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (0, 1, 0, True)
    assert info.device == torch.device("cpu")
    assert (D.get_rank(), D.get_world_size(), D.is_main()) == (0, 1, True)
    D.barrier()
    t = torch.tensor([1.0, 2.0])
    assert D.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert D.all_gather_object({"a": 1}) == [{"a": 1}]
    assert D.broadcast_object("x") == "x"
    assert D.any_nonfinite(torch.tensor([1.0, float("nan")]))
    assert D.any_nonfinite(float("inf"))
    assert not D.any_nonfinite(torch.tensor(3.0))
    D.cleanup()
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            D.init_distributed("cuda")
    with pytest.raises(UserError, match="device"):
        D.init_distributed("tpu")
    assert D.resolve_device("cpu") == torch.device("cpu")
    assert D.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_strip_option_and_command() -> None:
    argv = ["train", "r.yaml", "--gpus", "4", "solver.lr=1", "--gpus=2", "--resume", "--", "--gpus", "9"]
    assert D.strip_option(argv, "--gpus") == [
        "train",
        "r.yaml",
        "solver.lr=1",
        "--resume",
        "--",
        "--gpus",
        "9",
    ]
    assert D.strip_option(["--gpusx", "1"], "--gpus") == ["--gpusx", "1"]
    cmd = D.torchrun_command(2, ["train", "r.yaml", "--gpus", "2"])
    assert cmd[:2] == [sys.executable, "-m"]
    assert cmd[2:] == [
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--standalone",
        "-m",
        "maskformer_cli",
        "train",
        "r.yaml",
    ]


def test_relaunch_refuses_inside_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for var, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(UserError, match="already distributed"):
        D.relaunch_with_torchrun(2, ["train", "x.yaml"])


# Runs as each rank of the torchrun job; every rank writes what it observed to OUT/rank{r}.json.
_WORKER = textwrap.dedent(
    """
    import json, math, sys
    import torch
    from maskformer_cli import distributed as D

    out, mode, device = sys.argv[1], sys.argv[2], sys.argv[3]
    info = D.init_distributed(device)
    r, w = info.rank, info.world_size
    if mode == "fail" and r == 1:
        sys.exit(3)
    res = {"rank": r, "world": w, "local_rank": info.local_rank, "is_main": info.is_main,
           "get_rank": D.get_rank(), "get_world_size": D.get_world_size()}
    dev = info.device  # NCCL needs tensors on this rank's GPU
    res["device"] = str(dev)
    t = torch.tensor([float(r + 1), 10.0 * (r + 1)], device=dev)
    res["sum"] = D.all_reduce_sum(t).tolist()
    res["gathered"] = D.all_gather_object({"rank": r, "shard": D.shard_indices(11, r, w)})
    res["broadcast"] = D.broadcast_object(f"from {r}")
    # only rank 1 sees a NaN / an inf; every rank must agree to skip
    res["nonfinite_nan"] = D.any_nonfinite(torch.tensor(float("nan") if r == w - 1 else 1.0, device=dev))
    res["nonfinite_inf"] = D.any_nonfinite(torch.tensor([1.0, math.inf] if r == 0 else [2.0, 3.0], device=dev))
    res["nonfinite_none"] = D.any_nonfinite(torch.tensor(float(r), device=dev))
    D.barrier()
    with open(f"{out}/rank{r}.json", "w") as f:
        json.dump(res, f)
    D.cleanup()
    """
)


@pytest.fixture
def worker_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_torchrun: None) -> Path:
    mod_dir = tmp_path / "mod"
    mod_dir.mkdir()
    (mod_dir / "_mf_dist_worker.py").write_text(_WORKER)
    paths = [str(mod_dir), str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    out = tmp_path / "out"
    out.mkdir()
    return out


@pytest.mark.distributed
def test_collectives_agree_across_two_gloo_ranks(
    worker_module: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = worker_module
    # the parent has no CUDA restriction to check against; relaunch is what `train --gpus 2` calls
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = D.relaunch_with_torchrun(
        2, [str(out), "ok", "cpu", "--gpus", "2"], module="_mf_dist_worker", timeout=240
    )
    assert rc == 0
    res = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r, x in enumerate(res):
        assert (x["rank"], x["world"], x["local_rank"], x["is_main"]) == (r, 2, r, r == 0)
        assert (x["get_rank"], x["get_world_size"]) == (r, 2)
        assert x["sum"] == [3.0, 30.0]
        assert x["gathered"] == [
            {"rank": 0, "shard": list(range(0, 6))},
            {"rank": 1, "shard": list(range(6, 11))},
        ]
        assert x["broadcast"] == "from 0"
        assert x["nonfinite_nan"] is True and x["nonfinite_inf"] is True and x["nonfinite_none"] is False
    assert not math.isnan(res[0]["sum"][0])


@pytest.mark.distributed
def test_relaunch_reports_a_failed_rank(worker_module: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = D.relaunch_with_torchrun(
        2, [str(worker_module), "fail", "cpu"], module="_mf_dist_worker", timeout=240
    )
    assert rc != 0
    assert not (worker_module / "rank1.json").exists()


@pytest.mark.gpu
@pytest.mark.distributed
def test_nccl_single_rank_under_torchrun(worker_module: Path) -> None:
    # one GPU is enough to run the NCCL code path (a process group is created even for one rank)
    rc = D.relaunch_with_torchrun(
        1, [str(worker_module), "ok", "cuda"], module="_mf_dist_worker", timeout=240
    )
    assert rc == 0
    x = json.loads((worker_module / "rank0.json").read_text())
    assert x["device"] == "cuda:0" and (x["rank"], x["world"]) == (0, 1)
    assert x["sum"] == [1.0, 10.0] and x["gathered"] == [{"rank": 0, "shard": list(range(11))}]
    assert x["nonfinite_nan"] is True and x["nonfinite_inf"] is True and x["nonfinite_none"] is False
