"""Rank helpers in one process, and the collectives under a real 2-process torchrun job (gloo on CPU)."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from maskformer_cli import distributed as D
from maskformer_cli import launch as L
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
    assert L.strip_option(argv, "--gpus") == [
        "train",
        "r.yaml",
        "solver.lr=1",
        "--resume",
        "--",
        "--gpus",
        "9",
    ]
    assert L.strip_option(["--gpusx", "1"], "--gpus") == ["--gpusx", "1"]
    cmd = L.torchrun_command(2, ["train", "r.yaml", "--gpus", "2"])
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
        L.relaunch_with_torchrun(2, ["train", "x.yaml"])


# Runs as each rank of the torchrun job; every rank writes what it observed to OUT/rank{r}.json.
_WORKER = textwrap.dedent(
    """
    import json, math, sys
    import torch
    from maskformer_cli import distributed as D
    from maskformer_cli import launch as L

    out, mode, device = sys.argv[1], sys.argv[2], sys.argv[3]
    info = D.init_distributed(device)
    r, w = info.rank, info.world_size
    if mode == "fail" and r == 1:
        sys.exit(3)
    if mode == "stop":  # as `train` exits after saving a checkpoint on SIGTERM
        sys.exit(143)
    if mode == "usererror":  # as `train` handles a UserError on one rank (see commands/train.run_train)
        if r == 0:
            L.report_user_error("rank 0 says: fix the input")
            sys.exit(1)
        try:
            D.barrier()  # the peer is gone: "Connection closed"
        except Exception:
            if L.peer_reported_user_error():
                sys.exit(1)
            raise
    res = {"rank": r, "world": w, "local_rank": info.local_rank, "is_main": info.is_main,
           "get_rank": D.get_rank(), "get_world_size": D.get_world_size()}
    dev = info.device  # NCCL needs tensors on this rank's GPU
    res["device"] = str(dev)
    t = torch.tensor([float(r + 1), 10.0 * (r + 1)], device=dev)
    res["sum"] = D.all_reduce_sum(t).tolist()
    # a tensor off the backend's device (a metric's CPU state under NCCL, a CUDA one under gloo) travels
    other = torch.device("cuda", 0) if dev.type == "cpu" and torch.cuda.is_available() else torch.device("cpu")
    e = torch.tensor([float(r + 1)], device=other)
    res["sum_elsewhere"] = [D.all_reduce_sum(e).tolist(), str(e.device)]
    res["gathered"] = D.all_gather_object({"rank": r, "shard": D.shard_indices(11, r, w)})
    res["broadcast"] = D.broadcast_object(f"from {r}")
    # only rank 1 sees a NaN / an inf; every rank must agree to skip
    res["nonfinite_nan"] = D.any_nonfinite(torch.tensor(float("nan") if r == w - 1 else 1.0, device=dev))
    res["nonfinite_inf"] = D.any_nonfinite(torch.tensor([1.0, math.inf] if r == 0 else [2.0, 3.0], device=dev))
    res["nonfinite_none"] = D.any_nonfinite(torch.tensor(float(r), device=dev))
    D.barrier()
    with open(f"{out}/rank{r}.json", "w") as f:
        json.dump(res, f)
    D.cleanup(sync=True)
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
    # a temp dir of its own, to see that the job leaves nothing there (torchrun's log folder included)
    sys_tmp = out.parent / "sys-tmp"
    sys_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(sys_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(sys_tmp))
    rc = L.relaunch_with_torchrun(
        2, [str(out), "ok", "cpu", "--gpus", "2"], module="_mf_dist_worker", timeout=240
    )
    assert rc == 0
    assert sorted(p.name for p in sys_tmp.iterdir()) == []
    res = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r, x in enumerate(res):
        assert (x["rank"], x["world"], x["local_rank"], x["is_main"]) == (r, 2, r, r == 0)
        assert (x["get_rank"], x["get_world_size"]) == (r, 2)
        assert x["sum"] == [3.0, 30.0] and x["sum_elsewhere"] == [[3.0], "cpu"]
        assert x["gathered"] == [
            {"rank": 0, "shard": list(range(0, 6))},
            {"rank": 1, "shard": list(range(6, 11))},
        ]
        assert x["broadcast"] == "from 0"
        assert x["nonfinite_nan"] is True and x["nonfinite_inf"] is True and x["nonfinite_none"] is False
    assert not math.isnan(res[0]["sum"][0])


