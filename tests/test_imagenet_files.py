"""Verified fetching of the ImageNet init files without a published checksum (R-103.pkl, the Swin .pth
files), against a local HTTP server (127.0.0.1, ephemeral port); nothing leaves the machine."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os

import pytest
import torch
from prepare_utils import FileServer

from maskformer_cli.data import download as download_module
from maskformer_cli.errors import UserError
from maskformer_cli.models import imagenet_files, resnet, swin
from maskformer_cli.models.imagenet_files import IMAGENET_FILES, RECORD_SUFFIX, fetch_imagenet_file

DATA = os.urandom(50_000)
DIGEST = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def server(monkeypatch):
    """Serves DATA as /R-103.pkl; the resnet101c entry points there. Retries do not wait."""
    with FileServer() as s:
        s.files["/R-103.pkl"] = DATA
        monkeypatch.setitem(IMAGENET_FILES, "resnet101c",
                            dataclasses.replace(IMAGENET_FILES["resnet101c"], url=s.url + "/R-103.pkl"))
        monkeypatch.setattr(imagenet_files, "download",
                            functools.partial(download_module.download, backoff=0.0, timeout=10))
        yield s


def _record(tmp_path) -> dict:
    return json.loads((tmp_path / ("R-103.pkl" + RECORD_SUFFIX)).read_text())


def test_first_fetch_downloads_and_records_the_sha256(server, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=imagenet_files.__name__):
        path = fetch_imagenet_file("resnet101c", cache_dir=tmp_path)
    assert path == tmp_path / "R-103.pkl" and path.read_bytes() == DATA
    rec = _record(tmp_path)
    assert rec["sha256"] == DIGEST and rec["size"] == len(DATA) and rec["how"] == "downloaded"
    assert rec["url"] == server.url + "/R-103.pkl" and rec["date"].endswith("Z")
    [line] = [r.getMessage() for r in caplog.records if r.name == imagenet_files.__name__]
    assert "no official checksum is published" in line and DIGEST in line and "later runs check" in line


def test_second_fetch_uses_the_cache_without_the_network(server, tmp_path):
    first = fetch_imagenet_file("resnet101c", cache_dir=tmp_path)
    n = len(server.requests)
    assert fetch_imagenet_file("resnet101c", cache_dir=tmp_path) == first
    assert len(server.requests) == n == 1


def test_a_file_changed_after_its_record_is_refused(server, tmp_path):
    path = fetch_imagenet_file("resnet101c", cache_dir=tmp_path)
    changed = bytearray(DATA)
    changed[100] ^= 0xFF
    st = path.stat()
    path.write_bytes(bytes(changed))
    # same size: move mtime on, as a coarse file-system clock could leave it equal and the digest cache is
    # keyed on size and mtime
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    new = hashlib.sha256(bytes(changed)).hexdigest()
    with pytest.raises(UserError, match="delete it to download it again") as e:
        fetch_imagenet_file("resnet101c", cache_dir=tmp_path)
    assert DIGEST in str(e.value) and new in str(e.value) and str(path) in str(e.value)


def test_a_download_again_must_match_the_first_one(server, tmp_path):
    """A deleted file is downloaded again and checked against the record: the server's file has changed."""
    fetch_imagenet_file("resnet101c", cache_dir=tmp_path).unlink()
    server.files["/R-103.pkl"] = b"another file"
    with pytest.raises(UserError, match="download was removed.*delete .*first-download.json") as e:
        fetch_imagenet_file("resnet101c", cache_dir=tmp_path)
    assert DIGEST in str(e.value) and hashlib.sha256(b"another file").hexdigest() in str(e.value)
    assert not (tmp_path / "R-103.pkl").exists() and _record(tmp_path)["sha256"] == DIGEST


def test_a_file_already_in_the_cache_is_recorded_as_found(server, tmp_path):
    (tmp_path / "R-103.pkl").write_bytes(DATA)  # placed by the user, or by an older torch.hub download
    assert fetch_imagenet_file("resnet101c", cache_dir=tmp_path) == tmp_path / "R-103.pkl"
    assert server.requests == []
    rec = _record(tmp_path)
    assert rec["how"] == "found in the cache" and rec["sha256"] == DIGEST


def test_a_download_that_differs_from_the_published_sha256_is_refused_and_removed(server, monkeypatch, tmp_path):
    wrong = "0" * 64
    monkeypatch.setitem(IMAGENET_FILES, "resnet101c", dataclasses.replace(IMAGENET_FILES["resnet101c"], sha256=wrong))
    with pytest.raises(UserError, match=f"sha256 {DIGEST}, expected {wrong}.*model.pretrained="):
        fetch_imagenet_file("resnet101c", cache_dir=tmp_path)
    assert not (tmp_path / "R-103.pkl").exists() and not (tmp_path / "R-103.pkl.part").exists()
    assert not (tmp_path / ("R-103.pkl" + RECORD_SUFFIX)).exists()  # a published digest needs no record


def test_an_unreachable_url_is_one_clear_error(server, monkeypatch, tmp_path):
    with FileServer() as closed:  # its port is closed once the block ends
        url = closed.url + "/R-103.pkl"
    monkeypatch.setitem(IMAGENET_FILES, "resnet101c", dataclasses.replace(IMAGENET_FILES["resnet101c"], url=url))
    with pytest.raises(UserError, match="model.pretrained=/path/to/file") as e:
        fetch_imagenet_file("resnet101c", cache_dir=tmp_path)
    assert url in str(e.value)
    assert not (tmp_path / "R-103.pkl").exists()


def test_swin_imagenet_goes_through_the_verified_fetch(monkeypatch, tmp_path):
    """pretrained='imagenet' loads the file fetch_imagenet_file returns, in the official {"model": ...} form."""
    monkeypatch.setitem(swin.SWIN_VARIANTS, "swin_test", (16, (2, 2, 2, 2), (1, 2, 2, 4), 7))
    source = swin.build_swin_backbone("swin_test", drop_path_rate=0.0)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("norm")}  # as ImageNet files
    torch.save({"model": state}, tmp_path / "official.pth")
    asked = []
    monkeypatch.setattr(swin, "fetch_imagenet_file", lambda name: asked.append(name) or tmp_path / "official.pth")
    model = swin.build_swin_backbone("swin_test", drop_path_rate=0.0, pretrained="imagenet")
    assert asked == ["swin_test"]
    assert torch.equal(model.patch_embed.proj.weight, source.patch_embed.proj.weight)


def test_resnet101c_imagenet_reads_the_verified_file(monkeypatch, tmp_path):
    monkeypatch.setattr(resnet, "fetch_imagenet_file", lambda name: tmp_path / f"{name}.pkl")
    monkeypatch.setattr(resnet, "read_state_dict", lambda path: {"read": path})
    assert resnet.imagenet_state_dict("resnet101c") == {"read": tmp_path / "resnet101c.pkl"}
