"""`--gpus N`: relaunch a command under torchrun, and turn the job's outcome into one exit code.

The relaunched job runs torchrun's own code (torch.distributed.run) through `launcher_main`, which keeps
torchrun's behaviour but not its error report when the failure is already explained (a rank's UserError, a
stop signal): the relaunching process then prints one line instead of a wall of tracebacks. The process
group itself (init, collectives) is `distributed.py`'s.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from maskformer_cli.distributed import under_torchrun
from maskformer_cli.errors import UserError


def strip_option(argv: list[str], option: str) -> list[str]:
    """`argv` without `option VALUE` / `option=VALUE` (every occurrence; arguments after `--` kept)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out += argv[i:]
            break
        if arg == option:
            i += 2
            continue
        if arg.startswith(option + "="):
            i += 1
            continue
        out.append(arg)
        i += 1
    return out


def torchrun_command(nproc: int, argv: list[str], module: str = "maskformer_cli") -> list[str]:
    """The command `relaunch_with_torchrun` runs (for logging and `ablate --dry-run`)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--standalone",
        "-m",
        module,
        *strip_option(list(argv), "--gpus"),
    ]


# The relaunched job runs torchrun's own code (torch.distributed.run) through `launcher_main`, which keeps
# torchrun's behaviour but not its error report when the failure is already explained (a UserError, a stop
# signal): the relaunching process then prints one line instead of a wall of tracebacks.
_LAUNCHER = "import sys; from maskformer_cli.launch import launcher_main; sys.exit(launcher_main(sys.argv[1:]))"

RANK_REPORTS_ENV = "MASKFORMER_RANK_REPORTS"
"""Set by `relaunch_with_torchrun` for its ranks: a directory where a rank that fails with a UserError leaves
its message (`report_user_error`)."""


def launcher_command(
    nproc: int, argv: list[str], module: str = "maskformer_cli", log_dir: str | None = None
) -> list[str]:
    """What `relaunch_with_torchrun` runs: `torchrun_command`'s arguments, through `launcher_main`.

    `log_dir` is torchrun's `--log-dir`; without one, torchrun makes a `torchelastic_*` folder in the system
    temp dir on every run and never removes it."""
    logs = ["--log-dir", log_dir] if log_dir else []
    return [sys.executable, "-c", _LAUNCHER, *logs, *torchrun_command(nproc, argv, module)[3:]]


def report_user_error(message: str) -> bool:
    """In a rank of a relaunched job: leave this rank's UserError for the relaunching process, which prints
    it (once for the job), and return True. False elsewhere: the caller prints it as usual."""
    folder = os.environ.get(RANK_REPORTS_ENV)
    if not folder or not under_torchrun() or not Path(folder).is_dir():
        return False
    rank = int(os.environ["RANK"])
    path = Path(folder) / f"rank{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rank": rank, "time": time.time(), "message": message}))
    os.replace(tmp, path)  # a reader never sees half a report
    return True


def rank_reports(folder: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The UserError reports of a relaunched job's ranks: rank 0's first, then in the order they came."""
    folder = folder if folder is not None else os.environ.get(RANK_REPORTS_ENV)
    if not folder or not Path(folder).is_dir():
        return []
    out = []
    for p in Path(folder).glob("rank*.json"):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda r: (r.get("rank") != 0, r.get("time", 0.0)))


def peer_reported_user_error() -> bool:
    """Whether a rank of this relaunched job has reported a UserError. Its exit breaks the collectives of
    the other ranks ("Connection closed"): their errors follow from it and need no traceback of their own."""
    return under_torchrun() and bool(rank_reports())


