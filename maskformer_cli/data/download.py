"""Resumable, checksummed HTTP downloads.

`download(url, dest)` writes into `dest.part`, resumes it with an HTTP Range request after a cut
connection (in the same call, or in a later run), verifies size and SHA-256, and only then renames it
to `dest`: a file at `dest` is always complete and verified. A small sidecar (`dest.sha256.json`)
remembers the digest so that a later run does not hash a 19 GB archive again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from maskformer_cli.errors import UserError

CHUNK = 1 << 20


class _Interrupted(Exception):
    """The transfer stopped before the end; the .part file keeps what arrived."""


def _user_agent() -> str:
    from maskformer_cli import __version__

    return f"maskformer-cli/{__version__} (python urllib)"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def disk_full_error(where: Path, what: str, need: int | None = None) -> UserError:
    need_txt = f" (needs about {human_bytes(need)})" if need else ""
    return UserError(f"disk full while {what} in {where}{need_txt}: free some space there (or choose another "
                     f"--root / $MASKFORMER_DATASETS) and run the same command again")


def check_free_space(where: Path, need: int, what: str) -> None:
    """Fail early, before writing anything, when `need` bytes clearly do not fit at `where`."""
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise UserError(f"not enough disk space for {what}: needs {human_bytes(need)}, {human_bytes(free)} "
                        f"free at {probe}; free some space or choose another --root / $MASKFORMER_DATASETS")


# ------------------------------------------------------------------------------------------ checksums


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return h.hexdigest()


def _sidecar(path: Path, cache_dir: Path | None = None) -> Path:
    """Where the checksum cache of `path` lives: beside it (our own downloads), or in `cache_dir` for a file
    the user owns (an archive given with --from-archive), keyed by its absolute path: nothing is written
    next to the user's files."""
    if cache_dir is None:
        return path.with_name(path.name + ".sha256.json")
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return cache_dir / f"{path.name}.{key}.sha256.json"


