"""`maskformer ablate`: expand an ablation file into variants x seeds, run them, print the paper-style table.

The file's format and its validation live in `ablation_file.py`; this module expands an `Ablation` into
runs, keeps their state on disk and runs them.

Layout under `out` (default runs/ablations/<file stem>):
    recipes/<variant>-seed<k>.yaml   the materialised recipe of every run (what --dry-run commands train)
    <variant>/seed<k>/               the run directory; result.json marks it finished
    _train/seed<k>/                  evaluate_only: the one training run per seed
    table.md, table.csv              median ± std over seeds per variant and metric, with the paper's number

A finished run (result.json, or a final evaluation at max_iters) is never redone; an interrupted one
resumes from its last checkpoint. So the cluster workflow is: --dry-run, submit the printed commands, then
run the same command without --dry-run to collect the table. The paper reports the median of 3 runs (Sec. 4.1): use --seeds 3.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from maskformer_cli.ablate_table import Row, build_rows, render_markdown, render_rich, write_csv
from maskformer_cli.ablation_file import TRAIN_DIR, Ablation, Variant, load_ablation
from maskformer_cli.config import Recipe, dump_recipe, to_dict
from maskformer_cli.errors import UserError

RESULT_FILE = "result.json"


# ------------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Run:
    """One (variant, seed) run. For evaluate_only files `train_dir` is the shared training run's directory."""

    variant: Variant | None  # None: the shared training run of an evaluate_only file
    seed_index: int
    recipe: Recipe
    run_dir: Path
    recipe_path: Path
    train_dir: Path | None = None

    @property
    def label(self) -> str:
        return f"{self.variant.name if self.variant else 'train (shared)'} / seed{self.seed_index}"


@dataclass
class AblationResult:
    out: Path
    rows: list[Row]
    commands: list[str]
    complete: bool


# ---------------------------------------------------------------------------------------------- expansion


def seeded(recipe: Recipe, seed_index: int, name: str) -> Recipe:
    """The recipe of seed `seed_index`: solver.seed offset by the index, and a run name."""
    return replace(recipe, name=name, solver=replace(recipe.solver, seed=recipe.solver.seed + seed_index))


def expand(ablation: Ablation, seeds: int, out: Path) -> tuple[list[Run], list[Run]]:
    """(training runs, evaluation runs). For ordinary files the two lists are the same runs; for
    evaluate_only files there is one training run per seed and one evaluation run per variant and seed."""
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    recipes_dir = out / "recipes"
    evals: list[Run] = []
    trains: list[Run] = []
    for k in range(seeds):
        train_dir = None
        if ablation.evaluate_only:
            recipe = seeded(ablation.base, k, f"{ablation.name}-train-seed{k}")
            train_dir = out / TRAIN_DIR / f"seed{k}"
            trains.append(Run(None, k, recipe, train_dir, recipes_dir / f"{TRAIN_DIR}-seed{k}.yaml"))
        for v in ablation.variants:
            recipe = seeded(v.recipe, k, f"{ablation.name}-{v.slug}-seed{k}")
            run = Run(v, k, recipe, out / v.slug / f"seed{k}", recipes_dir / f"{v.slug}-seed{k}.yaml", train_dir)
            evals.append(run)
            if not ablation.evaluate_only:
                trains.append(run)
    return trains, evals


def write_recipe_file(run: Run, ablation: Ablation) -> Path:
    """The run's materialised recipe YAML (loadable by `maskformer train`)."""
    run.recipe_path.parent.mkdir(parents=True, exist_ok=True)
    what = f"variant '{run.variant.name}'" if run.variant else "the shared training run"
    src = f" from {ablation.source}" if ablation.source else ""
    header = f"# Materialised by `maskformer ablate`{src}: {what}, seed index {run.seed_index}.\n"
    run.recipe_path.write_text(header + dump_recipe(run.recipe))
    return run.recipe_path


