"""A run killed again and again (SIGKILL at random points, several while a checkpoint is being written, and a
SIGTERM) and resumed each time ends exactly as an uninterrupted run: every checkpoint on disk loads, no
partial file is left, the final weights are bit-identical and metrics.jsonl holds the same records."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_recipe import TINY

TIMING_KEYS = {"images_per_s", "eval_seconds", "max_mem_gb"}
STEPS = 40


def _wait_for_progress(proc: subprocess.Popen, run: Path, step: int, timeout: float = 120) -> None:
    """Until the run saves a checkpoint past `step` (or ends)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and _step_of(run) <= step:
        time.sleep(0.05)


def _train(run_dir: Path, data_root: Path, resume: bool, exist_ok: bool = False) -> subprocess.Popen:
    recipe = run_dir.parent / "recipe.yaml"
    recipe.write_text("name: crash\n")
    args = [sys.executable, "-m", "maskformer_cli", "train", str(recipe), *TINY, f"data.root={data_root}",
            f"solver.max_iters={STEPS}", "solver.checkpoint_every=1", "solver.keep_last=3", "solver.eval_every=20",
            "model.dropout=0.1", "solver.seed=5", "--run-dir", str(run_dir), "--device", "cpu"]
    if resume:
        args.append("--resume")
    if exist_ok:  # killed before its first checkpoint: the directory holds only logs
        args.append("--exist-ok")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _records(run_dir: Path) -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.append({k: v for k, v in rec.items() if k not in TIMING_KEYS})
    return out


def _step_of(run_dir: Path) -> int:
    try:
        return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"]
    except Exception:
        return 0


@pytest.mark.slow
def test_kill_campaign_ends_as_an_uninterrupted_run(tmp_path, data_root):
    (tmp_path / "ref").mkdir()
    ref = _train(tmp_path / "ref" / "run", data_root, resume=False)
    assert ref.wait(timeout=600) == 0, ref.stderr.read()[-2000:]

    run = tmp_path / "crash" / "run"
    run.parent.mkdir()
    rng = random.Random(0)
    kills = mid_write = 0
    sigterm_done = False
    for _attempt in range(40):
        if kills >= 10 and sigterm_done:
            break
        step = _step_of(run)
        proc = _train(run, data_root, resume=step > 0, exist_ok=run.exists() and step == 0)
        if kills % 3 == 2 or (kills >= 10 and not sigterm_done):
            # after some progress: a random point of a step, or a scheduler's pre-emption (SIGTERM)
            _wait_for_progress(proc, run, step)
            time.sleep(rng.uniform(0, 0.5))
            if kills >= 10:
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(timeout=300)
                assert code in (143, 0), proc.stderr.read()[-2000:]
                sigterm_done = True
                continue
        else:  # during a checkpoint write: wait for a partial file to appear, kill 0-20 ms later
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None:
                if (run / "checkpoints").is_dir() and list((run / "checkpoints").glob(".*.tmp")):
                    time.sleep(rng.uniform(0, 0.02))
                    mid_write += bool(list((run / "checkpoints").glob(".*.tmp")))
                    break
                time.sleep(0.002)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            kills += 1
        else:
            assert proc.returncode == 0, proc.stderr.read()[-2000:]
            break  # finished: the schedule was too short for the campaign (the assert below says so)
    assert kills >= 10 and mid_write >= 3 and sigterm_done, (kills, mid_write, sigterm_done)

    # every checkpoint on disk loads, before and after the final resume
    for p in (run / "checkpoints").glob("*.pt"):
        torch.load(p, weights_only=True)
    final = _train(run, data_root, resume=True)
    assert final.wait(timeout=600) == 0, final.stderr.read()[-2000:]
    assert not list((run / "checkpoints").glob(".*.tmp"))
    a = torch.load(tmp_path / "ref" / "run" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == STEPS
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert _records(run) == _records(tmp_path / "ref" / "run")
