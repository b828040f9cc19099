"""Training end to end on the embedded dataset: run directory, resume parity, signals, non-finite policy,
every ablation variant, and 2-rank DDP on gloo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_recipe import TINY, read_jsonl, tiny

from maskformer_cli.config import load_recipe
from maskformer_cli.errors import UserError
from maskformer_cli.trainer import train


def test_run_directory_explains_itself(tmp_path, data_root):
    recipe = tiny(data_root, "solver.max_iters=3", "solver.eval_every=3", "data.task=panoptic")
    res = train(recipe, run_dir=tmp_path / "run", quiet=True)
    run = res.run_dir
    assert res.step == 3 and not res.interrupted
    for name in ("config.yaml", "env.json", "metrics.jsonl", "results.csv", "checkpoints/last.pt",
                 "eval/step_00000003.json"):
        assert (run / name).exists(), name
    assert len(list((run / "vis").glob("*.png"))) == 4  # the val split of 20 images has 4
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 1 and env["torch"] == torch.__version__
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    ev = [r for r in records if r["kind"] == "eval"][0]
    assert {"mIoU", "PQ", "PQ_th", "PQ_st"} <= set(ev)
    # the resolved config reloads to the same recipe
    assert load_recipe(run / "config.yaml") == recipe
    # an existing run directory is not overwritten by accident
    with pytest.raises(UserError, match="already exists"):
        train(recipe, run_dir=run, quiet=True)


def test_loader_workers_stop_when_training_returns(tmp_path, data_root):
    import multiprocessing

    before = set(multiprocessing.active_children())
    recipe = tiny(data_root, "solver.max_iters=2", "solver.eval_every=2", "data.num_workers=2")
    train(recipe, run_dir=tmp_path / "run", quiet=True)
    # an ablation sweep trains many variants in one process: none may leave its workers behind
    assert set(multiprocessing.active_children()) <= before


def test_resume_equals_uninterrupted(tmp_path, data_root):
    """Stop after 2 of 4 steps, resume: the weights are bit-for-bit those of an uninterrupted run."""
    recipe = tiny(data_root, "solver.max_iters=4", "model.dropout=0.1", "solver.seed=3")
    full = train(recipe, run_dir=tmp_path / "full", quiet=True)
    part = train(recipe, run_dir=tmp_path / "part", quiet=True, stop_after=2)
    assert part.interrupted and part.step == 2
    resumed = train(recipe, run_dir=tmp_path / "part", resume=True, quiet=True)
    assert resumed.step == 4
    a = torch.load(full.run_dir / "checkpoints/last.pt", weights_only=True)
    b = torch.load(resumed.run_dir / "checkpoints/last.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    losses_full = [r["loss"] for r in read_jsonl(full.run_dir / "metrics.jsonl") if r["kind"] == "train"]
    losses_part = [r["loss"] for r in read_jsonl(resumed.run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert losses_full == losses_part


def test_resume_after_a_crash_logs_each_step_once_and_cleans_partial_checkpoints(tmp_path, data_root):
    """A run killed after step 5 (last checkpoint: step 4), mid-way through writing a checkpoint: the resumed
    run's metrics.jsonl holds every step once, with the losses of an uninterrupted run, and the partial
    checkpoint file is gone."""
    import shutil

    recipe = tiny(data_root, "solver.max_iters=6", "solver.checkpoint_every=2", "solver.keep_last=0",
                  "solver.seed=3")
    full = train(recipe, run_dir=tmp_path / "full", quiet=True)
    crashed = tmp_path / "crashed"
    shutil.copytree(full.run_dir, crashed)
    ckpts = crashed / "checkpoints"
    (ckpts / "step_00000006.pt").unlink()
    for name in ("last.pt", "best.pt"):
        shutil.copy(ckpts / "step_00000004.pt", ckpts / name)
    records = read_jsonl(crashed / "metrics.jsonl")
    kept = [r for r in records if r.get("step", 0) <= 5]
    (crashed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"kind": "tr')
    (ckpts / ".step_00000006.pt.x1y2.tmp").write_bytes(b"partial" * 1000)
    resumed = train(recipe, run_dir=crashed, resume=True, quiet=True)
    assert resumed.step == 6
    steps = [r["step"] for r in read_jsonl(crashed / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [r["step"] for r in records if r["kind"] == "train"] and len(steps) == len(set(steps))
    losses = [r["loss"] for r in read_jsonl(crashed / "metrics.jsonl") if r["kind"] == "train"]
    assert losses == [r["loss"] for r in records if r["kind"] == "train"]
    assert not list(ckpts.glob(".*.tmp"))


def test_resume_refuses_a_different_model(tmp_path, data_root):
    recipe = tiny(data_root, "solver.max_iters=2")
    train(recipe, run_dir=tmp_path / "r", quiet=True, stop_after=1)
    other = tiny(data_root, "solver.max_iters=2", "model.num_queries=6")
    with pytest.raises(UserError, match="num_queries"):
        train(other, run_dir=tmp_path / "r", resume=True, quiet=True)


def test_nonfinite_loss_policy(tmp_path, data_root, monkeypatch):
    """Non-finite losses skip the step (weights untouched) a few times, then stop with a clear error."""
    import maskformer_cli.trainer as train_mod

    real = train_mod.build_criterion

    def poisoned(*args, **kwargs):
        crit = real(*args, **kwargs)
        orig = crit.forward

        def forward(outputs, targets):
            return {k: v * float("nan") for k, v in orig(outputs, targets).items()}

        crit.forward = forward
        return crit

    monkeypatch.setattr(train_mod, "build_criterion", poisoned)
    recipe = tiny(data_root, "solver.max_iters=10", "solver.max_bad_steps=2")
    with pytest.raises(UserError, match="non-finite"):
        train(recipe, run_dir=tmp_path / "nan", quiet=True)
    assert not list((tmp_path / "nan/checkpoints").glob("step_*.pt"))


VARIANTS = {
    "fixed_matching": ["loss.matcher=fixed", "model.num_queries=6"],
    "box_matching": ["loss.matcher=box", "model.box_head=true"],
    "one_decoder_layer": ["model.dec_layers=1"],
    "no_self_attention": ["model.dec_self_attn=false"],
    "per_pixel_baseline": ["model.meta_architecture=per_pixel_baseline"],
    "per_pixel_baseline_plus": ["model.meta_architecture=per_pixel_baseline_plus", "model.num_queries=6"],
    "six_enc": ["model.pixel_decoder=transformer_encoder_fpn", "model.encoder_layers=1"],
    "point_loss": ["loss.num_points=64"],
    "grad_accum": ["solver.grad_accum=2", "solver.batch_size=4"],
    # CPU autocast; on a GPU the same code paths run under CUDA autocast (fp16 with the grad scaler)
    "bf16": ["solver.precision=bf16"],
    "fp16": ["solver.precision=fp16"],
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_trains_two_steps(tmp_path, data_root, name):
    task = "data.task=panoptic" if name == "box_matching" else "data.task=semantic"
    recipe = tiny(data_root, "solver.max_iters=2", "solver.eval_every=2", task, *VARIANTS[name])
    res = train(recipe, run_dir=tmp_path / name, quiet=True)
    losses = [r["loss"] for r in read_jsonl(res.run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert res.metrics["mIoU"] >= 0


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "maskformer_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, **kw)


@pytest.mark.parametrize("signum, to_group", [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGTERM, True)],
                         ids=["SIGTERM", "SIGINT", "SIGTERM-to-group-with-workers"])
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, data_root, signum, to_group):
    """A pre-empted run saves a checkpoint, says so in one line (no traceback) and exits 128 + signal (143 for
    SIGTERM, 130 for SIGINT), so `train && evaluate` and schedulers do not take it for a finished run. Schedulers
    often signal the whole process group: the data-loader workers get the SIGTERM too and must not die of it
    before the main process has saved."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: tiny\n")
    workers = ["data.num_workers=1"] if to_group else []
    proc = _cli("train", str(recipe), *TINY, *workers, f"data.root={data_root}", "solver.max_iters=100000",
                "--run-dir", str(tmp_path / "run"), "--device", "cpu", start_new_session=to_group)
    deadline = time.monotonic() + 120
    lines = []
    for line in proc.stdout:  # wait until training is under way
        lines.append(line)
        if line.startswith("step ") or time.monotonic() > deadline:
            break
    if to_group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, "".join(lines) + out
    assert "checkpoint saved. Continue with --resume" in out and "Traceback" not in out
    ckpt = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert 1 <= ckpt["step"] < 100000