# --------------------------------------------------------------------------------------------- run state


def _final_eval_file(run_dir: Path, max_iters: int) -> Path:
    return run_dir / "eval" / f"step_{max_iters:08d}.json"


def _has_checkpoint(run_dir: Path) -> bool:
    ckpt = run_dir / "checkpoints"
    return ckpt.is_dir() and (any(ckpt.glob("step_*.pt")) or (ckpt / "last.pt").is_file())


def _clean_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        if k == "per_class":
            continue
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, int | float | str | bool) or v is None:
            out[k] = v
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


def read_result(run: Run) -> dict[str, Any] | None:
    """The run's finished result, or None. A result of a different recipe is an error, not a silent reuse."""
    path = run.run_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a torn write: redo the bookkeeping (the run itself resumes or is re-read)
    saved = result.get("recipe")
    mine = json.loads(json.dumps(to_dict(run.recipe)))
    if saved is not None:
        saved = {k: v for k, v in saved.items() if k != "output_dir"}
        mine = {k: v for k, v in mine.items() if k != "output_dir"}
    if saved is not None and saved != mine:
        changed = _changed_keys(saved, mine)
        raise UserError(f"{path} was produced by a different recipe (changed: {', '.join(changed[:6])}); "
                        f"delete {run.run_dir} to redo it, or use another --out")
    return result


def _changed_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _changed_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def save_result(run: Run, metrics: dict[str, Any], step: int, ablation: Ablation) -> dict[str, Any]:
    result = {
        "ablation": ablation.name, "variant": run.variant.name if run.variant else None,
        "seed_index": run.seed_index, "seed": run.recipe.solver.seed, "step": step,
        "checkpoint": str((run.train_dir or run.run_dir) / "checkpoints" / "last.pt"),
        "metrics": _clean_metrics(metrics), "recipe": to_dict(run.recipe),
    }
    _write_json(run.run_dir / RESULT_FILE, result)
    return result


def check_run_config(run: Run) -> None:
    """A run directory written by train() holds config.yaml: it must be this run's recipe."""
    path = run.run_dir / "config.yaml"
    if not path.is_file():
        return
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return
    mine = json.loads(json.dumps(to_dict(run.recipe)))
    changed = [k for k in _changed_keys(saved, mine) if k != "output_dir"]
    if changed:
        raise UserError(f"{run.run_dir} holds a run of a different recipe (changed: {', '.join(changed[:6])}); "
                        f"delete it to redo this variant, or use another --out")


def recover_result(run: Run, ablation: Ablation) -> dict[str, Any] | None:
    """A run that trained to the end (e.g. through a subprocess) but has no result.json yet."""
    final = _final_eval_file(run.run_dir, run.recipe.solver.max_iters)
    if not final.is_file():
        return None
    check_run_config(run)
    data = json.loads(final.read_text())
    return save_result(run, data, int(data.get("step", run.recipe.solver.max_iters)), ablation)


def recover_evaluation(run: Run, ablation: Ablation) -> dict[str, Any] | None:
    """evaluate_only: metrics.json written by the `maskformer evaluate ... --out` command of --dry-run."""
    path = run.run_dir / "metrics.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if data.get("inference") not in (None, run.recipe.inference.mode):
        return None
    return save_result(run, data, run.recipe.solver.max_iters, ablation)


# ------------------------------------------------------------------------------------------------ running

TrainFn = Callable[..., Any]
EvaluateFn = Callable[[Recipe, Path, Any], dict[str, Any]]
Runner = Callable[[list[str]], int]


def _default_train(recipe: Recipe, **kwargs: Any) -> Any:
    from maskformer_cli.train import train

    return train(recipe, **kwargs)


