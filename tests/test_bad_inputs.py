"""Every entry of the bad-input corpus (tests/bad_inputs.py: recipes, weights, images, dataset specs,
archives, command-line values), run through the command a user would type: exit code 1, one line on stderr
naming the file or key, no traceback, nothing executed from a file."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from bad_inputs import build
from tiny_recipe import tiny

with tempfile.TemporaryDirectory(prefix="bad-inputs-names-") as _names_root:
    NAMES = [c.name for c in build(Path(_names_root))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_root):
    import shutil

    from maskformer_cli.trainer import train

    root = tmp_path_factory.mktemp("bad")
    cases = {c.name: c for c in build(root)}
    run = train(tiny(data_root, "solver.max_iters=1"), run_dir=root / "tiny-run", quiet=True)
    shutil.copy(run.run_dir / "checkpoints" / "last.pt", root / "w" / "good.pt")
    return cases, data_root


def test_the_corpus_is_large_enough():
    assert len(NAMES) >= 40 and len(set(NAMES)) == len(NAMES)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_one_line_naming_it(corpus, name):
    cases, data_root = corpus
    case = cases[name]
    env = {**os.environ, "MASKFORMER_DATASETS": str(data_root), "COLUMNS": "400", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "maskformer_cli", *case.argv], capture_output=True, text=True,
                       timeout=300, env=env)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stdout + r.stderr and "pwned" not in r.stdout + r.stderr, r.stderr[-2000:]
    assert r.returncode == 1, (r.returncode, r.stdout[-1000:], r.stderr[-1000:])
    assert len(lines) == 1, r.stderr
    assert case.names in lines[0], (case.names, lines[0])
