"""SIGTERM and SIGINT as a request: training saves a checkpoint and exits cleanly at the end of the step."""

from __future__ import annotations

import signal
from typing import Any


class StopFlag:
    """SIGTERM/SIGINT ask for a checkpoint and a clean exit at the end of the current step."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading_main():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        # A second Ctrl-C stops at once. A second SIGTERM does not: under `--gpus N` a scheduler's SIGTERM
        # can reach a rank twice (directly, and passed on by torchrun), and must still save the checkpoint.
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
