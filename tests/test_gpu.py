"""CUDA paths: training at every precision, `train --gpus N` under torchrun with NCCL, the fused mask loss.

Marked gpu: skipped without a CUDA device. On a GPU machine: `python -m pytest -q -m gpu`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_recipe import read_jsonl, tiny

from maskformer_cli.config import dump_recipe
from maskformer_cli.losses_fused import focal_dice_loss
from maskformer_cli.trainer import train

pytestmark = pytest.mark.gpu


def _train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"]


def test_fused_mask_loss_on_cuda_equals_float64_cpu():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 32, 40, generator=g, dtype=torch.float64) * 4
    targets = torch.rand(7, 128, 160, generator=g) > 0.5
    results = []
    for device, dtype in (("cpu", torch.float64), ("cuda", torch.float32)):
        x = logits.to(device, dtype).detach().requires_grad_()
        focal, dice = focal_dice_loss(x, targets.to(device))
        (20 * focal.sum() + dice.sum()).backward()
        results.append([t.detach().double().cpu() for t in (focal, dice, x.grad)])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_tiny_training_on_cuda(tmp_path, data_root, precision):
    recipe = tiny(data_root, "solver.max_iters=4", "solver.eval_every=4", f"solver.precision={precision}")
    res = train(recipe, run_dir=tmp_path / precision, device="cuda", quiet=True)
    losses = _train_losses(res.run_dir)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    env = json.loads((res.run_dir / "env.json").read_text())
    assert env["device"].startswith("cuda") and env["cuda"]
    assert any((res.run_dir / "checkpoints").glob("*.pt"))


def test_fp16_and_bf16_start_where_fp32_starts(tmp_path, data_root):
    """Same weights, same first batch: autocast changes the first loss by rounding only."""
    first = {}
    for precision in ("fp32", "bf16", "fp16"):
        recipe = tiny(data_root, "solver.max_iters=1", "solver.seed=3", f"solver.precision={precision}")
        first[precision] = _train_losses(train(recipe, run_dir=tmp_path / precision, device="cuda",
                                               quiet=True).run_dir)[0]
    assert first["fp16"] == pytest.approx(first["fp32"], rel=2e-2)
    assert first["bf16"] == pytest.approx(first["fp32"], rel=5e-2)


def test_cli_gpus_relaunches_under_torchrun_with_nccl(tmp_path, data_root):
    n = torch.cuda.device_count()
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(dump_recipe(tiny(data_root, "solver.max_iters=2", f"solver.batch_size={2 * n}")))
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "maskformer_cli", "train", str(recipe), "--gpus", str(n),
                        "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    env = json.loads((run_dir / "env.json").read_text())
    assert env["world_size"] == n and env["device"] == "cuda:0"
    assert len(_train_losses(run_dir)) == 2