def _default_evaluate(recipe: Recipe, checkpoint: Path, device: Any) -> dict[str, Any]:
    """Metrics of `checkpoint` under `recipe`'s inference settings on its val split."""
    from maskformer_cli.data.build import build_eval_loader, dataset_info
    from maskformer_cli.engine import evaluate
    from maskformer_cli.train import eval_spec
    from maskformer_cli.weights import load_for_inference

    loaded = load_for_inference(Path(checkpoint), device)
    info = dataset_info(recipe.data)
    spec = eval_spec(recipe, info)
    loader = build_eval_loader(recipe.data, info, num_workers=0)
    metrics = evaluate(loaded.model, loader, spec, device=device, precision=recipe.solver.precision,
                       class_names=info.classes)
    metrics.pop("per_class", None)
    return metrics


def _default_runner(cmd: list[str]) -> int:
    return subprocess.run(cmd, check=False).returncode


def train_command(run: Run, gpus: int) -> list[str]:
    """What a cluster user submits for one run (torchrun form, one line)."""
    return ["torchrun", "--nproc-per-node", str(gpus), "-m", "maskformer_cli", "train", str(run.recipe_path),
            "--run-dir", str(run.run_dir)]


def evaluate_command(run: Run) -> list[str]:
    inf = run.recipe.inference
    cmd = ["maskformer", "evaluate", str(run.train_dir / "checkpoints" / "last.pt"), "--inference", inf.mode,
           "--metric", "all", "--out", str(run.run_dir)]
    return cmd + (["--tta"] if inf.tta else [])


def _inference_extras(run: Run, base: Recipe) -> list[str]:
    """inference.* keys of a variant that `maskformer evaluate` cannot set on its command line."""
    mine, theirs = to_dict(run.recipe.inference), to_dict(base.inference)
    return [f"inference.{k}={mine[k]}" for k in mine if k not in ("mode", "tta") and mine[k] != theirs[k]]


def dry_run_commands(ablation: Ablation, trains: list[Run], evals: list[Run], gpus: int) -> list[str]:
    lines = []
    for run in trains:
        lines.append(shlex.join(train_command(run, gpus)))
    if ablation.evaluate_only:
        for run in evals:
            line = shlex.join(evaluate_command(run))
            extras = _inference_extras(run, ablation.base)
            if extras:
                line += f"   # also needs {' '.join(extras)}: run `maskformer ablate` without --dry-run"
            lines.append(line)
    return lines


def _train_one(run: Run, *, gpus: int, device: Any, train_fn: TrainFn, runner: Runner, console: Any,
               ablation: Ablation) -> dict[str, Any] | None:
    """Train `run` to the end (resuming when it has a checkpoint). None when interrupted."""
    check_run_config(run)
    resume = _has_checkpoint(run.run_dir)
    exist_ok = not resume and run.run_dir.exists() and any(run.run_dir.iterdir())
    if resume:
        console.print(f"  resuming {run.run_dir} from its last checkpoint")
    if gpus > 0:
        cmd = [sys.executable, "-m", "maskformer_cli", "train", str(run.recipe_path), "--run-dir", str(run.run_dir),
               "--gpus", str(gpus)]
        cmd += ["--resume"] if resume else (["--exist-ok"] if exist_ok else [])
        rc = runner(cmd)
        if rc != 0:
            raise UserError(f"{run.label}: training exited with code {rc}; run the same `maskformer ablate` "
                            f"command again to resume it")
        result = recover_result(run, ablation)
        if result is None:
            final = _final_eval_file(run.run_dir, run.recipe.solver.max_iters)
            raise UserError(f"{run.label}: training exited cleanly but wrote no final evaluation ({final})")
        return result
    out = train_fn(run.recipe, run_dir=run.run_dir, resume=resume, exist_ok=exist_ok, device=device, quiet=False)
    max_iters = run.recipe.solver.max_iters
    if getattr(out, "interrupted", False) or getattr(out, "step", max_iters) < max_iters:
        return None
    metrics = dict(getattr(out, "metrics", None) or {})
    if not metrics:
        return recover_result(run, ablation)
    return save_result(run, metrics, int(out.step), ablation)


