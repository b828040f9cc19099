"""`maskformer train`: load the recipe, relaunch under torchrun for `--gpus N`, set up the process group,
train (trainer.py), and turn the outcome into the exit code."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from maskformer_cli import distributed as dist
from maskformer_cli import launch
from maskformer_cli.config import load_recipe
from maskformer_cli.errors import UserError, one_line, verbose
from maskformer_cli.trainer import train


def run_train(recipe_path: Path, overrides: list[str], *, resume: bool, init_from: Path | None, gpus: int,
              run_dir: Path | None, exist_ok: bool, device: str) -> None:
    """The `train` command. A run stopped by SIGINT / SIGTERM (checkpoint saved) exits with 128 + the signal
    (130, 143), not 0."""
    recipe = load_recipe(recipe_path, overrides)
    if gpus > 0 and "LOCAL_RANK" not in os.environ:
        argv = launch.strip_option(sys.argv[1:], "--gpus")
        raise SystemExit(launch.relaunch_with_torchrun(gpus, argv))
    try:
        info = dist.init_distributed(device)
        finished = False
        try:
            result = train(recipe, run_dir=run_dir, resume=resume, init_from=init_from, exist_ok=exist_ok,
                           device=info.device)
            finished = True
        finally:
            dist.cleanup(sync=finished)
    except UserError as e:
        # A rank of `train --gpus N`: the relaunching process prints the job's one line (rank 0's).
        if launch.report_user_error(one_line(e)) and not verbose():
            raise SystemExit(1) from None
        raise
    except Exception:
        # A peer's UserError ended its process, which breaks this rank's collectives ("Connection closed"):
        # a consequence, not a second error worth a traceback.
        if launch.peer_reported_user_error() and not verbose():
            raise SystemExit(1) from None
        raise
    if result.stop_signal is not None:
        # A stopped run is not a finished one: `train && evaluate` and schedulers must see the failure.
        raise SystemExit(128 + result.stop_signal)
