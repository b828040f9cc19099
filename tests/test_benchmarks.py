"""The benchmark scripts still run (tiny sizes, one step): they are what a GPU session runs first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "benchmarks"


def _run(script: str, *args: str, timeout: int = 600) -> str:
    r = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                       timeout=timeout, cwd=BENCH.parent)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def test_bench_mask_loss_runs_and_checks_agreement():
    out = _run("bench_mask_loss.py", "--masks", "3", "--size", "64", "--layers", "2", "--steps", "1",
               "--device", "cpu")
    assert "fused is" in out and "plain" in out


@pytest.mark.slow
def test_bench_train_step_runs():
    pytest.importorskip("transformers")
    out = _run("bench_train_step.py", "--size", "64", "--steps", "1", "--device", "cpu", "--precision", "bf16",
               "--cuda-graphs")
    assert out.count("speed-up") == 4 and out.count("maskformer_graphs") == 2 and "matcher share" in out


@pytest.mark.slow
def test_bench_inference_runs_both_modes():
    pytest.importorskip("transformers")
    out = _run("bench_inference.py", "--size", "64", "--rounds", "1", "--device", "cpu")
    assert out.count("image -> labels ") == 2 and "pixel agreement" in out and "labels identical: True" in out
    out = _run("bench_inference.py", "--mode", "predict", "--images", "2", "--rounds", "1", "--device", "cpu")
    assert "transformers loop" in out and "maskformer predict --no-overlays" in out


@pytest.mark.slow
def test_bench_inference_backends_mode_runs():
    for module in ("transformers", "onnxscript", "onnxruntime", "openvino"):
        pytest.importorskip(module)
    out = _run("bench_inference.py", "--mode", "backends", "--size", "64", "--rounds", "1", "--device", "cpu")
    for name in ("transformers fp32", "ours torch fp32", "onnxruntime fp32", "openvino fp32", "openvino bf16"):
        assert name in out
    assert out.count("100.00%") >= 3  # torch fp32 itself, and the fp32 backends agree with torch fp32 on every pixel


@pytest.mark.slow
def test_bench_quickstart_step_runs(tmp_path):
    """On the quickstart recipe itself: a change of a build_* signature must not leave it broken unnoticed."""
    out = _run("bench_quickstart_step.py", "--steps", "1", "--threads", "1", "--root", str(tmp_path),
               "--variant", "fp32:", "--variant", "bf16_cl:solver.precision=bf16,channels_last=true")
    assert "fp32" in out and "bf16_cl" in out and out.count("img/s") == 2


def test_bench_metrics_runs_and_checks_agreement():
    out = _run("bench_metrics.py", "--images", "2", "--size", "64", "--repeat", "1")
    assert "equal to panopticapi within 1e-9" in out and "mIoU update" in out
