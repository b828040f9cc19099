"""The reference's ImageNet initialisation files that torchvision does not ship, fetched and verified.

torchvision's ResNet weights carry a sha256 prefix in their file name, which torchvision checks. The files
below come from detectron2's and Swin's release pages, which publish no checksum. `fetch_imagenet_file`
downloads such a file once into torch's hub cache and, as nothing official can vouch for it, trusts it on
first use: its sha256 is recorded beside it (`<filename>.first-download.json`) and every later use, or a
download again after the file was deleted, must match that record. A file that does have a published
sha256 (`ImageNetFile.sha256`) is checked against that instead.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maskformer_cli.data.download import cached_sha256, download
from maskformer_cli.data.staging import write_json_atomic
from maskformer_cli.errors import UserError

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".first-download.json"
_ELSEWHERE = "download it elsewhere and pass model.pretrained=/path/to/file"


@dataclass(frozen=True)
class ImageNetFile:
    """One ImageNet init file: `name` is the backbone it initialises, `filename` its name in the cache,
    `sha256` the published digest or None when none is published, `source` one line on where it comes from."""

    name: str
    url: str
    filename: str
    sha256: str | None
    source: str


_SWIN_RELEASE = "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"


def _swin(name: str, filename: str, source: str) -> ImageNetFile:
    return ImageNetFile(name, _SWIN_RELEASE + filename, filename, None, source)


IMAGENET_FILES: dict[str, ImageNetFile] = {
    "resnet101c": ImageNetFile(
        "resnet101c", "https://dl.fbaipublicfiles.com/detectron2/DeepLab/R-103.pkl", "R-103.pkl", None,
        "detectron2's DeepLab ResNet-101 (3x 3x3-conv stem), ImageNet-1K: the reference's MODEL.WEIGHTS"),
    "swin_tiny": _swin("swin_tiny", "swin_tiny_patch4_window7_224.pth",
                       "official Swin-T release, ImageNet-1K, 224, window 7"),
    "swin_small": _swin("swin_small", "swin_small_patch4_window7_224.pth",
                        "official Swin-S release, ImageNet-1K, 224, window 7"),
    "swin_base": _swin("swin_base", "swin_base_patch4_window12_384_22k.pth",
                       "official Swin-B release, ImageNet-22K, 384, window 12"),
    "swin_large": _swin("swin_large", "swin_large_patch4_window12_384_22k.pth",
                        "official Swin-L release, ImageNet-22K, 384, window 12"),
}


def fetch_imagenet_file(name: str, *, cache_dir: Path | None = None) -> Path:
    """The local, verified copy of `IMAGENET_FILES[name]`: `cache_dir / filename`, by default in torch's hub
    cache (`<torch.hub.get_dir()>/checkpoints`, where torch.hub put these files before).

    A missing file is downloaded (resumable). It must match the published sha256 when there is one, else the
    sha256 recorded at its first download when there is a record; without either, the file (downloaded, or
    found in the cache from an older run) is recorded now and a warning says so. Raises UserError when a
    file differs from the digest it must match (naming the file and both digests; a download that differs is
    removed), when the record is unreadable, or when the download fails (naming the URL, with the advice to
    pass a copy fetched elsewhere as model.pretrained).
    """
    spec = IMAGENET_FILES.get(name)
    if spec is None:
        raise UserError(f"no ImageNet file known for '{name}'; known: {', '.join(IMAGENET_FILES)}")
    folder = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / spec.filename
    record_path = folder / (spec.filename + RECORD_SUFFIX)
    with _exclusive(folder / (spec.filename + ".lock")):
        record = _read_record(record_path)
        expected = spec.sha256 or (str(record["sha256"]) if record is not None else None)
        against = ("the published sha256" if spec.sha256 else
                   f"the sha256 recorded at its first download ({record_path})")
        how = "found in the cache" if path.is_file() else "downloaded"
        if how == "downloaded":
            log.info("downloading %s (%s) -> %s", spec.url, spec.source, path)
            # a published digest is checked by download() itself, which then keeps nothing
            download(spec.url, path, sha256=spec.sha256, progress=False, elsewhere=_ELSEWHERE)
        digest = cached_sha256(path)
        if expected is not None and digest != expected.lower():
            if how == "downloaded":  # differs from the record: the server's file is not the one first fetched
                path.unlink()
                raise UserError(f"{spec.url}: the download's sha256 {digest} differs from {against}, {expected} "
                                f"(the file was replaced on the server, or altered on the way); the download was "
                                f"removed. To trust the file as it is served now, delete {record_path} and run "
                                f"again; or {_ELSEWHERE}")
            raise UserError(f"{path}: sha256 {digest} differs from {against}, {expected}: the file changed "
                            f"since (corrupt, truncated or replaced); delete it to download it again")
        if expected is None:
            _record_first_use(spec, path, record_path, how, digest)
    return path


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (created if missing). The ranks of a torchrun job build their
    models at the same time and download() appends to one shared `.part` file: one process fetches and
    records, the others wait and then find the file and its record."""
    import fcntl  # POSIX only, as torchrun jobs are

    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _read_record(record_path: Path) -> dict[str, Any] | None:
    """The first-download record, or None when there is none; UserError when it cannot be trusted to say
    anything (unreadable, or no sha256 in it)."""
    if not record_path.exists():
        return None
    try:
        record = json.loads(record_path.read_text())
        if isinstance(record, dict) and isinstance(record.get("sha256"), str):
            return record
    except (OSError, ValueError):
        pass
    raise UserError(f"{record_path}: unreadable record of a first download; delete it (and the file it "
                    f"records, to download that again) and run again")


def _record_first_use(spec: ImageNetFile, path: Path, record_path: Path, how: str, digest: str) -> None:
    """Trust on first use: write the record (of `path`, whose sha256 is `digest`) that later uses are checked
    against, and say so in one line."""
    write_json_atomic(record_path, {
        "sha256": digest,
        "size": path.stat().st_size,
        "url": spec.url,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "how": how,
    })
    log.warning("%s (%s): no official checksum is published; recorded its sha256 %s in %s, and later runs "
                "check the file against it", path, how, digest, record_path)
