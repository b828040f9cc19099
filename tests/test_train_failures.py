"""Training on a practitioner's own data: bad files, runs that fail to start or to evaluate, relative spec
paths, --init-from without ImageNet weights, resuming a finished run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tiny_recipe import TINY, read_jsonl, tiny

import maskformer_cli.trainer as train_mod
from maskformer_cli.config import recipe_from_dict
from maskformer_cli.data.build import dataset_info
from maskformer_cli.errors import UserError
from maskformer_cli.step_policy import MAX_SAMPLELESS_STEPS
from maskformer_cli.trainer import train


def make_custom(root: Path, *, splits=("train", "val"), n: int = 4, missing_label=(), bad_value=(),
                label_suffix: str = "") -> Path:
    """A custom semantic dataset of 64x64 images (3 classes) and its spec; returns the spec path.
    missing_label / bad_value: train stems whose label PNG is absent / holds class 7."""
    rng = np.random.default_rng(0)
    for split in splits:
        for i in range(n if split == "train" else 2):
            stem = f"{split}{i}"
            (root / "img" / split).mkdir(parents=True, exist_ok=True)
            (root / "lbl" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "img" / split / f"{stem}.png")
            label = rng.integers(0, 3, (64, 64)).astype(np.uint8)
            if stem in bad_value:
                label[5, 5] = 7
            if stem not in missing_label:
                Image.fromarray(label).save(root / "lbl" / split / f"{stem}.png")
    spec = {"name": "mine", "classes": ["a", "b", "c"], "ignore_label": 255,
            "semantic": {s: {"images": f"img/{s}", "labels": f"lbl/{s}", "label_suffix": label_suffix} for s in splits}}
    path = root / "sem.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _train_split_bad(spec: Path) -> Path:
    """With label_suffix '_mask' and labels without it, every sample is bad; give the validation labels the
    suffix, so only the train split is: a bad validation split now stops the run at start (its files are
    checked before the first step), and these tests are about training samples."""
    for label in (spec.parent / "lbl" / "val").glob("*.png"):
        label.rename(label.with_name(f"{label.stem}_mask.png"))
    return spec


def _finite(values: list) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]  # a skipped step's loss is logged as null


def custom_recipe(data_root, spec: Path | str, *extra: str):
    return tiny(data_root, f"data.dataset={spec}", *extra)


# ------------------------------------------------------------------------------------------- bad samples


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_with_batch_size_one_are_skipped_and_named(tmp_path, data_root, capsys, workers):
    """batch_size=1: a bad file makes an empty batch, which is skipped (no crash); the report names each bad
    file once with its reason, however often it came round, also from loader worker processes."""
    spec = make_custom(tmp_path / "d", missing_label=("train1",), bad_value=("train2",))
    recipe = custom_recipe(data_root, spec, "solver.batch_size=1", "solver.max_iters=8", f"data.num_workers={workers}")
    res = train(recipe, run_dir=tmp_path / "run", quiet=False)
    assert res.step == 8 and torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)["step"] == 8
    err = " ".join(capsys.readouterr().err.split())
    # 8 samples of a 4-image set: every image comes round twice, each bad one is named once
    assert "2 training files were skipped (4 times in all; 4 steps" in err, err
    assert "train1.png" in err and "train2.png" in err and "values [7] outside 0..2" in err
    assert f"maskformer prepare-data custom --check {spec}" in err
    assert "unreadable training samples" not in err
    losses = [r["loss"] for r in read_jsonl(tmp_path / "run/metrics.jsonl") if r["kind"] == "train"]
    assert len(_finite(losses)) == 4  # the 4 steps with a readable sample trained


def test_train_step_leaves_out_an_empty_micro_batch(data_root):
    """With gradient accumulation, a micro-batch of bad files only is left out: the step equals one over the
    readable micro-batch alone. Only empty micro-batches make an empty, skipped step."""
    import copy

    from maskformer_cli.criterion import build_criterion
    from maskformer_cli.data.build import build_train_loader
    from maskformer_cli.data.collate import collate
    from maskformer_cli.engine import train_step
    from maskformer_cli.models import build_model
    from maskformer_cli.optim import build_optimizer

    recipe = tiny(data_root)
    info = dataset_info(recipe.data)
    batch = next(iter(build_train_loader(recipe.data, info, batch_size=2, seed=0, rank=0, world_size=1)))
    empty = collate([None, None])
    model = build_model(recipe.model, info.num_classes)
    results, weights = [], []
    for micro in ([batch], [empty, batch], [empty]):
        m = copy.deepcopy(model)
        results.append(train_step(m, build_criterion(recipe.loss, info.num_classes), build_optimizer(m, recipe.solver),
                                  micro, device=torch.device("cpu")))
        weights.append(m.state_dict())
    alone, mixed, none = results
    assert not mixed.skipped and mixed.total == alone.total and (mixed.samples, alone.samples) == (2, 2)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert none.skipped and none.empty and none.samples == 0
    assert all(torch.equal(weights[2][k], v) for k, v in model.state_dict().items())  # untouched


def test_every_sample_bad_stops_with_a_clear_error(tmp_path, data_root):
    """A wrong label_suffix makes every training sample bad: a UserError naming files, no traceback."""
    spec = _train_split_bad(make_custom(tmp_path / "d", label_suffix="_mask"))  # the labels have no suffix
    recipe = custom_recipe(data_root, spec, "solver.batch_size=1", "solver.max_iters=100")
    with pytest.raises(UserError) as e:
        train(recipe, run_dir=tmp_path / "run", quiet=True)
    msg = str(e.value)
    assert f"no training sample could be read in {MAX_SAMPLELESS_STEPS} steps in a row" in msg
    assert "train0_mask.png" in msg or "train1_mask.png" in msg or "train2_mask.png" in msg
    assert f"prepare-data custom --check {spec}" in msg
    assert not list((tmp_path / "run/checkpoints").iterdir())


# ---------------------------------------------------------------------------- failures at start and at the end


def test_a_short_schedule_of_bad_files_only_does_not_end_as_a_success(tmp_path, data_root):
    """Fewer steps than the stop limit, none with a sample: an error, not an untrained 'finished' model."""
    spec = _train_split_bad(make_custom(tmp_path / "d", label_suffix="_mask"))
    recipe = custom_recipe(data_root, spec, "solver.batch_size=1", "solver.max_iters=5")
    with pytest.raises(UserError, match="no training sample could be read in 5 steps in a row"):
        train(recipe, run_dir=tmp_path / "run", quiet=True)
    assert not list((tmp_path / "run" / "checkpoints").glob("*.pt"))
    # the directory of that run is refused with a message that does not point to --resume
    with pytest.raises(UserError, match="saved no checkpoint: --exist-ok starts again"):
        train(recipe, run_dir=tmp_path / "run", quiet=True)


def test_missing_val_split_fails_before_training(tmp_path, data_root):
    spec = make_custom(tmp_path / "d", splits=("train",))
    with pytest.raises(UserError, match="unknown split 'val'"):
        train(custom_recipe(data_root, spec, "solver.max_iters=2"), run_dir=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_failed_final_evaluation_keeps_the_final_weights(tmp_path, data_root, monkeypatch):
    def failing(*args, **kwargs):
        raise UserError("evaluation failed")

    monkeypatch.setattr(train_mod, "evaluate", failing)
    with pytest.raises(UserError, match="evaluation failed"):
        train(tiny(data_root, "solver.max_iters=2"), run_dir=tmp_path / "run", quiet=True)
    assert torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)["step"] == 2


def test_best_checkpoint_follows_the_evaluations(tmp_path, data_root, monkeypatch):
    """Saved before evaluating, a checkpoint is saved again as best.pt, carrying the new best metric."""
    scores = iter([0.3, 0.5, 0.4])
    real = train_mod.evaluate

    def scored(*args, **kwargs):
        return {**real(*args, **kwargs), "mIoU": next(scores)}

    monkeypatch.setattr(train_mod, "evaluate", scored)
    recipe = tiny(data_root, "solver.max_iters=3", "solver.eval_every=1", "solver.checkpoint_every=1",
                  "solver.keep_last=0")
    train(recipe, run_dir=tmp_path / "run", quiet=True)
    ckpts = tmp_path / "run/checkpoints"
    best = torch.load(ckpts / "best.pt", weights_only=True)
    assert best["step"] == 2 and best["best_metric"] == 0.5
    assert [torch.load(ckpts / f"step_{i:08d}.pt", weights_only=True)["best_metric"] for i in (1, 2, 3)] == [0.3, 0.5, 0.5]


@pytest.mark.parametrize("case", ["unknown_dataset", "init_from_mismatch"])
def test_a_run_that_cannot_start_leaves_no_run_directory(tmp_path, data_root, case):
    if case == "unknown_dataset":
        recipe, init_from, match = tiny(data_root, "data.dataset=nosuchset"), None, "unknown dataset"
    else:
        src = train(tiny(data_root, "solver.max_iters=1", "model.dec_layers=1"), run_dir=tmp_path / "src", quiet=True)
        recipe, init_from, match = tiny(data_root, "solver.max_iters=1"), src.run_dir / "checkpoints/last.pt", "do not fit"
    with pytest.raises(UserError, match=match):
        train(recipe, run_dir=tmp_path / "run", init_from=init_from, quiet=True)
    assert not (tmp_path / "run").exists()


def test_the_remains_of_a_run_that_never_trained_are_reused(tmp_path, data_root, capsys):
    """A run killed before its first step (config.yaml, empty checkpoints/ and eval/) does not block its
    rerun; anything that trained, or anything not ours, still does."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "eval").mkdir()
    (run / "config.yaml").write_text("{}")
    res = train(tiny(data_root, "solver.max_iters=1"), run_dir=run, quiet=False)
    assert res.step == 1 and "reusing" in capsys.readouterr().err
    with pytest.raises(UserError, match="already exists"):  # now it holds a checkpoint and training records
        train(tiny(data_root, "solver.max_iters=1"), run_dir=run, quiet=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        train(tiny(data_root, "solver.max_iters=1"), run_dir=other, quiet=True)
    with pytest.raises(UserError, match="without --resume"):
        train(tiny(data_root, "solver.max_iters=1"), run_dir=tmp_path / "never", resume=True, quiet=True)
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------------------------------- saved recipe


def test_relative_spec_path_is_saved_absolute(tmp_path, data_root, monkeypatch):
    make_custom(tmp_path / "mydata")
    monkeypatch.chdir(tmp_path)
    recipe = custom_recipe(data_root, "mydata/sem.yaml", "solver.max_iters=2")
    train(recipe, run_dir=tmp_path / "run", quiet=True, stop_after=1)
    # resuming from where it started, with the same relative path, is the same run
    train(recipe, run_dir=tmp_path / "run", resume=True, quiet=True)
    ckpt = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    want = str(tmp_path / "mydata/sem.yaml")
    assert ckpt["recipe"]["data"]["dataset"] == want
    assert yaml.safe_load((tmp_path / "run/config.yaml").read_text())["data"]["dataset"] == want
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert dataset_info(recipe_from_dict(ckpt["recipe"]).data).name == "mine"


# ------------------------------------------------------------------------------------------ init-from, resume


def test_init_from_and_resume_never_load_the_backbone_weights(tmp_path, data_root):
    """model.pretrained names a file that does not exist: any attempt to load it fails. With --init-from
    or --resume, every weight comes from elsewhere, so none is made."""
    src = train(tiny(data_root, "solver.max_iters=1"), run_dir=tmp_path / "src", quiet=True)
    recipe = tiny(data_root, "solver.max_iters=2", f"model.pretrained={tmp_path / 'missing.pth'}")
    with pytest.raises(UserError, match="missing.pth"):  # the test can fail: this recipe does load them
        train(recipe, run_dir=tmp_path / "plain", quiet=True)
    res = train(recipe, run_dir=tmp_path / "ft", init_from=src.run_dir / "checkpoints/last.pt", quiet=True,
                stop_after=1)
    assert res.step == 1
    assert train(recipe, run_dir=tmp_path / "ft", resume=True, quiet=True).step == 2


def test_resuming_a_finished_run_says_so(tmp_path, data_root, capsys):
    recipe = tiny(data_root, "solver.max_iters=2")
    done = train(recipe, run_dir=tmp_path / "run", quiet=True)
    capsys.readouterr()
    again = train(recipe, run_dir=tmp_path / "run", resume=True, quiet=False)
    err = " ".join(capsys.readouterr().err.split())
    assert "had already finished" in err and "nothing to train or evaluate" in err
    assert again.step == 2 and again.metrics["mIoU"] == pytest.approx(done.metrics["mIoU"])
    # a run whose final evaluation was lost (it failed) gets it on resume
    final = tmp_path / "run/eval/step_00000002.json"
    final.unlink()
    again = train(recipe, run_dir=tmp_path / "run", resume=True, quiet=False)
    assert "no final evaluation: evaluating now" in " ".join(capsys.readouterr().err.split())
    assert json.loads(final.read_text())["mIoU"] == pytest.approx(done.metrics["mIoU"])


# ------------------------------------------------------------------------------------------- train --gpus N


def _train_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # 2 CPU ranks on gloo
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return subprocess.run([sys.executable, "-m", "maskformer_cli", "train", *args], capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.mark.distributed
def test_two_ranks_skip_empty_batches_together_and_report_errors_in_one_line(tmp_path, data_root):
    """One rank's batch of bad files only is skipped by both ranks (no deadlock); a UserError (an existing run
    directory) is one red line from the relaunching process, not every rank's traceback."""
    spec = make_custom(tmp_path / "d", missing_label=("train1",))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: tiny\n")
    # The C++ abort at exit described in test_train.py's two-rank test (finished work, then 'terminate called
    # without an active exception' in one rank) is retried once, in a fresh run directory; nothing else is.
    for attempt in range(2):
        run = tmp_path / f"run{attempt}"
        args = [str(recipe), *TINY, f"data.root={data_root}", f"data.dataset={spec}", "solver.batch_size=2",
                "solver.max_iters=6", "--run-dir", str(run), "--gpus", "2", "--device", "cpu"]
        r = _train_cli(*args)
        if r.returncode == 0 or "terminate called without an active exception" not in r.stdout + r.stderr:
            break
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert torch.load(run / "checkpoints/last.pt", weights_only=True)["step"] == 6
    assert "train1.png" in " ".join((r.stdout + r.stderr).split())
    r = _train_cli(*args)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: run directory") and "already exists" in lines[0], r.stderr


def test_a_missing_or_unreadable_validation_file_stops_the_run_before_the_first_step(tmp_path, data_root,
                                                                                      monkeypatch):
    """Found at start (existence and image header), not after the whole schedule at the first evaluation."""
    spec = make_custom(tmp_path / "d")
    (tmp_path / "d" / "lbl" / "val" / "val1.png").unlink()
    (tmp_path / "d" / "img" / "val" / "val0.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    steps = []
    real = train_mod.train_step
    monkeypatch.setattr(train_mod, "train_step", lambda *a, **k: steps.append(1) or real(*a, **k))
    with pytest.raises(UserError, match=r"validation split 'val': 2 missing or unreadable file\(s\), first: .*"
                                         r"val0\.png: not a readable image.*val1\.png: missing"):
        train(custom_recipe(data_root, spec, "solver.max_iters=2"), run_dir=tmp_path / "run", quiet=True)
    assert not steps and not (tmp_path / "run").exists()
