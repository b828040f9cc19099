"""`maskformer ablate`: expand an ablation file into variants x seeds, run them, print the paper-style table.

An ablation file is not a recipe. It holds a `base:` recipe mapping (the recipe schema), `variants:`
{name: {dotted.key: value}}, and optionally `name`, `description`, `metrics: [mIoU, PQ_stuff, ...]` (the
columns), `paper: {variant: {metric: number}}` (shown beside ours), `gpus` (per run, for --dry-run) and
`evaluate_only: true` (variants differ only in `inference.*`: train the base once per seed, then evaluate
its checkpoint once per variant).

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

import copy
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from maskformer_cli.ablate_table import Row, build_rows, render_markdown, render_rich, write_csv
from maskformer_cli.config import (
    ConfigError,
    Recipe,
    dump_recipe,
    from_dict,
    read_yaml,
    section,
    suggest,
    to_dict,
)
from maskformer_cli.errors import UserError

ABLATION_KEYS = ("name", "description", "metrics", "gpus", "evaluate_only", "base", "variants", "paper")
TRAIN_DIR = "_train"
RESULT_FILE = "result.json"


# ------------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Variant:
    """One row of the table: the base recipe with `overrides` (dotted key -> value) applied."""

    name: str
    overrides: dict[str, Any]
    recipe: Recipe

    @property
    def slug(self) -> str:
        return slugify(self.name)


@dataclass(frozen=True)
class Ablation:
    name: str
    description: str
    metrics: tuple[str, ...]
    gpus: int
    evaluate_only: bool
    base: Recipe
    variants: tuple[Variant, ...]
    paper: dict[str, dict[str, float]] = field(default_factory=dict)
    source: Path | None = None


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


def slugify(name: str) -> str:
    """A variant name as a directory name: 'PerPixelBaseline+ (focal+dice)' -> 'PerPixelBaseline+_focal+dice'."""
    s = re.sub(r"[^A-Za-z0-9.+=-]+", "_", name.strip()).strip("_.")
    return s or "variant"


# ----------------------------------------------------------------------------------------------- loading


def apply_overrides(base: dict[str, Any], overrides: dict[str, Any], where: str = "") -> dict[str, Any]:
    """A deep copy of the recipe mapping `base` with `overrides` set: 'model.num_queries': 50 sets
    base['model']['num_queries']; a plain key holding a mapping is merged into that section."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}: variant keys must be dotted strings like 'model.num_queries', got {key!r}")
        parts = key.split(".")
        try:
            node = section(out, parts[:-1], key)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        leaf = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(leaf), dict | None):
            node[leaf] = apply_overrides(node.get(leaf) or {}, value, where)
        else:
            node[leaf] = copy.deepcopy(value)
    return out


