"""Threaded read-ahead keeps order, bounds memory, re-raises errors in order; the fast panoptic PNG reader
equals panopticapi's rgb2id on PNGs and falls back to PIL for other files."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image

from maskformer_cli.data.datasets import read_panoptic_ids, read_panoptic_png
from maskformer_cli.data.prefetch import prefetched
from maskformer_cli.errors import UserError


@pytest.mark.parametrize("workers", [1, 3])
def test_prefetched_keeps_order_and_bounds_read_ahead(workers):
    started: list[int] = []
    lock = threading.Lock()

    def slow(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.002 * (i % 3))  # finish out of order
        return i * i

    gen = prefetched(slow, range(50), workers)
    first = next(gen)
    assert first == 0
    time.sleep(0.05)
    # nothing runs further ahead than 2 * workers items (+1 for the one just taken)
    assert len(started) <= max(1, 2 * workers) + 1
    assert [first, *gen] == [i * i for i in range(50)]


def test_prefetched_reraises_at_the_failing_item():
    def fn(i: int) -> int:
        if i == 4:
            raise ValueError("bad item 4")
        return i

    got = []
    with pytest.raises(ValueError, match="bad item 4"):
        for v in prefetched(fn, range(10), 2):
            got.append(v)
    assert got == [0, 1, 2, 3]


def test_read_panoptic_ids_equals_rgb2id(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 2**24, (37, 53)).astype(np.uint32)
    ids[:5] = 0
    Image.fromarray(id2rgb(ids)).save(tmp_path / "a.png")
    want = rgb2id(np.asarray(Image.open(tmp_path / "a.png")))
    got = read_panoptic_ids(tmp_path / "a.png")
    assert got.dtype.is_floating_point is False and got.shape == (37, 53)
    np.testing.assert_array_equal(got.numpy(), want)
    # RGBA and palette PNGs, and non-PNG files, go through the fallback and give the same ids
    Image.fromarray(id2rgb(ids)).convert("RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_panoptic_png(tmp_path / "rgba.png"), want)
    Image.fromarray(id2rgb(ids)).save(tmp_path / "a.tif")
    np.testing.assert_array_equal(read_panoptic_png(tmp_path / "a.tif"), want)


def test_read_panoptic_ids_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="not found: .*missing.png"):
        read_panoptic_ids(tmp_path / "missing.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    with pytest.raises(UserError, match="cut.png"):
        read_panoptic_ids(tmp_path / "cut.png")