def cached_sha256(path: Path, on_bytes: Callable[[int], None] | None = None, cache_dir: Path | None = None) -> str:
    """SHA-256 of `path`, reusing the cache record when size and mtime still match (else hashing again);
    the record goes beside `path`, or into `cache_dir` when given."""
    st = path.stat()
    side = _sidecar(path, cache_dir)
    try:
        rec = json.loads(side.read_text())
        if rec["size"] == st.st_size and rec["mtime_ns"] == st.st_mtime_ns:
            return str(rec["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = sha256_file(path, on_bytes)
    _write_sidecar(path, digest, cache_dir)
    return digest


def _write_sidecar(path: Path, digest: str, cache_dir: Path | None = None) -> None:
    st = path.stat()
    with contextlib.suppress(OSError):  # only a cache
        side = _sidecar(path, cache_dir)
        side.parent.mkdir(parents=True, exist_ok=True)
        side.write_text(json.dumps({"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))


# ------------------------------------------------------------------------------------------ transfer


class _NullBar:
    def start(self, total: int | None, completed: int) -> None: ...

    def advance(self, n: int) -> None: ...


class _RichBar:
    def __init__(self, progress, description: str):
        self.progress = progress
        self.task = progress.add_task(description, total=None)

    def start(self, total: int | None, completed: int) -> None:
        self.progress.update(self.task, total=total, completed=completed)

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)


@contextlib.contextmanager
def _progress_bar(description: str, enabled: bool, console=None) -> Iterator[_NullBar | _RichBar]:
    if not enabled:
        yield _NullBar()
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=console, transient=False) as progress:
        yield _RichBar(progress, description)


def _fetch(url: str, part: Path, offset: int, timeout: float, bar, elsewhere: str | None = None) -> None:
    """One request: append to `part` from `offset`. Raises _Interrupted when the data stops early, UserError
    (ending with `elsewhere` when given) on an HTTP error that retrying cannot cure."""
    req = urllib.request.Request(url, headers={"User-Agent": _user_agent()})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)  # follows 301/302/303/307 redirects
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            return  # nothing left to send: the .part is complete (the checksum decides)
        if e.code >= 500 or e.code in (408, 429):
            raise _Interrupted(f"HTTP {e.code} {e.reason}") from None
        advice = f"; {elsewhere}" if elsewhere else ""
        raise UserError(f"cannot download {url}: HTTP {e.code} {e.reason}{advice}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise _Interrupted(f"cannot connect: {reason}") from None
    with resp:
        status = resp.status
        if offset and status == 200:
            offset = 0  # the server ignored the Range header: start over
        elif status == 206:
            start = _content_range_start(resp.headers.get("Content-Range", ""))
            if start != offset:
                part.unlink(missing_ok=True)  # cannot splice safely: start over
                raise _Interrupted(f"server resumed at byte {start}, not {offset}")
        length = resp.headers.get("Content-Length")
        expected_end = offset + int(length) if length is not None and length.isdigit() else None
        content_total = _content_range_total(resp.headers.get("Content-Range", ""))
        bar.start(content_total or expected_end, offset)
        received = offset
        try:
            with open(part, "ab" if offset else "wb") as f:
                while True:
                    try:
                        chunk = resp.read(CHUNK)
                    except (http.client.HTTPException, OSError) as e:
                        raise _Interrupted(f"connection lost: {e or type(e).__name__}") from None
                    if not chunk:
                        break
                    f.write(chunk)
                    received += len(chunk)
                    bar.advance(len(chunk))
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise disk_full_error(part.parent, f"downloading {part.name}") from None
            raise
        if expected_end is not None and received < expected_end:
            raise _Interrupted(f"connection closed after {received} of {expected_end} bytes")


def _content_range_start(value: str) -> int | None:
    # "bytes 100-999/1000"
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _content_range_total(value: str) -> int | None:
    try:
        total = value.rsplit("/", 1)[1]
        return int(total) if total != "*" else None
    except (IndexError, ValueError):
        return None


def download(url: str, dest: Path, *, sha256: str | None = None, size: int | None = None, retries: int = 4,
             timeout: float = 60.0, backoff: float = 1.0, progress: bool = True, console=None,
             elsewhere: str | None = None) -> Path:
    """Download `url` to `dest` (resumable via `dest.part`); verify `size`/`sha256` before renaming.

    A cut connection is resumed with an HTTP Range request up to `retries` times (waits `backoff`, 2x
    `backoff`, ... seconds); after that the .part file stays and the same call later resumes it.
    Returns `dest`. Raises UserError (naming the URL and file) on HTTP errors, checksum mismatch, a full
    disk or when the retries are used up. `elsewhere` is the advice those errors end with on supplying the
    file another way (default: prepare-data's `--from-archive PATH`).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if size is not None:
        if have > size:
            part.unlink()
            have = 0
        check_free_space(dest.parent, size - have, f"downloading {dest.name}")
    failures = 0
    with _progress_bar(f"download {dest.name}", progress, console) as bar:
        while True:
            offset = part.stat().st_size if part.exists() else 0
            try:
                _fetch(url, part, offset, timeout, bar, elsewhere)
                break
            except _Interrupted as e:
                failures += 1
                if failures > retries:
                    kept = part.stat().st_size if part.exists() else 0
                    advice = elsewhere or "download it yourself and pass --from-archive PATH"
                    raise UserError(f"download of {url} interrupted ({e}); {human_bytes(kept)} kept in {part}: "
                                    f"run the same command again to resume (or {advice})") from None
                time.sleep(backoff * 2 ** (failures - 1))
    if not part.exists():
        part.touch()
    got_size = part.stat().st_size
    if size is not None and got_size != size:
        part.unlink()
        raise UserError(f"download of {url} has {got_size} bytes, expected {size}: the partial file was "
                        f"removed; run again to download it anew")
    digest = sha256_file(part)
    if sha256 is not None and digest != sha256.lower():
        part.unlink()
        advice = elsewhere or "download it yourself and pass --from-archive PATH --accept-checksum"
        raise UserError(f"checksum mismatch for {url}: sha256 {digest}, expected {sha256}; the download was "
                        f"removed, run again to download it anew (or {advice})")
    os.replace(part, dest)
    _write_sidecar(dest, digest)
    return dest
