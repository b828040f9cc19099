"""The command line: help, version, python -m, and clear errors."""

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from maskformer_cli.cli import app

runner = CliRunner()


def test_help_lists_the_commands():
    out = runner.invoke(app, ["--help"]).output
    for cmd in ("prepare-data", "train", "evaluate", "predict", "ablate"):
        assert cmd in out


def test_version_and_python_m():
    from maskformer_cli import __version__

    r = subprocess.run([sys.executable, "-m", "maskformer_cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and __version__ in r.stdout


def test_config_error_is_one_red_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_querys: 3\n")
    r = subprocess.run(
        [sys.executable, "-m", "maskformer_cli", "info", str(bad)], capture_output=True, text=True
    )
    assert r.returncode == 1
    assert "did you mean 'model.num_queries'" in r.stderr
    assert "Traceback" not in r.stderr


def test_ablate_help_says_what_gpus_0_means():
    out = " ".join(runner.invoke(app, ["ablate", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "Default: train in this process; with --dry-run, the file's gpus: value" in out
    assert "[default: 0]" not in out  # 0 is not a GPU count here
    assert "overrides" in out and "key=value" in out


class _BadDataset:
    def __len__(self):
        return 2

    def __getitem__(self, i):
        from maskformer_cli.errors import UserError

        raise UserError("label not found: /data/x.png")


def test_user_error_from_a_loader_worker_is_one_line():
    """torch re-raises a worker's error with the worker's traceback as its message; the CLI prints the
    original line only."""
    import torch

    from maskformer_cli.errors import UserError
    from maskformer_cli.errors import one_line as _original_message

    loader = torch.utils.data.DataLoader(_BadDataset(), num_workers=1)
    try:
        next(iter(loader))
    except UserError as e:
        assert "Original Traceback" in str(e)  # what torch does, or this test tests nothing
        assert _original_message(e) == "label not found: /data/x.png"
    else:
        raise AssertionError("the worker's error did not propagate")
    assert _original_message(UserError("plain")) == "plain"


def test_train_print_config_shows_the_resolved_recipe_and_trains_nothing(tmp_path):
    import yaml

    from maskformer_cli.cli import app

    recipe = Path(__file__).parent.parent / "recipes" / "ade20k" / "maskformer_r50.yaml"
    r = runner.invoke(app, ["train", str(recipe), "solver.lr=2e-4", "--print-config", "--run-dir", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    data = yaml.safe_load(r.output)
    assert data["solver"]["lr"] == 2e-4 and data["data"]["dataset"] == "ade20k"
    assert data["solver"]["max_iters"] == 160000  # the file's value, the paper's 160k schedule
    assert not (tmp_path / "r").exists()
    r = runner.invoke(app, ["train", str(recipe), "solver.lrr=2e-4", "--print-config"])
    assert r.exit_code != 0 and "did you mean 'solver.lr'" in str(r.exception)