def run_ablate(file: Path, *, seeds: int = 1, dry_run: bool = False, gpus: int = 0, out: Path | None = None,
               device: str = "auto", train_fn: TrainFn | None = None, evaluate_fn: EvaluateFn | None = None,
               runner: Runner | None = None, console: Any = None) -> AblationResult:
    """Run every variant x seed of the ablation `file` (skipping finished runs) and write the table.

    gpus > 0: each run is a `maskformer train ... --gpus N` subprocess; 0: in this process on `device`.
    dry_run: write the materialised recipes and print the commands, run nothing.
    `train_fn`, `evaluate_fn`, `runner` replace train(), checkpoint evaluation and subprocess.run (tests).
    """
    from maskformer_cli.reporting import console as default_console

    console = console or default_console
    if gpus < 0:
        raise UserError(f"--gpus must be >= 0, got {gpus}")
    ablation = load_ablation(file)
    out = Path(out) if out is not None else Path("runs") / "ablations" / Path(file).stem
    trains, evals = expand(ablation, seeds, out)
    for run in trains + (evals if ablation.evaluate_only else []):
        write_recipe_file(run, ablation)

    if dry_run:
        g = gpus or ablation.gpus
        commands = dry_run_commands(ablation, trains, evals, g)
        console.print(f"[bold]{ablation.name}[/]: {len(ablation.variants)} variants x {seeds} seed(s), "
                      f"{g} GPU(s) per run; recipes in {out / 'recipes'}")
        for line in commands:
            console.print(line, highlight=False, soft_wrap=True, markup=False)
        console.print("When the jobs have finished, run the same command without --dry-run to collect the table "
                      "(finished runs are read, not redone).", highlight=False)
        return AblationResult(out=out, rows=[], commands=commands, complete=False)

    train_fn = train_fn or _default_train
    evaluate_fn = evaluate_fn or _default_evaluate
    runner = runner or _default_runner
    dev: Any = device
    if gpus == 0 or ablation.evaluate_only:
        from maskformer_cli import distributed as dist

        dev = dist.resolve_device(device)

    results: dict[tuple[str, int], dict[str, Any]] = {}
    complete = True
    total = len(trains)
    for i, run in enumerate(trains, 1):
        done = read_result(run) or recover_result(run, ablation)
        if done is not None:
            console.print(f"[dim]({i}/{total}) {run.label}: finished earlier, skipped[/]")
        else:
            console.print(f"[bold]({i}/{total}) {run.label}[/] -> {run.run_dir}")
            done = _train_one(run, gpus=gpus, device=dev, train_fn=train_fn, runner=runner, console=console,
                              ablation=ablation)
            if done is None:
                console.print(f"[yellow]{run.label} was interrupted; run the same command again to resume it[/]")
                complete = False
                break
        if run.variant is not None:
            results[(run.variant.name, run.seed_index)] = done

    if complete and ablation.evaluate_only:
        for run in evals:
            done = read_result(run) or recover_evaluation(run, ablation)
            if done is None:
                ckpt = run.train_dir / "checkpoints" / "last.pt"
                console.print(f"[bold]evaluate[/] {run.label} ({run.recipe.inference.mode} inference) <- {ckpt}")
                metrics = evaluate_fn(run.recipe, ckpt, dev)
                done = save_result(run, metrics, run.recipe.solver.max_iters, ablation)
            results[(run.variant.name, run.seed_index)] = done

    rows = build_rows(ablation, results, seeds)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(render_markdown(ablation, rows, seeds))
    write_csv(ablation, rows, out / "table.csv")
    console.print(render_rich(ablation, rows, seeds))
    console.print(f"wrote {out / 'table.md'} and {out / 'table.csv'}")
    return AblationResult(out=out, rows=rows, commands=[], complete=complete)


__all__ = ["AblationResult", "Run", "dry_run_commands", "expand", "run_ablate"]
