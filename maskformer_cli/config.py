"""Recipes: the strict loader of the schema in `recipe_schema`, and the one way the command line changes a
recipe (`key=value` overrides).

A recipe YAML sets some fields, `key=value` overrides set more (`solver.lr=2e-4`); both are read by
`yaml_strict` (safe, bounded alias expansion, duplicate keys refused; never `eval`). Loading is strict:
an unknown key or a value of the wrong type raises one `ConfigError` naming the key (and the closest valid
key), never a traceback deep in the code; `recipe_checks.validate` then refuses values and combinations the
model cannot honour. The schema's names are re-exported here, so `from maskformer_cli.config import Recipe`
is the one import the rest of the package needs.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from maskformer_cli.recipe_checks import inert_options, validate
from maskformer_cli.recipe_schema import (
    ConfigError,
    DataConfig,
    InferenceConfig,
    LossConfig,
    ModelConfig,
    Recipe,
    SolverConfig,
)
from maskformer_cli.yaml_strict import YAMLInputError, load_yaml, read_yaml_file

__all__ = [
    "ConfigError", "DataConfig", "InferenceConfig", "LossConfig", "ModelConfig", "Recipe", "SolverConfig",
    "dump_recipe", "from_dict", "inert_options", "load_recipe", "override_recipe", "parse_override",
    "read_yaml", "recipe_from_dict", "section", "set_overrides", "suggest", "to_dict", "validate",
    "with_absolute_dataset_spec",
]


# ----------------------------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} {_type_name(args[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it in the dataclass's form (tuples for lists)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {_type_name(tp)}")
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {len(value)} values")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `1e-4` (no dot) as a string; accept what is clearly a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # a schema bug, not a user error


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def suggest(key: str, options: Sequence[str]) -> str:
    """' (did you mean ...?)' for the closest of `options`, else the list of valid keys."""
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(sorted(options))})"


def from_dict(cls: type, data: dict[str, Any], prefix: str = "", *, unused_checks: bool = True) -> Any:
    """Build the frozen dataclass `cls` from a nested dict, strictly. unused_checks=False skips the checks
    for options the model does not use (a recipe saved with a checkpoint trained before they existed)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {data!r}")
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"unknown key '{full}'{suggest(full, [prefix + n for n in names])}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value if value is not None else {}, prefix=f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    obj = cls(**kwargs)
    validate(obj, prefix, unused_checks=unused_checks)
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """The plain-data form of a config (lists for tuples), ready for YAML or a checkpoint."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'solver.lr=2e-4' -> (['solver', 'lr'], 0.0002). Values are YAML scalars or lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value, e.g. solver.lr=2e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = load_yaml(raw, source=f"override '{text}'") if raw.strip() else None
    except YAMLInputError as e:
        raise ConfigError(str(e)) from None
    return key.split("."), value


def section(data: dict[str, Any], path: Sequence[str], key: str) -> dict[str, Any]:
    """The mapping at `path` in `data`, created where absent; `key` (the dotted override being set) names
    the culprit when a step of the path holds a value instead of a section."""
    node = data
    for i, part in enumerate(path):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{key}': '{'.'.join(path[: i + 1])}' is not a section")
        node = nxt
    return node


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe not found: {p}")
    try:
        data = read_yaml_file(p)
    except YAMLInputError as e:
        raise ConfigError(str(e)) from None
    if data is None:  # an empty file is a mistake (a truncated copy?), not a request for the defaults
        raise ConfigError(f"{p}: the recipe is empty; start from one in recipes/ (e.g. recipes/quickstart.yaml)")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a recipe must be a mapping of sections (model:, data:, solver:, ...)")
    return data


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Recipe from a YAML file (or the defaults when `path` is None) plus `key=value` overrides."""
    data = read_yaml(path) if path is not None else {}
    data.pop("variants", None)  # ablation files carry variants; `ablate` expands them
    try:
        return _with_overrides(data, overrides)
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None


def set_overrides(data: dict[str, Any], overrides: Sequence[str], sections: tuple[str, ...] | None = None
                  ) -> dict[str, Any]:
    """The recipe mapping `data`, modified in place, with `key=value` overrides set (the value replaces the
    key's, a mapping included); with `sections`, keys outside those sections are refused. The one way the
    command line changes a recipe: train, evaluate, predict and ablate all go through here."""
    for text in overrides:
        keys, value = parse_override(text)
        if sections is not None and keys[0] not in sections:
            raise ConfigError(f"override '{text}': only {' / '.join(s + '.*' for s in sections)} keys can change "
                              f"here (the model comes from the checkpoint)")
        section(data, keys[:-1], ".".join(keys))[keys[-1]] = value
    return data


def _with_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...],
                    sections: tuple[str, ...] | None = None) -> Recipe:
    """The recipe of mapping `data` (modified in place) with `key=value` overrides set, strictly."""
    return from_dict(Recipe, set_overrides(data, overrides, sections))


def override_recipe(recipe: Recipe, overrides: list[str] | tuple[str, ...],
                    sections: tuple[str, ...] = ("inference", "data")) -> Recipe:
    """`recipe` with `key=value` overrides in the named sections only: where the model is already built
    from weights (evaluate, predict), its inference thresholds or test size may change, its architecture
    may not."""
    return _with_overrides(to_dict(recipe), overrides, sections) if overrides else recipe


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Rebuild a recipe saved in a checkpoint or a run's config.yaml (it trained as it was: options its model
    does not use are not refused here)."""
    return from_dict(Recipe, data, unused_checks=False)


def with_absolute_dataset_spec(recipe: Recipe) -> Recipe:
    """`recipe` with a custom dataset spec (data.dataset ending in .yaml / .yml) made absolute, as `train`
    saves it: a relative path in config.yaml or a checkpoint would find nothing from another directory."""
    spec = recipe.data.dataset
    if not spec.lower().endswith((".yaml", ".yml")) or Path(spec).expanduser().is_absolute():
        return recipe
    spec = os.path.abspath(Path(spec).expanduser())  # not resolve(): the spec's paths are relative to a link
    return dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, dataset=spec))


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)
