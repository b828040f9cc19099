"""Errors a user can fix, and how they are shown. The CLI prints them as one red line (exit 1); `--verbose`
(or MASKFORMER_VERBOSE=1) adds the traceback. Commands and the launcher read both from here, not from the CLI."""

from __future__ import annotations

import os
import re


class UserError(Exception):
    """Bad input: a missing file, a wrong value, a corrupt archive. The message says what and where."""


_verbose = False


def set_verbose(on: bool) -> None:
    """`maskformer -v`: show tracebacks (set by the CLI's callback)."""
    global _verbose
    _verbose = on


def verbose() -> bool:
    """Tracebacks wanted: `maskformer -v`, or MASKFORMER_VERBOSE set (which every torchrun rank inherits)."""
    return _verbose or bool(os.environ.get("MASKFORMER_VERBOSE"))


def one_line(e: UserError) -> str:
    """The user's one line. A UserError raised in a DataLoader worker reaches here re-raised by torch with
    the worker's whole traceback as its message: keep only the original error's text."""
    text = str(e)
    marker = "Original Traceback (most recent call last):"
    if marker not in text:
        return text
    lines = [ln for ln in text.split(marker, 1)[1].splitlines() if ln.strip()]
    return re.sub(r"^[\w.]+Error: ", "", lines[-1]) if lines else text