DDP_SCRIPT = r"""
import json, sys, torch
from maskformer_cli import distributed as dist
from maskformer_cli.config import load_recipe
from maskformer_cli.trainer import train
overrides, out, variants = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
dist.init_distributed("cpu")
torch.set_num_threads(1)
report = {}
for name, extra in variants.items():
    res = train(load_recipe(None, overrides + extra), run_dir=f"{out}/{name}", quiet=True, exist_ok=True)
    report[name] = {"metrics": {k: v for k, v in res.metrics.items() if isinstance(v, float)}}
if dist.get_rank() == 0:
    json.dump(report, open(f"{out}/report.json", "w"))
dist.cleanup(sync=True)
"""


@pytest.mark.distributed
def test_two_rank_ddp_matches_single_process(tmp_path, data_root):
    """2 ranks on gloo: parameters identical across ranks, eval metrics equal a single-process evaluation."""
    from maskformer_cli.data.build import build_eval_loader, dataset_info
    from maskformer_cli.engine import default_metrics, evaluate
    from maskformer_cli.postprocess import build_postprocessor
    from maskformer_cli.weights import load_for_inference

    overrides = [*TINY, f"data.root={data_root}", "solver.max_iters=2", "solver.eval_every=2",
                 "solver.batch_size=4", "data.task=panoptic"]
    variants = {"maskformer": [], "no_self_attention": ["model.dec_self_attn=false"],
                "box_matching": ["loss.matcher=box", "model.box_head=true"],
                "per_pixel_baseline_plus": ["model.meta_architecture=per_pixel_baseline_plus", "model.num_queries=6"]}
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # KNOWN FLAKE: in 2 of ~6 full-suite runs under xdist (never alone, never under a plain CPU load) one
    # rank aborted in C++ at exit, 'terminate called without an active exception', after its work was done.
    # dist.cleanup(sync=True) now meets at a barrier before tearing gloo down, which should remove it; not
    # yet proven over many runs, so that abort, and only that, is retried once in a fresh folder (any other
    # failure, or the abort twice, fails the test).
    for attempt in range(2):
        out = tmp_path / f"attempt{attempt}"
        r = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--log-dir", str(tmp_path / "torchrun"),
             "--nproc-per-node", "2", "--standalone", str(script),
             json.dumps(overrides), str(out), json.dumps(variants)],
            capture_output=True, text=True, timeout=600, env=env)
        if r.returncode == 0 or "terminate called without an active exception" not in r.stdout + r.stderr:
            break
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for name in variants:
        ckpt_path = out / name / "checkpoints/last.pt"
        ckpt = torch.load(ckpt_path, weights_only=True)
        assert ckpt["step"] == 2
        # every checkpoint under DDP records whether all ranks held identical parameters
        assert ckpt["ddp_params_identical"] is True, name
        loaded = load_for_inference(ckpt_path, torch.device("cpu"))
        recipe = loaded.recipe
        info = dataset_info(recipe.data)
        # one thread, as each rank ran: a convolution split over other thread counts rounds differently,
        # and a per-pixel argmax near a tie then flips a pixel (mIoU off by ~1e-3)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            single = evaluate(loaded.model, build_eval_loader(recipe.data, info, num_workers=0),
                              default_metrics(recipe.data.task, recipe.model.meta_architecture == "maskformer"),
                              build_postprocessor(recipe.inference, info), device=torch.device("cpu"))
        finally:
            torch.set_num_threads(threads)
        for key, value in report[name]["metrics"].items():
            if key in single and key != "eval_seconds":
                assert single[key] == pytest.approx(value, abs=1e-9), (name, key)


