"""Resumable, checksummed downloads against a local HTTP server (127.0.0.1, ephemeral port)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from prepare_utils import FileServer

from maskformer_cli.data.download import cached_sha256, download
from maskformer_cli.errors import UserError

DATA = os.urandom(300_000)
DIGEST = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def server():
    with FileServer() as s:
        s.files["/a.zip"] = DATA
        yield s


def _get(server, path, dest, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("backoff", 0.0)
    kw.setdefault("timeout", 10)
    return download(server.url + path, dest, **kw)


def test_download_verifies_and_renames(server, tmp_path):
    dest = tmp_path / "dl" / "a.zip"
    assert _get(server, "/a.zip", dest, sha256=DIGEST, size=len(DATA)) == dest
    assert dest.read_bytes() == DATA
    assert not dest.with_name("a.zip.part").exists()
    # the sidecar spares hashing again, and is invalidated by a change
    assert cached_sha256(dest) == DIGEST
    dest.write_bytes(b"changed")
    assert cached_sha256(dest) == hashlib.sha256(b"changed").hexdigest()


def test_progress_bar_counts_the_bytes(server, tmp_path):
    from prepare_utils import console_text, quiet_console

    console = quiet_console()
    server.drop_after["/a.zip"] = 100_000
    _get(server, "/a.zip", tmp_path / "a.zip", sha256=DIGEST, progress=True, console=console)
    assert "download a.zip" in console_text(console) and "300.0 kB" in console_text(console)


def test_cut_connection_resumes_with_range(server, tmp_path):
    server.drop_after["/a.zip"] = 100_000
    dest = tmp_path / "a.zip"
    _get(server, "/a.zip", dest, sha256=DIGEST)
    assert dest.read_bytes() == DATA
    ranges = [r for p, r in server.requests if p == "/a.zip"]
    assert ranges[0] is None and ranges[1] == "bytes=100000-"


def test_interrupted_download_is_kept_and_resumed_by_a_later_call(server, tmp_path):
    server.drop_after["/a.zip"] = 70_000
    server.drop_times = 10
    dest = tmp_path / "a.zip"
    with pytest.raises(UserError, match="interrupted.*run the same command again to resume"):
        _get(server, "/a.zip", dest, sha256=DIGEST, retries=0)
    part = tmp_path / "a.zip.part"
    assert part.stat().st_size == 70_000 and not dest.exists()
    server.drop_after.clear()
    _get(server, "/a.zip", dest, sha256=DIGEST, retries=0)
    assert dest.read_bytes() == DATA
    assert server.requests[-1] == ("/a.zip", "bytes=70000-")


def test_checksum_mismatch_removes_the_download(server, tmp_path):
    dest = tmp_path / "a.zip"
    with pytest.raises(UserError, match="checksum mismatch.*a.zip"):
        _get(server, "/a.zip", dest, sha256="0" * 64)
    assert not dest.exists() and not (tmp_path / "a.zip.part").exists()


def test_corrupt_partial_file_is_detected_by_checksum(server, tmp_path):
    (tmp_path / "a.zip.part").write_bytes(b"x" * 1000)  # garbage from elsewhere: resumed, then caught
    with pytest.raises(UserError, match="checksum mismatch"):
        _get(server, "/a.zip", tmp_path / "a.zip", sha256=DIGEST)
    _get(server, "/a.zip", tmp_path / "a.zip", sha256=DIGEST)  # the next run starts anew and succeeds
    assert (tmp_path / "a.zip").read_bytes() == DATA


def test_redirect_is_followed(server, tmp_path):
    server.redirects["/latest.zip"] = "/a.zip"
    dest = tmp_path / "a.zip"
    _get(server, "/latest.zip", dest, sha256=DIGEST)
    assert dest.read_bytes() == DATA
    assert [p for p, _ in server.requests] == ["/latest.zip", "/a.zip"]


def test_redirect_keeps_the_range_on_resume(server, tmp_path):
    server.redirects["/latest.zip"] = "/a.zip"
    server.drop_after["/a.zip"] = 50_000
    _get(server, "/latest.zip", tmp_path / "a.zip", sha256=DIGEST)
    assert (tmp_path / "a.zip").read_bytes() == DATA
    assert ("/a.zip", "bytes=50000-") in server.requests


def test_server_that_ignores_range_restarts_from_zero(server, tmp_path):
    server.ignore_range = True
    (tmp_path / "a.zip.part").write_bytes(DATA[:1234])
    _get(server, "/a.zip", tmp_path / "a.zip", sha256=DIGEST)
    assert (tmp_path / "a.zip").read_bytes() == DATA


def test_http_error_names_the_url(server, tmp_path):
    with pytest.raises(UserError, match=r"/missing.zip: HTTP 404"):
        _get(server, "/missing.zip", tmp_path / "m.zip")


def test_known_size_that_does_not_fit_fails_before_downloading(server, tmp_path):
    with pytest.raises(UserError, match="not enough disk space"):
        _get(server, "/a.zip", tmp_path / "a.zip", size=10**18)
    assert server.requests == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_disk_is_one_clear_error(server, tmp_path):
    # writing to /dev/full fails with ENOSPC, as a full disk does
    (tmp_path / "a.zip.part").symlink_to("/dev/full")
    with pytest.raises(UserError, match="disk full while downloading a.zip"):
        _get(server, "/a.zip", tmp_path / "a.zip", sha256=DIGEST)
    assert not (tmp_path / "a.zip").exists()


def test_unreachable_host_is_one_clear_error(tmp_path):
    with FileServer() as s:
        url = s.url
    with pytest.raises(UserError, match="interrupted.*--from-archive"):
        download(url + "/a.zip", tmp_path / "a.zip", retries=1, backoff=0.0, progress=False, timeout=2)
