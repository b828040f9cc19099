"""Atomic, self-describing checkpoints, the run's checkpoint directory, and RNG state for exact resume.

A checkpoint written by the engine is a dict loadable with `torch.load(weights_only=True)`:

    {"format_version": 1, "step": int, "model": state_dict, "optimizer": ..., "scheduler": ...,
     "scaler": ..., "rng": [capture_rng_state() of rank 0, rank 1, ...], "sampler": {"position"},
     "best_metric": float | None, "recipe": to_dict(recipe), "classes": [names], "dataset": str,
     "thing_ids": [ids], "ignore_label": int}

`training_checkpoint` builds it and `restore_training` restores a run from it.

Everything in it is tensors, dicts, lists, tuples, numbers, strings or None: no pickled objects, so
loading a file never executes code.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskformer_cli.errors import UserError
from maskformer_cli.models.pickle_safe import load_torch_weights_only

CHECKPOINT_FORMAT_VERSION = 1

_STEP_RE = re.compile(r"^step_(\d+)\.pt$")
_UMASK = os.umask(0)  # read once at import (setting it is the only way to read it), then restored
os.umask(_UMASK)


# ------------------------------------------------------------------------------------------ atomic files


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable (POSIX); directories cannot be opened this way on Windows.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give the checkpoint the usual permissions instead
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_UMASK)
    finally:
        os.close(fd)
    return Path(tmp)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """`torch.save(obj)` to `path` such that a crash at any moment leaves the old file or the new one.

    The data go to a temporary file in the same directory (same filesystem, so the rename is atomic),
    which is flushed and fsync'ed, then renamed over `path` with `os.replace`; the directory is
    fsync'ed so that the rename survives a power loss. A crash leaves at most a hidden
    `.NAME.*.tmp` file behind (see `remove_stale_temps`), never a truncated `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _atomic_link(src: Path, dst: Path) -> None:
    """Make `dst` name the same content as `src` atomically: a hard link if possible, else a copy."""
    tmp = _temp_path(dst)
    tmp.unlink()
    try:
        try:
            os.link(src, tmp)
        except OSError:  # no hard links on this filesystem: copy, durably
            import shutil

            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dst.parent)


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete temporary files left by an interrupted `atomic_save` in `directory`; return them.

    Only call this when no other process is saving into `directory` (the engine saves from rank 0).
    """
    removed = []
    for p in Path(directory).glob(".*.tmp"):
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


# ------------------------------------------------------------------------------------------------- load


def load(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `atomic_save`/`CheckpointManager` (weights_only: no code runs).

    Raises `UserError` naming the file when it is missing, truncated, corrupt, or holds objects that
    a weights-only load refuses (e.g. an arbitrary pickle).
    """
    path = Path(path)
    obj = load_torch_weights_only(path, map_location=map_location, what="checkpoint")
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


# --------------------------------------------------------------------------------------------- manager


class CheckpointManager:
    """The run's `checkpoints/` directory: step_{step:08d}.pt files, `last.pt` and `best.pt`.

    `last.pt` and `best.pt` are hard links to (or, where links are impossible, copies of) a step file,
    replaced atomically, so each of them is itself a complete checkpoint that `evaluate`/`predict`
    can read. Older step files beyond `keep_last` are deleted only after the new one is committed.
    """

    def __init__(self, directory: str | Path, keep_last: int | None = 2) -> None:
        """`keep_last`: number of step files to keep (the newest); None or <= 0 keeps all of them."""
        self.directory = Path(directory)
        self.keep_last = keep_last if keep_last and keep_last > 0 else None
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def last_path(self) -> Path:
        return self.directory / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.directory / "best.pt"

    def step_path(self, step: int) -> Path:
        return self.directory / f"step_{step:08d}.pt"

    def step_files(self) -> list[tuple[int, Path]]:
        """(step, path) of every step file, oldest first."""
        found = []
        for p in self.directory.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def save(self, step: int, state: Mapping[str, Any], is_best: bool = False) -> Path:
        """Write step_{step:08d}.pt atomically, then point last.pt (and best.pt if `is_best`) at it.

        Returns the step file's path. Step files older than the newest `keep_last` ones are removed
        afterwards; step files NEWER than `step` (left by a run that was resumed from an earlier
        checkpoint) are never removed here, and `latest_valid` prefers `last.pt` over them.
        """
        path = atomic_save(dict(state), self.step_path(step))
        _atomic_link(path, self.last_path)
        if is_best:
            _atomic_link(path, self.best_path)
        if self.keep_last is not None:
            older = [p for s, p in self.step_files() if s < step]
            for p in older[: max(0, len(older) - (self.keep_last - 1))]:
                p.unlink(missing_ok=True)
        return path

    def _candidates(self) -> list[Path]:
        """Newest first: the step file last.pt names (or last.pt itself), then step files by step."""
        steps = [p for _, p in reversed(self.step_files())]
        out: list[Path] = []
        if self.last_path.is_file():
            same = [p for p in steps if _same_file(p, self.last_path)]
            out.append(same[0] if same else self.last_path)
        out += [p for p in steps if p not in out]
        return out

    def load_latest(self, map_location: Any = "cpu") -> tuple[Path, dict[str, Any]] | None:
        """(path, checkpoint) of the newest checkpoint that loads, skipping corrupt ones with a warning."""
        for p in self._candidates():
            try:
                return p, load(p, map_location=map_location)
            except UserError as e:
                warnings.warn(f"skipping unreadable checkpoint: {e}", RuntimeWarning, stacklevel=2)
        return None

    def latest_valid(self) -> Path | None:
        """Path of the newest checkpoint that loads (None when there is none); see `load_latest`."""
        found = self.load_latest()
        return found[0] if found else None

    def load(self, path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
        return load(path, map_location=map_location)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """The state of python `random`, numpy's global RNG, torch CPU and (if initialised) the current CUDA device.

    Every value is a tensor, int, float or None, so the dict survives a weights_only load. Only the
    current CUDA device is captured: under torchrun each rank drives one device, and querying the
    others would create CUDA contexts on them.
    """
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng_state`; a CUDA state is restored only when CUDA is available."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (
            str(npst["name"]),
            npst["keys"].numpy().astype(np.uint32),
            int(npst["pos"]),
            int(npst["has_gauss"]),
            float(npst["cached_gaussian"]),
        )
    )
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu().to(torch.uint8))


