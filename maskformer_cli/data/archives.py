"""Safe extraction of zip and tar archives.

Every member of the archive is checked BEFORE anything is written: absolute names, `..` components,
drive letters, links (symbolic or hard) and special files are refused, because `zipfile` silently
rewrites such names and `tarfile` refuses them only when it reaches them, after earlier members are
already on disk. Extraction goes into a directory the caller owns (a staging directory that is
renamed into place only when the whole dataset is ready).
"""

from __future__ import annotations

import errno
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from maskformer_cli.data.download import check_free_space, disk_full_error
from maskformer_cli.errors import UserError

CHUNK = 1 << 20


@dataclass(frozen=True)
class Member:
    """One archive entry. kind: 'file', 'dir', 'symlink', 'hardlink' or 'special'."""

    name: str
    kind: str
    size: int = 0
    link: str = ""


def _corrupt(path: Path, detail: str) -> UserError:
    return UserError(f"{path}: corrupt or truncated archive ({detail}); delete it and download it again")


def archive_kind(path: Path) -> str:
    """'zip' or 'tar' (plain or compressed), judged by content, not by the file name."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such archive file")
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (OSError, EOFError, zlib.error):
        pass
    raise _corrupt(path, "neither a zip nor a tar archive")


def list_members(path: Path) -> list[Member]:
    """All entries of a zip or tar archive. Raises UserError if the archive cannot be read."""
    path = Path(path)
    kind = archive_kind(path)
    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as zf:
                return [_zip_member(i) for i in zf.infolist()]
        with tarfile.open(path) as tf:
            return [_tar_member(m) for m in tf.getmembers()]
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise _corrupt(path, str(e) or type(e).__name__) from None


def _zip_member(info: zipfile.ZipInfo) -> Member:
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return Member(info.filename, "symlink", info.file_size)
    if info.is_dir():
        return Member(info.filename, "dir")
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: no Unix type recorded
        return Member(info.filename, "special", info.file_size)
    return Member(info.filename, "file", info.file_size)


def _tar_member(m: tarfile.TarInfo) -> Member:
    if m.issym():
        return Member(m.name, "symlink", 0, m.linkname)
    if m.islnk():
        return Member(m.name, "hardlink", 0, m.linkname)
    if m.isdir():
        return Member(m.name, "dir")
    if m.isfile():
        return Member(m.name, "file", m.size)
    return Member(m.name, "special")


def unsafe_reason(member: Member) -> str | None:
    """Why extracting this member could write outside the target directory (None if it cannot)."""
    name = member.name.replace("\\", "/")
    if not name or "\x00" in name:
        return "empty or NUL in name"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in PurePosixPath(name).parts:
        return "'..' in path"
    if member.kind in ("symlink", "hardlink"):
        return f"{member.kind} to '{member.link}'" if member.link else member.kind
    if member.kind == "special":
        return "device, fifo or other special file"
    return None


def check_members(path: Path, members: list[Member]) -> None:
    """Refuse the whole archive if any member is unsafe; the message lists the offending members."""
    bad = [(m.name, r) for m in members if (r := unsafe_reason(m))]
    if bad:
        shown = "; ".join(f"'{n}' ({r})" for n, r in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise UserError(f"{path}: refusing to extract: members would escape the target directory or are "
                        f"links: {shown}{more}. Nothing was extracted.")


def _target(dest: Path, name: str) -> Path:
    parts = [p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("", ".")]
    return dest.joinpath(*parts)


def extract(path: Path, dest: Path, *, on_start: Callable[[int], None] | None = None,
            on_member: Callable[[int], None] | None = None) -> list[Member]:
    """Validate every member of `path`, then extract it into `dest` (created if missing).

    Progress: `on_start(total_bytes)` once the members are checked, `on_member(bytes)` after each member.
    Returns the members. Raises UserError on
    an unsafe member (before writing anything), a corrupt or truncated archive, or a full disk; the caller
    removes `dest` in those cases (it is a staging directory).
    """
    path, dest = Path(path), Path(dest)
    members = list_members(path)
    check_members(path, members)
    dest.mkdir(parents=True, exist_ok=True)
    total = sum(m.size for m in members)
    check_free_space(dest, total, f"extracting {path.name}")
    if on_start is not None:
        on_start(total)
    current = ""
    try:
        if archive_kind(path) == "zip":
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    current = info.filename
                    target = _target(dest, info.filename)
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                    else:
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with zf.open(info) as src, open(target, "wb") as dst:
                            shutil.copyfileobj(src, dst, CHUNK)
                    if on_member is not None:
                        on_member(info.file_size)
        else:
            # the "data" filter (Python >= 3.10.12 / 3.11.4) is a second line of defence; members were checked above
            safety = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            with tarfile.open(path) as tf:
                for m in tf:
                    current = m.name
                    tf.extract(m, dest, **safety)
                    if on_member is not None:
                        on_member(m.size)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise disk_full_error(dest, f"extracting {path.name}") from None
        if e.errno is None:  # gzip/bz2/lzma stream errors carry no errno
            raise _corrupt(path, f"member '{current}': {e}") from None
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as e:
        raise _corrupt(path, f"member '{current}': {e or type(e).__name__}") from None
    return members
