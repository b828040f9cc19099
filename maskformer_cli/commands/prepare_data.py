"""`maskformer prepare-data`: find or download the archives, extract, convert, commit, stamp, summarize.

The pieces live beside this orchestrator: sources.py (which archives, checksums, downloads),
archives.py (safe extraction), converters/ (one per dataset), staging.py (work aside, move into place,
stamp), custom.py (custom dataset specs and --check). A dataset directory with a stamp entry for the
dataset is complete; running again is a no-op unless --force.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from maskformer_cli.data.catalog import (
    DatasetInfo,
    canonical_name,
    dataset_dir,
    datasets_root,
    get_dataset_info,
)
from maskformer_cli.data.download import disk_full_error, human_bytes
from maskformer_cli.data.staging import Staging, disk_usage, merge_move, stamp_entry, write_stamp_entry
from maskformer_cli.errors import UserError

T = TypeVar("T")


def run_prepare(name: str, *, root: Path | None, archives: list[Path], download: bool, check: Path | None,
                accept_checksum: bool, force: bool, synthetic: dict[str, Any], console=None) -> dict[str, Any]:
    """Prepare a catalog dataset (or the synthetic set, or check a custom spec); returns the stamp entry."""
    from rich.console import Console

    console = console or Console()
    key = canonical_name(name)
    if key == "custom":
        if check is None:
            raise UserError("prepare-data custom needs --check SPEC.yaml: custom datasets are used where they are "
                            "(pass the spec as the dataset); --check validates them")
        return _check_custom(Path(check), console)
    if check is not None:
        raise UserError("--check is only for 'prepare-data custom --check SPEC.yaml'")
    if key == "synthetic":
        if archives:
            raise UserError("the synthetic dataset is generated; it takes no --from-archive")
        return _prepare_synthetic(root, force, synthetic, console)
    return _prepare_catalog(name, root=root, archives=archives, download=download,
                            accept_checksum=accept_checksum, force=force, console=console)


# ---------------------------------------------------------------------------------------------- catalog


def _prepare_catalog(name: str, *, root: Path | None, archives: list[Path], download: bool, accept_checksum: bool,
                     force: bool, console) -> dict[str, Any]:
    from maskformer_cli.data.converters import CONVERTERS
    from maskformer_cli.data.sources import resolve_sources

    info = get_dataset_info(name)
    key = canonical_name(info.name)
    conv = CONVERTERS.get(key)
    if conv is None:
        raise UserError(f"no preparation for dataset '{name}'")
    root_dir, target = datasets_root(root), dataset_dir(info, root)
    display = key.replace("_", "-")
    entry = stamp_entry(target, key)
    if entry is not None and not force:
        if entry.get("version") == conv.version and not _missing_outputs(info, target):
            console.print(f"{display} is already prepared in {target}: nothing to do (--force prepares it again).")
            _summary(console, info, target, entry.get("counts", {}))
            return entry
        why = ("its last preparation was interrupted" if entry.get("status") == "incomplete"
               else "the stamp is outdated or files are missing")
        console.print(f"{display} in {target}: {why}; preparing again.")
    sources = resolve_sources(display, conv.archives, archives, root_dir, target, download_ok=download,
                              accept_checksum=accept_checksum, console=console)
    try:
        with Staging(root_dir, key) as st:
            from maskformer_cli.data import archives as arch
            from maskformer_cli.data.converters.base import Context

            dirs: dict[str, Path] = {}
            for k, src in sources.items():
                if src.kind == "in_place":
                    console.print(f"{k}: {src.note}")
                    dirs[k] = target
                else:
                    _extract_with_progress(arch.extract, src.path, st.src(k), console)
                    dirs[k] = st.src(k)
            ctx = Context(dirs, st.out, target, st.scratch, track=_tracker(console))
            try:
                counts = conv.convert(ctx)
            except UserError as e:  # name the archive and member, not a staging path deleted on exit
                raise UserError(_name_members(str(e), {st.src(k): s.path for k, s in sources.items()
                                                       if s.kind != "in_place"})) from None
            # not complete while the tree changes: train / evaluate refuse a tree whose entry says so
            write_stamp_entry(target, key, {"status": "incomplete", "started_at": _now(), "maskformer": _version()})
            merge_move(st.out, target, replace=conv.outputs)
            entry = {
                "version": conv.version, "counts": counts, "num_classes": info.num_classes,
                "ignore_label": info.ignore_label, "prepared_at": _now(), "maskformer": _version(),
                "sources": {k: s.note for k, s in sources.items()},
            }
            write_stamp_entry(target, key, entry)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise disk_full_error(root_dir, f"preparing {display}") from None
        raise
    _summary(console, info, target, counts)
    downloaded = [s.path for s in sources.values() if s.kind == "archive" and s.path.parent == root_dir / "downloads"]
    if downloaded:
        size = sum(p.stat().st_size for p in downloaded if p.exists())
        console.print(f"archives kept in {root_dir / 'downloads'} ({human_bytes(size)}); delete them to free space.")
    return entry


def _missing_outputs(info: DatasetInfo, target: Path) -> list[str]:
    paths = [p for pair in info.sem_seg.values() for p in pair] + [p for t in info.panoptic.values() for p in t]
    return [p for p in paths if not (target / p).exists()]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _version() -> str:
    from maskformer_cli import __version__

    return __version__


def _tracker(console):
    def track(items: Iterable[T], description: str) -> Iterator[T]:
        from rich.progress import track as rich_track

        if not console.is_terminal:  # logs and pipes get no bar redraws
            yield from items
            return
        seq = list(items)
        yield from rich_track(seq, description=description, total=len(seq), console=console, transient=True)

    return track


def _extract_with_progress(extract, archive: Path, dest: Path, console) -> None:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    if not console.is_terminal:
        extract(archive, dest)
        console.print(f"extracted {archive}")
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(f"extract {archive.name}", total=None)
        extract(archive, dest, on_start=lambda total: progress.update(task, total=total),
                on_member=lambda n: progress.advance(task, n))
    console.print(f"extracted {archive}")


def _name_members(message: str, extracted: dict[Path, Path]) -> str:
    """Rewrite paths inside the staging copy of an archive as 'ARCHIVE member MEMBER' (the staging folder is
    deleted when the preparation stops, so its paths would name nothing the user can find)."""
    for folder, archive in extracted.items():
        message = re.sub(re.escape(str(folder)) + r"(?=$|[\s:;,'\")])", lambda _m, a=archive: str(a), message)
        prefix = f"{folder}{os.sep}"
        while prefix in message:
            start = message.index(prefix)
            end = start + len(prefix)
            while end < len(message) and message[end] not in " :;,'\")":
                end += 1
            member = message[start + len(prefix):end]
            message = f"{message[:start]}{archive} member {member}{message[end:]}"
    return message


def _summary(console, info: DatasetInfo, target: Path, counts: dict[str, int]) -> None:
    from rich.table import Table

    console.print(f"[bold]{info.name.replace('_', '-')}[/] in {target}", soft_wrap=True)
    table = Table()
    table.add_column("split")
    table.add_column("images", justify="right")
    for split, n in counts.items():
        table.add_row(split, f"{n:,}")
    table.add_section()
    table.add_row("classes", f"{info.num_classes} (ignore {info.ignore_label})")
    table.add_row("disk size", human_bytes(disk_usage(target)) if target.exists() else "-")
    console.print(table)


# ----------------------------------------------------------------------------------------------- custom


def _check_custom(spec: Path, console) -> dict[str, Any]:
    """Print every problem of a custom dataset and the class pixel counts; UserError (exit 1) if any."""
    from rich.markup import escape
    from rich.table import Table

    from maskformer_cli.data.custom import check_custom

    rep = check_custom(spec)
    info = rep.info
    console.print(f"[bold]class pixels[/] of {info.name} ({spec})", soft_wrap=True)
    table = Table()
    table.add_column("class")
    splits = list(rep.pixels)
    for split in splits:
        table.add_column(f"{split} ({rep.images[split]} images)", justify="right")
    for k, cname in enumerate(info.classes):
        table.add_row(f"{k} {cname}", *(f"{int(rep.pixels[s][k]):,}" for s in splits))
    table.add_section()
    table.add_row(f"{info.ignore_label} (ignore)", *(f"{rep.ignored[s]:,}" for s in splits))
    console.print(table)
    for problem in rep.problems:
        console.print(f"[red]problem:[/] {escape(problem)}", soft_wrap=True)
    result = {"problems": rep.problems, "images": rep.images,
              "pixels": {s: [int(v) for v in c] for s, c in rep.pixels.items()}}
    if rep.problems:
        raise UserError(f"{len(rep.problems)} problem(s) found in the dataset of {spec} (listed above)")
    console.print(f"{spec}: no problems found")
    return result


# -------------------------------------------------------------------------------------------- synthetic


def _prepare_synthetic(root: Path | None, force: bool, params: dict[str, Any], console) -> dict[str, Any]:
    """Generate the embedded dataset (data/synthetic.py writes it atomically, with its stamp entry)."""
    from maskformer_cli.data.synthetic import generate_synthetic

    params = {k: params[k] for k in ("num_classes", "num_images", "size", "seed") if k in params}
    info = get_dataset_info("synthetic", num_classes=params.get("num_classes", 12))
    target = dataset_dir(info, root)
    entry = stamp_entry(target, "synthetic")
    if entry is not None and entry.get("params") == params and not force:
        console.print(f"synthetic is already generated in {target} with these settings: nothing to do "
                      f"(--force generates it again).")
        _summary(console, info, target, _splits(entry.get("counts", {})))
        return entry
    from rich.progress import Progress

    try:
        with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
            task = progress.add_task("synthetic", total=params.get("num_images"))
            generate_synthetic(target, **params, progress=lambda done, total: progress.update(task, completed=done))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise disk_full_error(target.parent, "generating the synthetic dataset") from None
        raise
    entry = stamp_entry(target, "synthetic") or {}
    _summary(console, info, target, _splits(entry.get("counts", {})))
    return entry


def _splits(counts: dict[str, Any]) -> dict[str, int]:
    return {k: int(v) for k, v in counts.items() if k in ("train", "val")}
