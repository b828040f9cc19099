"""What every converter shares: the archive table, the converter record, and the conversion context.

`ARCHIVES` is the one table of archive names, URLs and checksums; tests (and mirrors) override an entry
with `ARCHIVES[name] = dataclasses.replace(ARCHIVES[name], url=..., sha256=...)`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from maskformer_cli.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class ArchiveSpec:
    """One archive a dataset is made from.

    filename:  the official file name (also the key in ARCHIVES and the name under <root>/downloads).
    url:       public download URL, or None for login/registration-only archives.
    sha256:    official SHA-256, or None when none is published (then the archive is not verified).
    size:      bytes, when known (checked after download, used to check free disk space).
    present:   paths relative to the dataset directory whose presence (non-empty) means this archive's
               content is already in place (an existing detectron2-style tree): then it is not needed.
    aliases:   other accepted file names (fnmatch patterns), e.g. another release of the same data.
    how_to_get: instructions shown when the archive is missing and cannot be downloaded.
    """

    filename: str
    url: str | None = None
    sha256: str | None = None
    size: int | None = None
    present: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    how_to_get: str = ""


ARCHIVES: dict[str, ArchiveSpec] = {}


def register_archive(spec: ArchiveSpec) -> str:
    ARCHIVES[spec.filename] = spec
    return spec.filename


class Context:
    """Where a converter reads (`source(key)`) and writes (`out`, mirroring the dataset directory).

    sources: archive file name -> directory holding its content: an extraction in the staging area, or
             the live dataset directory when the content is already in place.
    live:    the dataset directory (<root>/<dirname>).
    scratch: a private staging directory for intermediate files.
    track:   progress wrapper: track(items, description) yields the items.
    """

    def __init__(self, sources: dict[str, Path], out: Path, live: Path, scratch: Path,
                 track: Callable[[Iterable[T], str], Iterator[T]] | None = None):
        self.sources = sources
        self.out = out
        self.live = live
        self.scratch = scratch
        self._track = track

    def source(self, key: str) -> Path:
        return self.sources[key]

    def track(self, items: Iterable[T], description: str) -> Iterator[T]:
        if self._track is None:
            yield from items
        else:
            yield from self._track(items, description)

    def is_live(self, path: Path) -> bool:
        try:
            Path(path).resolve().relative_to(self.live.resolve())
            return True
        except ValueError:
            return False

    def adopt(self, src: Path, rel: str) -> None:
        """Make `src` appear as `<dataset dir>/rel`: moved into `out` when it comes from an extraction;
        nothing to do when it is already in place in the live tree."""
        src = Path(src)
        if not src.exists() or self.is_live(src):
            return
        from maskformer_cli.data.staging import merge_move

        merge_move(src, self.out / rel)

    def adopt_all(self, src_root: Path, under: str = "", skip: tuple[str, ...] = ()) -> None:
        """Adopt every top-level entry of an extracted archive (its README, license, lists, ...)."""
        src_root = Path(src_root)
        if self.is_live(src_root):
            return
        for child in sorted(src_root.iterdir()):
            if child.name not in skip:
                self.adopt(child, f"{under}/{child.name}" if under else child.name)


@dataclass(frozen=True)
class Converter:
    """How one catalog dataset is prepared.

    archives: keys into ARCHIVES, all needed.
    convert:  ctx -> {split: number of images}; writes derived files under ctx.out and adopts raw files.
    outputs:  derived paths (relative to the dataset directory) replaced as a whole on commit.
    version:  bump when the output changes; a stamp of another version is prepared again.
    """

    name: str
    archives: tuple[str, ...]
    convert: Callable[[Context], dict[str, int]]
    outputs: tuple[str, ...] = ()
    version: int = 1


# ------------------------------------------------------------------------------------------- file helpers


def find_root(base: Path, *markers: str, depth: int = 3) -> Path:
    """The directory at or below `base` (up to `depth` levels) that contains one of `markers`.

    Archives differ in whether they wrap their content in a top folder; this finds the content either way.
    """
    base = Path(base)
    level = [base]
    for _ in range(depth + 1):
        for d in level:
            for m in markers:
                if (d / m).exists():
                    return d
        level = sorted(c for d in level for c in _subdirs(d))
    raise UserError(f"{base}: expected to find {' or '.join(markers)} in the archive content; "
                    f"is this the right archive?")


def _subdirs(d: Path) -> list[Path]:
    try:
        return [c for c in d.iterdir() if c.is_dir() and not c.name.startswith("__MACOSX")]
    except OSError:
        return []


def read_label(path: Path, *, channels: int = 1) -> np.ndarray:
    """A label image as stored (palette indices, 8/16-bit gray, or RGB when channels=3), never re-mapped.

    Raises UserError naming the file if it cannot be decoded (PIL raises on corrupt data; torchvision
    would crash the process).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if channels == 3 and im.mode != "RGB":
                im = im.convert("RGB")
            arr = np.array(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: cannot read label image ({e})") from None
    if channels == 1 and arr.ndim != 2:
        raise UserError(f"{path}: expected a single-channel label image, got mode with shape {arr.shape}")
    return arr


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{path}: cannot read image ({e})") from None


def write_png(path: Path, arr: np.ndarray) -> None:
    """uint8 [H,W] (gray), uint16 [H,W] (16-bit gray) or uint8 [H,W,3] (RGB) as PNG."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(arr)).save(path, format="PNG")


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link (no extra disk space) when possible, else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def label_lut(mapping: dict[int, int], size: int, fill: int, dtype=np.uint8) -> np.ndarray:
    """Lookup table of `size` entries: lut[raw] = mapping.get(raw, fill)."""
    lut = np.full(size, fill, dtype=dtype)
    for k, v in mapping.items():
        lut[k] = v
    return lut