# ------------------------------------------------------------------------------------- training state


def training_checkpoint(
    *, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
    rng: list[dict[str, Any]], position: int, best_metric: float | None, recipe_dict: dict[str, Any],
    dataset: Any, extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint of a training run at `step` (the format in this module's docstring).

    rng: every rank's `capture_rng_state()`; position: samples the sampler has handed out (this rank's
    share); recipe_dict: `config.to_dict(recipe)`; dataset: its DatasetInfo (classes, name, things, ignore
    label); extra: diagnostics such as `ddp_params_identical`."""
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION, "step": step, "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {}, "rng": rng,
        "sampler": {"position": position}, "best_metric": best_metric,
        "recipe": recipe_dict, "classes": list(dataset.classes), "dataset": dataset.name,
        "thing_ids": list(dataset.thing_ids), "ignore_label": dataset.ignore_label, **(extra or {}),
    }


def restore_training(
    ckpt: dict[str, Any], recipe_dict: Mapping[str, Any], *, model: torch.nn.Module,
    optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any, rank: int,
) -> tuple[int, float | None]:
    """Inverse of `training_checkpoint` for resume: checks that `ckpt` fits the recipe (`check_compatible`),
    loads model, optimizer, scheduler, scaler and this rank's RNG state; returns (step, best metric)."""
    saved_ds = ((ckpt.get("recipe") or {}).get("data") or {}).get("dataset")
    current_ds = (recipe_dict.get("data") or {}).get("dataset")
    if isinstance(saved_ds, str) and os.path.abspath(saved_ds) == current_ds:
        ckpt["recipe"]["data"]["dataset"] = current_ds  # saved relative by an earlier version
    check_compatible(ckpt, recipe_dict)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    rngs = ckpt.get("rng") or []
    if rank < len(rngs):
        restore_rng_state(rngs[rank])
    return int(ckpt["step"]), ckpt.get("best_metric")


# -------------------------------------------------------------------------------------- compatibility


def _diff(
    prefix: str, saved: Mapping[str, Any], current: Mapping[str, Any], defaults: Mapping[str, Any]
) -> list[str]:
    """Keys whose values differ; a key missing on one side counts as its schema default."""
    out = []
    missing = object()
    for key in sorted(set(saved) | set(current)):
        a = saved.get(key, defaults.get(key, missing))
        b = current.get(key, defaults.get(key, missing))
        if a != b:
            show = lambda v: "(absent)" if v is missing else repr(v)  # noqa: E731
            out.append(f"{prefix}{key}: checkpoint {show(a)}, recipe {show(b)}")
    return out


def check_compatible(
    ckpt: Mapping[str, Any], recipe_dict: Mapping[str, Any], *, classes: list[str] | None = None
) -> None:
    """Refuse (UserError) to resume `ckpt` with a recipe whose model section or dataset differs.

    `recipe_dict` is `config.to_dict(recipe)`. Solver, loss, inference and other data fields may change
    on resume (e.g. a longer schedule); the network, the dataset (and its class list when `classes`
    is given) may not, since the weights and optimizer state would not fit or would mean something else.
    """
    from maskformer_cli.config import ModelConfig, to_dict

    version = ckpt.get("format_version")
    if version is None:
        raise UserError(
            "not a resumable checkpoint: it has no 'format_version' (use --init-from for weights)"
        )
    if version > CHECKPOINT_FORMAT_VERSION:
        raise UserError(
            f"checkpoint format {version} is newer than this version of maskformer supports "
            f"({CHECKPOINT_FORMAT_VERSION}); upgrade maskformer"
        )
    saved = ckpt.get("recipe") or {}
    problems = _diff("model.", saved.get("model", {}), recipe_dict.get("model", {}), to_dict(ModelConfig()))
    saved_ds = (saved.get("data") or {}).get("dataset", ckpt.get("dataset"))
    current_ds = (recipe_dict.get("data") or {}).get("dataset")
    if saved_ds != current_ds:
        problems.append(f"data.dataset: checkpoint {saved_ds!r}, recipe {current_ds!r}")
    if classes is not None and ckpt.get("classes") is not None and list(ckpt["classes"]) != list(classes):
        n_saved, n_now = len(ckpt["classes"]), len(classes)
        problems.append(
            f"classes: checkpoint has {n_saved} ({_preview(ckpt['classes'])}), dataset {n_now} ({_preview(classes)})"
        )
    if problems:
        raise UserError(
            "cannot resume: the checkpoint was trained with a different setup: "
            + "; ".join(problems)
            + " (start a new run, or use --init-from to reuse the weights)"
        )


def _preview(names: list[str], k: int = 3) -> str:
    names = list(names)
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")
