"""Which archive files a preparation uses, and checking them before anything is extracted.

For each archive a dataset needs, in this order:
1. an archive given with --from-archive (matched by file name, or the only one left),
2. its content already in place in the dataset directory (an existing detectron2-style tree),
3. a verified earlier download in <root>/downloads/,
4. a download from the public URL (unless --no-download).
Everything is decided (and every missing login-only archive reported) before any download starts.
A local archive whose SHA-256 differs from the official one is refused unless --accept-checksum.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from maskformer_cli.data.converters.base import ARCHIVES, ArchiveSpec
from maskformer_cli.data.download import cached_sha256, download, human_bytes
from maskformer_cli.errors import UserError

DOWNLOADS = "downloads"


@dataclass(frozen=True)
class Source:
    """kind: 'archive' (path = the archive file) or 'in_place' (path = the dataset directory)."""

    key: str
    kind: str
    path: Path
    note: str


def _nonempty(p: Path) -> bool:
    if p.is_file():
        return True
    try:
        return p.is_dir() and any(p.iterdir())
    except OSError:
        return False


def in_place(spec: ArchiveSpec, dataset_dir: Path) -> bool:
    return bool(spec.present) and all(_nonempty(dataset_dir / rel) for rel in spec.present)


def _matches(spec: ArchiveSpec, filename: str) -> bool:
    return filename == spec.filename or any(fnmatch.fnmatch(filename, pat) for pat in spec.aliases)


def _assign(dataset: str, specs: list[ArchiveSpec], given: list[Path], console) -> dict[str, Path]:
    for p in given:
        if p.is_dir():
            raise UserError(f"--from-archive {p}: is a directory; give the archive file, or put the extracted "
                            f"dataset under the datasets root in its usual layout")
        if not p.is_file():
            raise UserError(f"--from-archive {p}: no such file")
    assigned: dict[str, Path] = {}
    left: list[Path] = []
    for p in given:
        cands = [s for s in specs if _matches(s, p.name) and s.filename not in assigned]
        if cands:
            assigned[cands[0].filename] = p
        else:
            left.append(p)
    free = [s for s in specs if s.filename not in assigned]
    if len(left) == 1 and len(free) == 1:
        console.print(f"[yellow]note:[/] using {left[0]} as {free[0].filename}")
        assigned[free[0].filename] = left[0]
    elif left:
        expected = ", ".join(s.filename for s in specs)
        raise UserError(f"--from-archive {left[0]}: not an archive of {dataset} (expects: {expected})")
    return assigned


def verify_local(spec: ArchiveSpec, path: Path, *, accept_checksum: bool, console, root: Path | None = None) -> str:
    """Check a local archive against the official checksum; returns a note for the stamp. The checksum cache
    goes under <root>/downloads/.checksums/, never beside the user's archive."""
    if spec.sha256 is None:
        return "no official checksum published: not verified"
    console.print(f"checking the SHA-256 of {path} ...")
    digest = cached_sha256(path, cache_dir=None if root is None else root / DOWNLOADS / ".checksums")
    if digest == spec.sha256.lower():
        return "sha256 verified"
    if accept_checksum:
        console.print(f"[yellow]warning:[/] {path} does not match the official checksum of {spec.filename}; "
                      f"using it because of --accept-checksum")
        return f"sha256 {digest} (differs from the official one; accepted)"
    raise UserError(f"{path}: SHA-256 {digest} does not match the official {spec.filename} ({spec.sha256}): it may "
                    f"be corrupt, truncated or a re-packed copy. Download it again, or pass --accept-checksum to "
                    f"use it anyway")


def resolve_sources(dataset: str, keys: tuple[str, ...], given: list[Path], root: Path, dataset_dir: Path, *,
                    download_ok: bool, accept_checksum: bool, console, progress: bool = True) -> dict[str, Source]:
    """Decide, check and (last) download the archives `keys` of a dataset; see the module docstring."""
    specs = [ARCHIVES[k] for k in keys]
    assigned = _assign(dataset, specs, [Path(p) for p in given], console)
    plan: dict[str, tuple[str, Path | None]] = {}
    missing: list[ArchiveSpec] = []
    for spec in specs:
        cached = root / DOWNLOADS / spec.filename
        if spec.filename in assigned:
            plan[spec.filename] = ("archive", assigned[spec.filename])
        elif in_place(spec, dataset_dir):
            plan[spec.filename] = ("in_place", dataset_dir)
        elif cached.is_file():
            plan[spec.filename] = ("archive", cached)
        elif spec.url and download_ok:
            plan[spec.filename] = ("download", cached)
        else:
            missing.append(spec)
    if missing:
        lines: dict[str, list[str]] = {}  # instructions -> archives (login-only sets share them)
        for spec in missing:
            if spec.url:
                how = f"not found and --no-download given; download {spec.url} and pass --from-archive PATH"
            else:
                how = spec.how_to_get or "pass it with --from-archive PATH"
            lines.setdefault(how, []).append(spec.filename)
        raise UserError(f"{dataset} needs archives that are not here: "
                        + " | ".join(f"{', '.join(names)}: {how}" for how, names in lines.items()))
    sources: dict[str, Source] = {}
    for spec in specs:
        kind, path = plan[spec.filename]
        assert path is not None
        if kind == "in_place":
            sources[spec.filename] = Source(spec.filename, "in_place", path, f"already in place in {path}")
        elif kind == "archive":
            note = verify_local(spec, path, accept_checksum=accept_checksum, console=console, root=root)
            sources[spec.filename] = Source(spec.filename, "archive", path, note)
    for spec in specs:
        kind, path = plan[spec.filename]
        if kind == "download":
            assert spec.url is not None and path is not None
            size = f" ({human_bytes(spec.size)})" if spec.size else ""
            console.print(f"downloading {spec.url}{size} -> {path}")
            download(spec.url, path, sha256=spec.sha256, size=spec.size, progress=progress and console.is_terminal,
                     console=console)
            note = "downloaded, sha256 verified" if spec.sha256 else "downloaded (no official checksum published)"
            sources[spec.filename] = Source(spec.filename, "archive", path, note)
    return sources
