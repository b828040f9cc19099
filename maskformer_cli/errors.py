"""Errors a user can fix. The CLI prints them as one red line (exit 1); `--verbose` adds the traceback."""


class UserError(Exception):
    """Bad input: a missing file, a wrong value, a corrupt archive. The message says what and where."""