def stop_signal_of(exitcode: int | None) -> int | None:
    """SIGINT / SIGTERM when `exitcode` says a process stopped on one (128 + signal after saving a
    checkpoint, or killed by it: -signal); None otherwise."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        if exitcode in (128 + sig, -sig):
            return int(sig)
    return None


def launcher_exit(exitcodes: Mapping[int, int], reports: list[dict[str, Any]]) -> tuple[int, bool]:
    """The launcher's (exit code, explained) for a failed job, from each failed rank's exit code.

    A reported UserError: (1, True), the relaunching process prints it. Every failed rank stopped by SIGINT /
    SIGTERM: (128 + that signal, True), as a single process would exit. Otherwise (1, False): a genuine
    failure, whose torchrun report is worth printing.
    """
    if reports:
        return 1, True
    signals = [stop_signal_of(code) for _, code in sorted(exitcodes.items())]
    if signals and None not in signals:
        return 128 + signals[0], True  # rank 0's signal (or the lowest failed rank's)
    return 1, False


def launcher_main(args: list[str]) -> int:
    """`torchrun ARGS` (torch.distributed.run), returning an exit code; prints torchrun's failure report
    only when `launcher_exit` finds the failure unexplained."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    class _Explained(logging.Filter):
        # The agent logs each failed worker ("failed (exitcode: 1) local_rank: 0 ...") and the signals it
        # passes on: noise when a rank has reported its UserError, or the ranks stopped on a signal.
        def filter(self, record: logging.LogRecord) -> bool:
            if record.levelno < logging.WARNING or not record.name.startswith("torch.distributed.elastic"):
                return True
            if rank_reports():
                return False
            text = record.getMessage()
            code = re.search(r"exitcode: (-?\d+)", text)
            if code:
                return stop_signal_of(int(code.group(1))) is None
            return "death signal" not in text and "closing signal" not in text

    explained = _Explained()
    for name in ("torch", "torch.distributed"):  # torch's own stderr handlers (its loggers do not propagate)
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(explained)
    try:
        run(parse_args(args))
    except ChildFailedError as e:
        code, explained = launcher_exit({rank: f.exitcode for rank, f in e.failures.items()}, rank_reports())
        if not explained:
            print(e.format_msg(), file=sys.stderr)
        return code
    except SignalException as e:
        return 128 + int(e.sigval)  # the agent has passed the signal on to the workers and waited for them
    return 0


def relaunch_result(rc: int, reports: list[dict[str, Any]]) -> int:
    """The relaunching process's exit code for the launcher's `rc`: a rank's UserError is raised here (one
    red line, exit 1); a stop by SIGINT / SIGTERM is said in one line and keeps its 128 + signal code."""
    if reports:
        raise UserError(reports[0]["message"])
    sig = stop_signal_of(rc)
    if sig is not None:
        from maskformer_cli.reporting import console

        console.print(f"[yellow]the torchrun job stopped on {signal.Signals(sig).name} (exit code {rc})[/]",
                      highlight=False)
        return 128 + sig
    return rc


def relaunch_with_torchrun(
    nproc: int, argv: list[str], module: str = "maskformer_cli", timeout: float | None = None
) -> int:
    """Run `python -m torch.distributed.run --nproc-per-node N --standalone -m maskformer_cli ARGV`.

    `argv` is the CLI's arguments after the program name (e.g. `sys.argv[1:]`); `--gpus` is removed so
    the children run in place. Returns the job's exit code: 0, 128 + signal when the ranks stopped on SIGINT /
    SIGTERM (said in one line), or non-zero when a rank failed; a rank's UserError is raised here instead
    (`report_user_error`). Without CUDA the N ranks run on CPU with gloo (useful for testing); with CUDA, N
    may not exceed the visible devices. `timeout` (seconds, for tests) stops the job and returns 124 when it
    runs longer. SIGTERM sent to this process is passed on, so the ranks save a checkpoint and stop.
    """
    if nproc < 1:
        raise UserError(f"--gpus must be >= 1, got {nproc}")
    if under_torchrun():
        raise UserError("--gpus cannot be used inside torchrun; the job is already distributed")
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise UserError(
            f"--gpus {nproc} requested but only {torch.cuda.device_count()} CUDA devices are visible"
        )
    with tempfile.TemporaryDirectory(prefix="maskformer-ranks-") as reports:
        # torchrun's per-run folder goes inside `reports`, so it is removed with it
        cmd = launcher_command(nproc, argv, module, log_dir=os.path.join(reports, "torchrun"))
        proc = subprocess.Popen(cmd, env={**os.environ, RANK_REPORTS_ENV: reports})
        rc = _wait(proc, timeout)
        return rc if rc == 124 else relaunch_result(rc, rank_reports(reports))


def _wait(proc: subprocess.Popen, timeout: float | None) -> int:
    import threading

    old = None
    if threading.current_thread() is threading.main_thread():
        # torchrun's ranks run in sessions of their own: a SIGTERM for this process reaches them only if
        # passed on (to the launcher, which passes it to the ranks); dying here would orphan them
        old = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun forwards SIGTERM to its workers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return 124
    except KeyboardInterrupt:
        # Ctrl-C reaches torchrun too (same process group): give it time to stop its workers (it waits 30 s
        # for them before killing them; killed sooner, it would leave them running).
        try:
            return proc.wait(timeout=60)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
            return 130
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