def _recipe(data: dict[str, Any], where: str) -> Recipe:
    try:
        return from_dict(Recipe, data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def default_metrics(recipes: Sequence[Recipe]) -> tuple[str, ...]:
    metrics = ["mIoU", "PQ_stuff"]
    if any(r.data.task == "panoptic" and r.model.meta_architecture == "maskformer" for r in recipes):
        metrics.append("PQ")
    return tuple(metrics)


def parse_ablation(data: dict[str, Any], *, default_name: str = "ablation", source: Path | None = None) -> Ablation:
    """An `Ablation` from the mapping of an ablation file, strictly (every variant must build a valid recipe)."""
    where = str(source) if source is not None else "ablation"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: an ablation file is a mapping with base: and variants:")
    if "variants" not in data or "base" not in data:
        missing = [k for k in ("base", "variants") if k not in data]
        hint = " (this looks like a recipe: use `maskformer train`)" if {"model", "solver", "data"} & set(data) else ""
        raise ConfigError(f"{where}: an ablation file needs {' and '.join(missing)}:{hint}")
    unknown = [k for k in data if k not in ABLATION_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'{suggest(str(unknown[0]), ABLATION_KEYS)}")
    base_map = data["base"] or {}
    if not isinstance(base_map, dict):
        raise ConfigError(f"{where}: base: must be a recipe mapping (model:, data:, solver:, ...)")
    base = _recipe(base_map, f"{where}: base")
    raw_variants = data["variants"]
    if not isinstance(raw_variants, dict) or not raw_variants:
        raise ConfigError(f"{where}: variants: must map variant names to {{dotted.key: value}} (at least one)")
    variants: list[Variant] = []
    slugs: dict[str, str] = {}
    for name, overrides in raw_variants.items():
        name = str(name)
        overrides = overrides or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"{where}: variant '{name}': expected a mapping of dotted keys, got {overrides!r}")
        vw = f"{where}: variant '{name}'"
        recipe = _recipe(apply_overrides(base_map, overrides, vw), vw)
        slug = slugify(name)
        if slug in slugs:
            raise ConfigError(f"{where}: variants '{slugs[slug]}' and '{name}' map to the same directory '{slug}'")
        if slug == TRAIN_DIR or slug == "recipes":
            raise ConfigError(f"{where}: variant name '{name}' is reserved")
        slugs[slug] = name
        variants.append(Variant(name=name, overrides=dict(overrides), recipe=recipe))
    evaluate_only = data.get("evaluate_only", False)
    if not isinstance(evaluate_only, bool):
        raise ConfigError(f"{where}: evaluate_only: expected true or false, got {evaluate_only!r}")
    if evaluate_only:
        base_plain = {k: v for k, v in to_dict(base).items() if k != "inference"}
        for v in variants:
            changed = sorted(k for k, val in to_dict(v.recipe).items() if k != "inference" and val != base_plain[k])
            if changed:
                raise ConfigError(f"{where}: evaluate_only: variant '{v.name}' changes {', '.join(changed)}; "
                                  f"only inference.* keys may differ (the checkpoint is shared)")
    metrics = data.get("metrics")
    if metrics is None:
        metrics = default_metrics([v.recipe for v in variants])
    if not isinstance(metrics, list | tuple) or not all(isinstance(m, str) for m in metrics) or not metrics:
        raise ConfigError(f"{where}: metrics: expected a list of metric names like [mIoU, PQ_stuff], got {metrics!r}")
    paper_raw = data.get("paper") or {}
    if not isinstance(paper_raw, dict):
        raise ConfigError(f"{where}: paper: expected {{variant: {{metric: number}}}}")
    paper: dict[str, dict[str, float]] = {}
    names = [v.name for v in variants]
    for vname, numbers in paper_raw.items():
        if str(vname) not in names:
            raise ConfigError(f"{where}: paper: '{vname}' is not a variant{suggest(str(vname), names)}")
        if not isinstance(numbers, dict):
            raise ConfigError(f"{where}: paper: '{vname}': expected {{metric: number}}, got {numbers!r}")
        row: dict[str, float] = {}
        for metric, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{where}: paper: '{vname}'.{metric}: expected a number, got {value!r}")
            row[str(metric)] = float(value)
        paper[str(vname)] = row
    gpus = data.get("gpus", 1)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ConfigError(f"{where}: gpus: expected a positive integer (GPUs per run), got {gpus!r}")
    name = data.get("name") or default_name
    return Ablation(name=str(name), description=str(data.get("description") or ""), metrics=tuple(metrics),
                    gpus=gpus, evaluate_only=evaluate_only, base=base, variants=tuple(variants), paper=paper,
                    source=source)


def load_ablation(path: str | Path) -> Ablation:
    """Read and validate an ablation YAML file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"ablation file not found: {p}")
    return parse_ablation(read_yaml(p), default_name=p.stem, source=p)


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


__all__ = ["Ablation", "AblationResult", "Row", "Run", "Variant", "apply_overrides", "build_rows", "expand",
           "load_ablation", "parse_ablation", "render_markdown", "run_ablate", "slugify"]
