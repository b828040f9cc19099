"""A training run's directory: whether an existing one may be written into, and the env.json it records.

Layout (README, "What the first command does"): config.yaml, env.json, metrics.jsonl, checkpoints/, eval/,
vis/, curves.png. `train` refuses to write into a directory that holds a run unless told (--resume,
--exist-ok); the remains of a run that stopped before its first step are not a run and are reused.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from maskformer_cli import __version__
from maskformer_cli.errors import UserError


def env_json(world_size: int, device: torch.device) -> dict[str, Any]:
    """What env.json records: versions, git sha, world size, device, command line, host and start time."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {
        "maskformer": __version__, "git_sha": sha, "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "world_size": world_size, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "argv": sys.argv, "hostname": platform.node(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# What `train` writes into a run directory before its first training step.
STARTUP_FILES = frozenset({"checkpoints", "eval", "config.yaml", "env.json", "metrics.jsonl"})


def never_trained(run_dir: Path) -> bool:
    """Whether `run_dir` holds only what a run leaves when it stops before its first step (no checkpoint,
    no evaluation, no training record), and nothing of anyone else's."""
    entries = {p.name: p for p in run_dir.iterdir()}
    if not set(entries) <= STARTUP_FILES:
        return False
    for name in ("checkpoints", "eval"):
        if name in entries and (not entries[name].is_dir() or any(entries[name].iterdir())):
            return False
    log = entries.get("metrics.jsonl")
    return log is None or '"kind": "train"' not in log.read_text(encoding="utf-8", errors="replace")


def prepare_run_dir(run_dir: Path, resume: bool, exist_ok: bool) -> str | None:
    """Make the run directory; returns a notice when it reuses the remains of a run that never trained."""
    notice = None
    if run_dir.exists() and any(run_dir.iterdir()) and not (resume or exist_ok):
        if not never_trained(run_dir):
            if (run_dir / "config.yaml").is_file() and not any((run_dir / "checkpoints").glob("*.pt")):
                # --resume would find nothing to continue: do not send the user there
                raise UserError(f"run directory {run_dir} holds a run that saved no checkpoint: --exist-ok starts "
                                f"again in it (its logs are overwritten), or use another --run-dir / name=")
            raise UserError(f"run directory {run_dir} already exists: use --resume to continue it, --exist-ok to "
                            f"write into it, or another --run-dir / name=")
        # A run that failed to start must not block its own rerun (nor need --exist-ok, which would also
        # let a real run be overwritten).
        notice = f"note: reusing {run_dir}: an earlier run there stopped before its first step (no checkpoint)"
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "eval").mkdir(exist_ok=True)
    return notice
