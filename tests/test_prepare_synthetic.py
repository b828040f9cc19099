"""prepare-data synthetic: generated once into the datasets root; the same settings again are a no-op."""

from __future__ import annotations

from prepare_utils import console_text, quiet_console

from maskformer_cli.data.prepare import run_prepare
from maskformer_cli.data.staging import stamp_entry


def _run(root, console=None, **params):
    console = console or quiet_console()
    params = {"num_classes": 4, "num_images": 4, "size": 32, "seed": 0, **params}
    run_prepare("synthetic", root=root, archives=[], download=False, check=None, accept_checksum=False,
                force=False, synthetic=params, console=console)
    return console_text(console)


def test_synthetic_generates_then_noop_then_regenerates_on_new_settings(tmp_path):
    out = _run(tmp_path)
    target = tmp_path / "synthetic_k4"
    entry = stamp_entry(target, "synthetic")
    assert entry["params"] == {"num_classes": 4, "num_images": 4, "size": 32, "seed": 0}
    assert entry["counts"]["train"] + entry["counts"]["val"] == 4 and "classes" in out
    assert len(list((target / "images").rglob("*.jpg"))) == 4
    assert "nothing to do" in _run(tmp_path)
    _run(tmp_path, num_images=6)
    entry = stamp_entry(target, "synthetic")
    assert entry["params"]["num_images"] == 6 and entry["counts"]["train"] + entry["counts"]["val"] == 6
    assert len(list((target / "images").rglob("*.jpg"))) == 6  # replaced, no leftovers
