"""The command line: help, version, python -m, and clear errors."""

import subprocess
import sys

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