def test_init_from_reinitialises_only_the_class_head(tmp_path, data_root):
    """Fine-tuning on a dataset with another class count keeps every weight but the classifier."""
    src = train(tiny(data_root, "solver.max_iters=1"), run_dir=tmp_path / "src", quiet=True)
    ckpt = src.run_dir / "checkpoints/last.pt"
    other = tiny(data_root, "solver.max_iters=1", "data.synthetic_num_classes=4", "solver.lr=1e-12")
    res = train(other, run_dir=tmp_path / "dst", init_from=ckpt, quiet=True)
    a = torch.load(ckpt, weights_only=True)["model"]
    b = torch.load(res.run_dir / "checkpoints/last.pt", weights_only=True)["model"]
    differ = sorted(k for k in a if a[k].shape != b[k].shape)
    assert differ and all("class" in k for k in differ)
    same = [k for k in a if a[k].shape == b[k].shape and a[k].is_floating_point() and "running" not in k]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in same)


GOLDEN = Path(__file__).parent / "data" / "golden_loss.json"


def test_golden_loss_curve(tmp_path, data_root):
    """A fixed tiny recipe reproduces the recorded loss curve (catches silent changes to model, matcher,
    losses, data or augmentation). Regenerate with MASKFORMER_UPDATE_GOLDEN=1 after an intended change (last:
    the reference's "choice" scale sampling became the default; with data.scale_sampling=uniform the old curve
    still matched, so nothing else had changed)."""
    recipe = tiny(data_root, "solver.max_iters=6", "solver.seed=1", "solver.deterministic=true")
    res = train(recipe, run_dir=tmp_path / "g", quiet=True)
    losses = [r["loss"] for r in read_jsonl(res.run_dir / "metrics.jsonl") if r["kind"] == "train"]
    if os.environ.get("MASKFORMER_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"torch": torch.__version__, "losses": losses}, indent=1))
    golden = json.loads(GOLDEN.read_text())
    assert losses == pytest.approx(golden["losses"], rel=1e-3)
    assert losses[-1] < losses[0]
