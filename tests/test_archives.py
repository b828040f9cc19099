"""Safe extraction: every member checked before anything is written; corrupt archives are clear errors."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest
from prepare_utils import write_tar, write_zip

from maskformer_cli.data.archives import extract, list_members
from maskformer_cli.errors import UserError


def _files_under(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


def test_zip_and_tar_extract_exactly(tmp_path):
    members = {"top/a.txt": b"alpha", "top/sub/b.bin": bytes(range(256)) * 10}
    for arch in (write_zip(tmp_path / "x.zip", members), write_tar(tmp_path / "x.tar.gz", members, "w:gz"),
                 write_tar(tmp_path / "y.tar", members)):
        dest = tmp_path / f"out_{arch.name}"
        extract(arch, dest)
        for name, data in members.items():
            assert (dest / name).read_bytes() == data
        assert _files_under(dest) == ["top", "top/a.txt", "top/sub", "top/sub/b.bin"]


@pytest.mark.parametrize("evil", ["../escape.txt", "a/../../escape.txt", "/tmp/abs_escape.txt", "..\\escape.txt",
                                  "C:/escape.txt"])
def test_zip_slip_is_refused_before_anything_is_written(tmp_path, evil):
    arch = tmp_path / "evil.zip"
    with zipfile.ZipFile(arch, "w") as zf:
        zf.writestr("good_first.txt", b"fine")  # a harmless member BEFORE the bad one
        # ZipInfo keeps the raw name (writestr with a str would not normalize '..')
        zf.writestr(zipfile.ZipInfo(evil), b"pwned")
    dest = tmp_path / "sandbox" / "out"
    with pytest.raises(UserError, match="refusing to extract.*Nothing was extracted"):
        extract(arch, dest)
    assert not dest.exists()
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "sandbox" / "escape.txt").exists()


def test_zip_symlink_member_is_refused(tmp_path):
    arch = tmp_path / "link.zip"
    with zipfile.ZipFile(arch, "w") as zf:
        zf.writestr("ok.txt", b"fine")
        info = zipfile.ZipInfo("link")
        info.external_attr = (0o120777 << 16)  # S_IFLNK
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UserError, match="symlink"):
        extract(arch, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _tar_with(path: Path, extra: tarfile.TarInfo, mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        ok = tarfile.TarInfo("ok.txt")
        ok.size = 4
        tf.addfile(ok, io.BytesIO(b"fine"))
        tf.addfile(extra, io.BytesIO(b"pwned") if extra.isfile() else None)
    return path


def _reg(name: str) -> tarfile.TarInfo:
    t = tarfile.TarInfo(name)
    t.size = 5
    return t


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    t = tarfile.TarInfo(name)
    t.type = kind
    t.linkname = target
    return t


@pytest.mark.parametrize("member", [
    _reg("../escape.txt"), _reg("/tmp/abs_escape_tar.txt"), _reg("d/../../escape.txt"),
    _link("evil_sym", "../../etc/passwd", tarfile.SYMTYPE), _link("inside_sym", "ok.txt", tarfile.SYMTYPE),
    _link("evil_hard", "/etc/passwd", tarfile.LNKTYPE),
], ids=["dotdot", "absolute", "nested-dotdot", "symlink-out", "symlink-in", "hardlink"])
@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_tar_traversal_and_links_are_refused_before_anything_is_written(tmp_path, member, mode):
    arch = _tar_with(tmp_path / "evil.tar", member, mode)
    dest = tmp_path / "sandbox" / "out"
    with pytest.raises(UserError, match="refusing to extract"):
        extract(arch, dest)
    assert not dest.exists()
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "sandbox" / "escape.txt").exists()


def test_tar_device_member_is_refused(tmp_path):
    dev = tarfile.TarInfo("dev")
    dev.type = tarfile.CHRTYPE
    arch = _tar_with(tmp_path / "dev.tar", dev)
    with pytest.raises(UserError, match="special file"):
        extract(arch, tmp_path / "out")


def test_truncated_zip_is_a_clear_error(tmp_path):
    full = write_zip(tmp_path / "full.zip", {"a.bin": bytes(range(256)) * 400}).read_bytes()
    cut = tmp_path / "cut.zip"
    cut.write_bytes(full[: len(full) // 2])
    with pytest.raises(UserError, match=r"cut.zip: corrupt or truncated archive.*download it again"):
        extract(cut, tmp_path / "out")


def test_zip_with_bad_crc_is_a_clear_error(tmp_path):
    arch = tmp_path / "crc.zip"
    with zipfile.ZipFile(arch, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("a.bin", b"A" * 5000)
    raw = bytearray(arch.read_bytes())
    pos = raw.find(b"A" * 100)
    raw[pos + 10] = ord("B")  # same size, wrong content
    arch.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"corrupt or truncated archive \(member 'a.bin'"):
        extract(arch, tmp_path / "out")


def test_truncated_tar_gz_is_a_clear_error(tmp_path):
    import os

    full = write_tar(tmp_path / "full.tar.gz", {"a.bin": os.urandom(200_000), "b.bin": b"x"}, "w:gz").read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(full[: len(full) * 2 // 3])
    with pytest.raises(UserError, match="cut.tar.gz: corrupt or truncated archive"):
        extract(cut, tmp_path / "out")


def test_not_an_archive(tmp_path):
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"this is not an archive at all" * 10)
    with pytest.raises(UserError, match="neither a zip nor a tar"):
        list_members(junk)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_disk_during_extraction_is_one_clear_error(tmp_path):
    arch = write_zip(tmp_path / "x.zip", {"big.bin": b"z" * 100_000})
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "big.bin").symlink_to("/dev/full")  # writes fail with ENOSPC, as on a full disk
    with pytest.raises(UserError, match="disk full while extracting x.zip"):
        extract(arch, dest)
