"""`maskformer ablate`: expand an ablation file into variants x seeds, run them, print the paper-style table.

The file's format and its validation live in `ablation_file.py`, the runs' state on disk in
`ablation_runs.py`; this module expands an `Ablation` into runs and runs them.

Layout under `out` (default runs/ablations/<file stem>):
    recipes/<variant>-seed<k>.yaml   the materialised recipe of every run (what --dry-run commands train)
    <variant>/seed<k>/               the run directory; result.json marks it finished
    _train/seed<k>/                  evaluate_only: the one training run per seed
    table.md, table.csv              median ± std over seeds per variant and metric, with the paper's number

A finished run (result.json, or a final evaluation at max_iters) is never redone; an interrupted one
resumes from its last checkpoint. So the cluster workflow is: --dry-run, submit the printed commands, then
run the same command without --dry-run to collect the table. The paper reports the median of 3 runs (Sec. 4.1): use --seeds 3.
`key=value` overrides on the command line change every run (after each variant's own keys), so they are part of
each run's recipe: an --out holding runs made without them (or with others) is refused, not mixed in.
A run stopped by SIGINT / SIGTERM stops the ablation (checkpoint saved); the CLI then exits with 128 + signal.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from maskformer_cli.ablate_table import Row, build_rows, render_markdown, render_rich, write_csv
from maskformer_cli.ablation_file import TRAIN_DIR, Ablation, load_ablation
from maskformer_cli.ablation_runs import (
    Run,
    check_run_config,
    final_eval_file,
    has_checkpoint,
    read_result,
    recover_evaluation,
    recover_result,
    save_result,
)
from maskformer_cli.config import Recipe, dump_recipe, to_dict
from maskformer_cli.errors import UserError

GPUS_PER_NODE = 8  # the paper's machines: 8 V100s per node (COCO panoptic's 64 GPUs are 8 nodes)
RDZV_ENDPOINT = "$MASTER_ADDR:29500"  # a placeholder the shell fills on each node of a multi-node run


# ------------------------------------------------------------------------------------------------- runs


@dataclass
class AblationResult:
    out: Path
    rows: list[Row]
    commands: list[str]
    complete: bool
    stop_signal: int | None = None
    """The signal (SIGINT 2, SIGTERM 15) that stopped a run, and with it the ablation."""


class _Stopped(Exception):
    """A run stopped before max_iters (its checkpoint saved), by `signal` or None (a test's stop_after)."""

    def __init__(self, signal: int | None) -> None:
        super().__init__(signal)
        self.signal = signal


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
    if ablation.overrides:
        header += f"# Command-line overrides: {shlex.join(ablation.overrides).replace(chr(10), ' ')}\n"
    run.recipe_path.write_text(header + dump_recipe(run.recipe))
    return run.recipe_path


# ------------------------------------------------------------------------------------------------ running

TrainFn = Callable[..., Any]
EvaluateFn = Callable[[Recipe, Path, Any], dict[str, Any]]
Runner = Callable[[list[str]], int]


def _default_train(recipe: Recipe, **kwargs: Any) -> Any:
    from maskformer_cli.trainer import train

    return train(recipe, **kwargs)


def _default_evaluate(recipe: Recipe, checkpoint: Path, device: Any) -> dict[str, Any]:
    """Metrics of `checkpoint` under `recipe`'s inference settings on its val split."""
    import torch

    from maskformer_cli.data.build import build_eval_loader
    from maskformer_cli.engine import default_metrics, evaluate
    from maskformer_cli.postprocess import build_postprocessor
    from maskformer_cli.precision import resolve_precision
    from maskformer_cli.weights import load_for_evaluation

    loaded, recipe, info = load_for_evaluation(Path(checkpoint), device, recipe=recipe)
    pp = build_postprocessor(recipe.inference, info, precision=resolve_precision(recipe.solver.precision,
                                                                                 torch.device(device)))
    loader = build_eval_loader(recipe.data, info, num_workers=0)
    metrics = evaluate(loaded.model, loader, default_metrics(recipe.data.task, recipe.model.meta_architecture ==
                                                             "maskformer"), pp, device=device, class_names=info.classes)
    metrics.pop("per_class", None)
    return metrics


def _default_runner(cmd: list[str]) -> int:
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached the child too (same process group): let it save its checkpoint and exit (130).
        return proc.wait()


def _stop_signal(returncode: int) -> int | None:
    """SIGINT / SIGTERM when a train subprocess's exit code says it was stopped by one (128 + signal as
    `maskformer train` exits, or -signal when the signal killed it), else None."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        if returncode in (128 + sig, -sig):
            return int(sig)
    return None


def torchrun_launch(gpus: int) -> list[str]:
    """torchrun's options for `gpus` GPUs per run: one node up to GPUS_PER_NODE; beyond, whole nodes of
    GPUS_PER_NODE meeting at a c10d rendezvous on $MASTER_ADDR (the same command runs on every node)."""
    if gpus <= GPUS_PER_NODE:
        return ["--nproc-per-node", str(gpus)]
    if gpus % GPUS_PER_NODE:
        raise UserError(f"{gpus} GPUs per run do not fill nodes of {GPUS_PER_NODE} GPUs: use a multiple of "
                        f"{GPUS_PER_NODE}, or --gpus {GPUS_PER_NODE} or fewer for one node")
    return ["--nnodes", str(gpus // GPUS_PER_NODE), "--nproc-per-node", str(GPUS_PER_NODE),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", RDZV_ENDPOINT]


def shell_line(cmd: list[str]) -> str:
    """`cmd` as one shell line, quoted, except the rendezvous placeholder the shell must expand."""
    return " ".join(a if a == RDZV_ENDPOINT else shlex.quote(a) for a in cmd)


def train_command(run: Run, gpus: int) -> list[str]:
    """What a cluster user submits for one run (torchrun form, one line)."""
    return ["torchrun", *torchrun_launch(gpus), "-m", "maskformer_cli", "train", str(run.recipe_path),
            "--run-dir", str(run.run_dir)]


def evaluate_command(run: Run) -> list[str]:
    inf = run.recipe.inference
    cmd = ["maskformer", "evaluate", str(run.train_dir / "checkpoints" / "last.pt"), "--inference", inf.mode,
           "--metric", "all", "--out", str(run.run_dir)]
    return cmd + (["--tta"] if inf.tta else [])


def _inference_extras(run: Run, base: Recipe) -> list[str]:
    """inference.* keys of a variant beyond --inference / --tta, as `maskformer evaluate` key=value overrides."""
    mine, theirs = to_dict(run.recipe.inference), to_dict(base.inference)
    return [f"inference.{k}={mine[k]}" for k in mine if k not in ("mode", "tta") and mine[k] != theirs[k]]


def dry_run_commands(ablation: Ablation, trains: list[Run], evals: list[Run], gpus: int) -> list[str]:
    lines = []
    for run in trains:
        lines.append(shell_line(train_command(run, gpus)))
    if ablation.evaluate_only:
        for run in evals:
            # evaluate takes inference.* key=value overrides: the variant's own thresholds go on its line
            lines.append(shlex.join(evaluate_command(run) + _inference_extras(run, ablation.base)))
    return lines


def _train_one(run: Run, *, gpus: int, device: Any, train_fn: TrainFn, runner: Runner, console: Any,
               ablation: Ablation) -> dict[str, Any]:
    """Train `run` to the end (resuming when it has a checkpoint); `_Stopped` when it stopped before."""
    check_run_config(run)
    resume = has_checkpoint(run.run_dir)
    exist_ok = not resume and run.run_dir.exists() and any(run.run_dir.iterdir())
    if resume:
        console.print(f"  resuming {run.run_dir} from its last checkpoint")
    if gpus > 0:
        cmd = [sys.executable, "-m", "maskformer_cli", "train", str(run.recipe_path), "--run-dir", str(run.run_dir),
               "--gpus", str(gpus)]
        cmd += ["--resume"] if resume else (["--exist-ok"] if exist_ok else [])
        rc = runner(cmd)
        if _stop_signal(rc) is not None:
            raise _Stopped(_stop_signal(rc))
        if rc != 0:
            raise UserError(f"{run.label}: training exited with code {rc}; run the same `maskformer ablate` "
                            f"command again to resume it")
        result = recover_result(run, ablation)
        if result is None:
            final = final_eval_file(run.run_dir, run.recipe.solver.max_iters)
            raise UserError(f"{run.label}: training exited cleanly but wrote no final evaluation ({final})")
        return result
    out = train_fn(run.recipe, run_dir=run.run_dir, resume=resume, exist_ok=exist_ok, device=device, quiet=False)
    max_iters = run.recipe.solver.max_iters
    if getattr(out, "interrupted", False) or getattr(out, "step", max_iters) < max_iters:
        raise _Stopped(getattr(out, "stop_signal", None))
    metrics = dict(getattr(out, "metrics", None) or {})
    if not metrics:
        return recover_result(run, ablation)
    return save_result(run, metrics, int(out.step), ablation)


def check_out(runs: list[Run]) -> None:
    """Refuse an --out whose runs were made by other recipes (a changed file, other `key=value` overrides)
    before anything in it is written."""
    for run in {r.run_dir: r for r in runs}.values():
        read_result(run)
        check_run_config(run)


def _print_dry_run(ablation: Ablation, trains: list[Run], evals: list[Run], gpus: int, seeds: int, out: Path,
                   console: Any) -> list[str]:
    """Print (and return) the commands that run the ablation on `gpus` GPUs per run."""
    commands = dry_run_commands(ablation, trains, evals, gpus)
    nodes = (f" ({gpus // GPUS_PER_NODE} nodes x {GPUS_PER_NODE}: start each command on every node, with "
             f"MASTER_ADDR set to the first node's address)") if gpus > GPUS_PER_NODE else ""
    console.print(f"[bold]{ablation.name}[/]: {len(ablation.variants)} variants x {seeds} seed(s), "
                  f"{gpus} GPU(s) per run{nodes}; recipes in {out / 'recipes'}")
    for line in commands:
        console.print(line, highlight=False, soft_wrap=True, markup=False)
    console.print("When the jobs have finished, run the same command without --dry-run to collect the table "
                  "(finished runs are read, not redone).", highlight=False)
    return commands


def run_ablate(file: Path, overrides: list[str] | tuple[str, ...] = (), *, seeds: int = 1, dry_run: bool = False,
               gpus: int = 0, out: Path | None = None, device: str = "auto", train_fn: TrainFn | None = None,
               evaluate_fn: EvaluateFn | None = None, runner: Runner | None = None,
               console: Any = None) -> AblationResult:
    """Run every variant x seed of the ablation `file` (skipping finished runs) and write the table.

    `file` may be a plain recipe (one variant, e.g. to take the median over --seeds). `overrides`
    (`key=value`) are set on every run after its variant's keys. gpus > 0: each run is a
    `maskformer train ... --gpus N` subprocess; 0: in this process on `device`, or with dry_run the file's
    `gpus:`. dry_run: write the materialised recipes and print the commands, run nothing. A run stopped by a
    signal stops the ablation: the result is incomplete and carries the signal.
    `train_fn`, `evaluate_fn`, `runner` replace train(), checkpoint evaluation and the subprocess (tests).
    """
    from maskformer_cli.reporting import console as default_console

    console = console or default_console
    if gpus < 0:
        raise UserError(f"--gpus must be >= 0, got {gpus}")
    ablation = load_ablation(file, overrides)
    out = Path(out) if out is not None else Path("runs") / "ablations" / Path(file).stem
    trains, evals = expand(ablation, seeds, out)
    check_out(trains + evals)
    for run in trains + (evals if ablation.evaluate_only else []):
        write_recipe_file(run, ablation)

    if dry_run:
        commands = _print_dry_run(ablation, trains, evals, gpus or ablation.gpus, seeds, out, console)
        return AblationResult(out=out, rows=[], commands=commands, complete=False)

    train_fn = train_fn or _default_train
    evaluate_fn = evaluate_fn or _default_evaluate
    runner = runner or _default_runner
    dev: Any = device
    if gpus == 0 or ablation.evaluate_only:
        from maskformer_cli import distributed as dist

        dev = dist.resolve_device(device)

    results: dict[tuple[str, int], dict[str, Any]] = {}
    complete, stop_signal = True, None
    total = len(trains)
    for i, run in enumerate(trains, 1):
        done = read_result(run) or recover_result(run, ablation)
        if done is not None:
            console.print(f"[dim]({i}/{total}) {run.label}: finished earlier, skipped[/]")
        else:
            console.print(f"[bold]({i}/{total}) {run.label}[/] -> {run.run_dir}")
            try:
                done = _train_one(run, gpus=gpus, device=dev, train_fn=train_fn, runner=runner, console=console,
                                  ablation=ablation)
            except _Stopped as stopped:
                console.print(f"[yellow]{run.label} was interrupted; run the same command again to resume it[/]")
                complete, stop_signal = False, stopped.signal
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
    return AblationResult(out=out, rows=rows, commands=[], complete=complete, stop_signal=stop_signal)


__all__ = ["AblationResult", "Run", "dry_run_commands", "expand", "run_ablate"]
