"""The runs of an ablation and their state on disk: which are finished, which can be recovered, and whether a
run directory belongs to the recipe it is about to be reused for.

A finished run holds result.json (its metrics and recipe); a run that trained to max_iters through a
subprocess is recovered from its final evaluation file; an evaluate_only run from the metrics.json that the
printed `maskformer evaluate ... --out` command writes. A directory or result of another recipe is refused,
never mixed in. `commands/ablate.py` expands ablation files into these runs and runs them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maskformer_cli.ablation_file import Ablation, Variant
from maskformer_cli.config import Recipe, to_dict, with_absolute_dataset_spec
from maskformer_cli.errors import UserError
from maskformer_cli.yaml_strict import read_yaml_file

RESULT_FILE = "result.json"


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


def final_eval_file(run_dir: Path, max_iters: int) -> Path:
    return run_dir / "eval" / f"step_{max_iters:08d}.json"


def has_checkpoint(run_dir: Path) -> bool:
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
        changed = changed_keys(saved, mine)
        raise UserError(f"{path} was produced by a different recipe (changed: {', '.join(changed[:6])}); "
                        f"delete {run.run_dir} to redo it, or use another --out")
    return result


def changed_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += changed_keys(a.get(k), b.get(k), f"{prefix}{k}.")
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
        saved = read_yaml_file(path) or {}
    except UserError:
        return
    # train() saves a custom dataset spec's path made absolute: compare like with like
    mine = json.loads(json.dumps(to_dict(with_absolute_dataset_spec(run.recipe))))
    changed = [k for k in changed_keys(saved, mine) if k != "output_dir"]
    if changed:
        raise UserError(f"{run.run_dir} holds a run of a different recipe (changed: {', '.join(changed[:6])}); "
                        f"delete it to redo this variant, or use another --out")


def recover_result(run: Run, ablation: Ablation) -> dict[str, Any] | None:
    """A run that trained to the end (e.g. through a subprocess) but has no result.json yet."""
    final = final_eval_file(run.run_dir, run.recipe.solver.max_iters)
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
