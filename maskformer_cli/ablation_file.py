"""An ablation file: a `base:` recipe and named `variants:`, read and validated into an `Ablation`.

An ablation file is not a recipe. It holds a `base:` recipe mapping (the recipe schema), `variants:`
{name: {dotted.key: value}}, and optionally `name`, `description`, `metrics: [mIoU, PQ_stuff, ...]` (the
columns), `paper: {variant: {metric: number}}` (shown beside ours), `gpus` (per run, for --dry-run) and
`evaluate_only: true` (variants differ only in `inference.*`: train the base once per seed, then evaluate
its checkpoint once per variant). Every variant must build a valid recipe; errors name the file and variant.
A plain recipe file is read as a one-variant ablation (to repeat it over seeds, e.g. Cityscapes' median of 5).
Command-line `key=value` overrides apply to the base and to every variant, after the variant's own keys:
the command line wins, as with `maskformer train`.
`commands/ablate.py` expands an Ablation into runs and runs them.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskformer_cli.config import (
    ConfigError,
    Recipe,
    from_dict,
    read_yaml,
    section,
    set_overrides,
    suggest,
    to_dict,
)

ABLATION_KEYS = ("name", "description", "metrics", "gpus", "evaluate_only", "base", "variants", "paper")
TRAIN_DIR = "_train"  # the shared training runs of evaluate_only files; no variant may take the name


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
    overrides: tuple[str, ...] = ()
    """The command line's `key=value` overrides, already applied to `base` and every variant."""


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


def apply_command_line(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A deep copy of the recipe mapping `data` with `key=value` overrides set exactly as `maskformer train`
    sets them (the value replaces the key's, a mapping included)."""
    return set_overrides(copy.deepcopy(data), overrides)


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


def is_plain_recipe(data: Any) -> bool:
    """A recipe mapping (only recipe sections, no base: or variants:), which `ablate` runs as one variant."""
    return isinstance(data, dict) and bool(data) and set(data) <= set(Recipe.__dataclass_fields__)


def _paper_numbers(paper_raw: Any, names: list[str], where: str) -> dict[str, dict[str, float]]:
    """The file's `paper:` section, {variant: {metric: number}}, checked against the variant names."""
    if not isinstance(paper_raw, dict):
        raise ConfigError(f"{where}: paper: expected {{variant: {{metric: number}}}}")
    paper: dict[str, dict[str, float]] = {}
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
    return paper


def parse_ablation(data: dict[str, Any], *, default_name: str = "ablation", source: Path | None = None,
                   overrides: Sequence[str] = ()) -> Ablation:
    """An `Ablation` from the mapping of an ablation file (or of a plain recipe: one variant named after the
    recipe), strictly: every variant must build a valid recipe. `overrides` (`key=value`, the command line)
    are set on the base and on every variant after its own keys; an unknown key is the same error as in
    `maskformer train`."""
    where = str(source) if source is not None else "ablation"
    plain = is_plain_recipe(data)
    if plain:
        data = {"base": data, "variants": {str(data.get("name") or default_name): {}}}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: an ablation file is a mapping with base: and variants:")
    if "variants" not in data or "base" not in data:
        missing = [k for k in ("base", "variants") if k not in data]
        raise ConfigError(f"{where}: an ablation file needs {' and '.join(missing)}: (a plain recipe has neither)")
    unknown = [k for k in data if k not in ABLATION_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'{suggest(str(unknown[0]), ABLATION_KEYS)}")
    base_map = data["base"] or {}
    if not isinstance(base_map, dict):
        raise ConfigError(f"{where}: base: must be a recipe mapping (model:, data:, solver:, ...)")
    base = _recipe(base_map, where if plain else f"{where}: base")
    if overrides:  # checked on the base first, so a bad key reads as `maskformer train FILE key=value` says it
        base = _recipe(apply_command_line(base_map, overrides), where)
    raw_variants = data["variants"]
    if not isinstance(raw_variants, dict) or not raw_variants:
        raise ConfigError(f"{where}: variants: must map variant names to {{dotted.key: value}} (at least one)")
    variants: list[Variant] = []
    slugs: dict[str, str] = {}
    for name, keys in raw_variants.items():
        name = str(name)
        keys = keys or {}
        if not isinstance(keys, dict):
            raise ConfigError(f"{where}: variant '{name}': expected a mapping of dotted keys, got {keys!r}")
        vw = f"{where}: variant '{name}'"
        recipe = _recipe(apply_command_line(apply_overrides(base_map, keys, vw), overrides), vw)
        slug = slugify(name)
        if slug in slugs:
            raise ConfigError(f"{where}: variants '{slugs[slug]}' and '{name}' map to the same directory '{slug}'")
        if slug == TRAIN_DIR or slug == "recipes":
            raise ConfigError(f"{where}: variant name '{name}' is reserved")
        slugs[slug] = name
        variants.append(Variant(name=name, overrides=dict(keys), recipe=recipe))
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
    paper = _paper_numbers(data.get("paper") or {}, [v.name for v in variants], where)
    gpus = data.get("gpus", 1)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ConfigError(f"{where}: gpus: expected a positive integer (GPUs per run), got {gpus!r}")
    name = data.get("name") or default_name
    return Ablation(name=str(name), description=str(data.get("description") or ""), metrics=tuple(metrics),
                    gpus=gpus, evaluate_only=evaluate_only, base=base, variants=tuple(variants), paper=paper,
                    source=source, overrides=tuple(overrides))


def load_ablation(path: str | Path, overrides: Sequence[str] = ()) -> Ablation:
    """Read and validate an ablation YAML file (or a plain recipe, as one variant), with command-line
    `key=value` overrides applied to every variant."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"ablation file not found: {p}")
    return parse_ablation(read_yaml(p), default_name=p.stem, source=p, overrides=overrides)