@pytest.mark.gpu
@pytest.mark.distributed
def test_gloo_ranks_reduce_cuda_tensors_through_the_cpu(worker_module: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other half of all_reduce_sum's device handling, on a machine with a GPU: 2 gloo ranks (CPU
    training) sum a CUDA tensor, which travels to the CPU and back (under NCCL, CPU metric states travel to the
    GPU: that needs 2 GPUs)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the parent's GPU count is not checked
    rc = L.relaunch_with_torchrun(2, [str(worker_module), "ok", "cpu"], module="_mf_dist_worker", timeout=240)
    assert rc == 0
    for r in range(2):
        x = json.loads((worker_module / f"rank{r}.json").read_text())
        assert x["sum"] == [3.0, 30.0] and x["sum_elsewhere"] == [[3.0], "cuda:0"]


@pytest.mark.distributed
def test_relaunch_reports_a_failed_rank(worker_module: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = L.relaunch_with_torchrun(
        2, [str(worker_module), "fail", "cpu"], module="_mf_dist_worker", timeout=240
    )
    assert rc != 0
    assert not (worker_module / "rank1.json").exists()


@pytest.mark.gpu
@pytest.mark.distributed
def test_nccl_single_rank_under_torchrun(worker_module: Path) -> None:
    # one GPU is enough to run the NCCL code path (a process group is created even for one rank)
    rc = L.relaunch_with_torchrun(
        1, [str(worker_module), "ok", "cuda"], module="_mf_dist_worker", timeout=240
    )
    assert rc == 0
    x = json.loads((worker_module / "rank0.json").read_text())
    assert x["device"] == "cuda:0" and (x["rank"], x["world"]) == (0, 1)
    assert x["sum"] == [1.0, 10.0] and x["gathered"] == [{"rank": 0, "shard": list(range(11))}]
    assert x["sum_elsewhere"] == [[1.0], "cpu"]
    assert x["nonfinite_nan"] is True and x["nonfinite_inf"] is True and x["nonfinite_none"] is False


def test_launcher_exit_codes() -> None:
    """How the launcher reads its ranks' exit codes: a reported UserError or a stop by SIGINT / SIGTERM is
    explained (no torchrun report) and exits as a single process would; anything else is a failure."""
    report = [{"rank": 1, "time": 0.0, "message": "bad"}]
    assert L.launcher_exit({0: -15, 1: 1}, report) == (1, True)
    assert L.launcher_exit({0: 143, 1: 143}, []) == (143, True)
    assert L.launcher_exit({1: 130}, []) == (130, True)
    assert L.launcher_exit({0: -15, 1: 143}, []) == (143, True)  # killed by the signal, or saved and exited
    assert L.launcher_exit({0: 143, 1: 1}, []) == (1, False)  # one rank crashed
    assert L.launcher_exit({0: 3}, []) == (1, False)
    assert [L.stop_signal_of(c) for c in (130, 143, -2, -15, 0, 1, 137, -9)] == [2, 15, 2, 15, None, None, None, None]


def test_relaunch_result(capsys: pytest.CaptureFixture[str]) -> None:
    reports = [{"rank": 0, "time": 2.0, "message": "from rank 0"}, {"rank": 1, "time": 1.0, "message": "from 1"}]
    with pytest.raises(UserError, match="^from rank 0$"):
        L.relaunch_result(1, reports)
    assert L.relaunch_result(143, []) == 143
    assert capsys.readouterr().err.strip() == "the torchrun job stopped on SIGTERM (exit code 143)"
    assert L.relaunch_result(1, []) == 1 and L.relaunch_result(0, []) == 0
    assert not capsys.readouterr().err


def test_rank_reports_put_rank_0_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(L.RANK_REPORTS_ENV, str(tmp_path))
    assert not L.report_user_error("not relaunched")  # outside torchrun: the caller prints it
    for rank in (2, 0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        assert L.report_user_error(f"r{rank}")
    assert [r["message"] for r in L.rank_reports()] == ["r0", "r2", "r1"]
    assert L.peer_reported_user_error()


@pytest.mark.distributed
def test_relaunch_keeps_the_stop_signal_exit_code(
    worker_module: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = L.relaunch_with_torchrun(2, [str(worker_module), "stop", "cpu"], module="_mf_dist_worker", timeout=240)
    assert rc == 143
    err = capfd.readouterr().err
    assert "stopped on SIGTERM (exit code 143)" in err
    assert "ChildFailedError" not in err and "Traceback" not in err and "exitcode" not in err, err


@pytest.mark.distributed
def test_relaunch_turns_a_ranks_user_error_into_one_line(
    worker_module: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="rank 0 says: fix the input"):
        L.relaunch_with_torchrun(2, [str(worker_module), "usererror", "cpu"], module="_mf_dist_worker", timeout=240)
    err = capfd.readouterr().err
    assert "ChildFailedError" not in err and "Traceback" not in err and "exitcode" not in err, err
