"""Build a dataset aside, then move it into place; the stamp says which datasets are complete.

A preparation works in `<root>/.maskformer-tmp-<dataset>-<random>/` (same file system as the result, so
moving is a rename) and is deleted whatever happens. `commit` moves the finished tree into the dataset
directory; the stamp entry of the dataset is removed before and written after, so an interrupted commit
never looks prepared. Several catalog datasets can share one directory (ade20k and ade20k-panoptic
both live in ADEChallengeData2016), hence one stamp file with an entry per dataset.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from maskformer_cli.errors import UserError

STAMP = ".maskformer_prepared.json"
STAMP_FORMAT = 1
TMP_PREFIX = ".maskformer-tmp-"


# ------------------------------------------------------------------------------------------------ stamp


def read_stamp(dataset_dir: Path) -> dict[str, Any]:
    """The stamp file's content ({} if absent or unreadable: then nothing counts as prepared)."""
    try:
        data = json.loads((Path(dataset_dir) / STAMP).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def stamp_entry(dataset_dir: Path, name: str) -> dict[str, Any] | None:
    entry = read_stamp(dataset_dir).get("datasets", {}).get(name)
    return entry if isinstance(entry, dict) else None


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as indented JSON to `path` through a temp file and a rename: readers see the old file or
    the whole new one, never a partial write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_stamp_entry(dataset_dir: Path, name: str, entry: dict[str, Any] | None) -> None:
    """Set (or with None, remove) one dataset's entry; keys written by other tools are kept."""
    data = read_stamp(dataset_dir)
    datasets = data.get("datasets") if isinstance(data.get("datasets"), dict) else {}
    if entry is None:
        if name not in datasets:
            return
        datasets.pop(name)
    else:
        datasets[name] = entry
    data["datasets"] = datasets
    data["format"] = STAMP_FORMAT
    write_json_atomic(Path(dataset_dir) / STAMP, data)


# ---------------------------------------------------------------------------------------------- staging


class Staging:
    """A private work directory under the datasets root, removed on exit (success or failure).

    `out` mirrors the dataset directory; `src(key)` is where an archive is extracted; `scratch` is free.
    A lock file stops two preparations of the same dataset from running at once; leftovers of a killed
    run are removed when the next run starts.
    """

    def __init__(self, root: Path, dataset: str):
        self.root = Path(root)
        self.dataset = dataset
        self.lock = self.root / f".maskformer-{dataset}.lock"
        self.path: Path | None = None

    def __enter__(self) -> Staging:
        self.root.mkdir(parents=True, exist_ok=True)
        self._acquire()
        for stale in self.root.glob(f"{TMP_PREFIX}{self.dataset}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.path = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{self.dataset}-", dir=self.root))
        self.out.mkdir()
        self.scratch.mkdir()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.path is not None:
                shutil.rmtree(self.path, ignore_errors=True)
        finally:
            with contextlib.suppress(OSError):
                self.lock.unlink()

    def _acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pid = _read_pid(self.lock)
                if pid is not None and _alive(pid):
                    raise UserError(f"another `prepare-data {self.dataset}` is running (pid {pid}); wait for it, "
                                    f"or delete {self.lock} if it is not") from None
                with contextlib.suppress(OSError):
                    self.lock.unlink()  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return
        raise UserError(f"cannot take the lock {self.lock}")

    @property
    def out(self) -> Path:
        assert self.path is not None
        return self.path / "out"

    @property
    def scratch(self) -> Path:
        assert self.path is not None
        return self.path / "scratch"

    def src(self, key: str) -> Path:
        assert self.path is not None
        return self.path / "src" / key.replace("/", "_")


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------- commit


def merge_move(src: Path, dst: Path, replace: tuple[str, ...] = ()) -> None:
    """Move the tree `src` into `dst`: new subtrees by one rename each, existing directories merged,
    existing files replaced. Paths in `replace` (relative) are deleted in `dst` first, so stale outputs
    of an earlier preparation do not survive a --force."""
    src, dst = Path(src), Path(dst)
    for rel in replace:
        old = dst / rel
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif old.exists() or old.is_symlink():
            old.unlink()
    if not dst.exists() or not src.is_dir() or src.is_symlink() or not dst.is_dir() or dst.is_symlink():
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        return
    for child in sorted(src.iterdir()):
        target = dst / child.name
        if child.is_dir() and not child.is_symlink() and target.is_dir() and not target.is_symlink():
            merge_move(child, target)
        else:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(child, target)


def disk_usage(path: Path) -> int:
    """Bytes of the regular files under `path` (symbolic links not followed)."""
    total = 0
    stack = [Path(path)]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(Path(e.path))
                    elif e.is_file(follow_symlinks=False):
                        total += e.stat(follow_symlinks=False).st_size
        except OSError:
            continue
    return total
