"""prepare-data synthetic: generated once into the datasets root; the same settings again are a no-op, other
settings regenerate it with a notice."""

from __future__ import annotations

import tiny_recipe
from prepare_utils import console_text, quiet_console

from maskformer_cli.commands.prepare_data import run_prepare
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


def test_weights_without_a_recipe_use_the_synthetic_set_on_disk(tmp_path):
    """Evaluating official / HF weights on `synthetic` must not regenerate the user's set with defaults."""
    from maskformer_cli.config import DataConfig
    from maskformer_cli.data.build import with_synthetic_on_disk
    from maskformer_cli.data.synthetic import generate_synthetic

    data = DataConfig(dataset="synthetic", root=str(tmp_path))
    assert with_synthetic_on_disk(data) == data  # nothing on disk: the defaults
    generate_synthetic(tmp_path / "synthetic_k12", num_classes=12, num_images=10, size=64, seed=3)
    found = with_synthetic_on_disk(data)
    assert (found.synthetic_num_images, found.synthetic_size, found.synthetic_seed) == (10, 64, 3)


def test_regenerating_a_synthetic_set_with_other_parameters_says_so(tmp_path):
    from maskformer_cli.data.build import dataset_info, ensure_prepared
    from maskformer_cli.reporting import console

    small = tiny_recipe.tiny(tmp_path, "data.synthetic_num_images=6", "data.synthetic_size=32").data
    with console.capture() as first:
        path = ensure_prepared(dataset_info(small), small)
    assert "regenerating" not in first.get()  # a first generation is not news
    wanted = tiny_recipe.tiny(tmp_path, "data.synthetic_num_images=8", "data.synthetic_size=32").data
    with console.capture() as second:
        assert ensure_prepared(dataset_info(wanted), wanted) == path
    lines = [line for line in second.get().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "regenerating" in lines[0] and str(path) in lines[0] and "num_images 6 -> 8" in lines[0]
    differences = lines[0].split("(on disk")[1]
    assert "size" not in differences and "seed" not in differences  # only what differs
    assert stamp_entry(path, "synthetic")["params"]["num_images"] == 8  # still regenerated
    with console.capture() as third:
        ensure_prepared(dataset_info(wanted), wanted)
    assert third.get() == ""
