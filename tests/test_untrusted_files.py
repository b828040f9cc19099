"""Files from the internet or a colleague cannot run code or exhaust the machine: every weight-loading path
refuses a pickle that would execute code, the package parses no pickle, torch file or YAML outside the
guarded readers, and recipes are read with bounded alias expansion and one-line errors."""

from __future__ import annotations

import ast
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_recipe import tiny
from typer.testing import CliRunner

import maskformer_cli
from maskformer_cli.cli import app
from maskformer_cli.config import ConfigError, load_recipe
from maskformer_cli.errors import UserError
from maskformer_cli.models.backbone import build_backbone
from maskformer_cli.models.convert import load_checkpoint_weights
from maskformer_cli.yaml_strict import load_yaml

PACKAGE = Path(maskformer_cli.__file__).parent


class _Touch:
    """Unpickling this creates `marker`: the proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_files(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """One code-running weight file per format a user may pass: detectron2 .pkl, torch .pt / .pth."""
    marker = tmp_path / "pwned"
    payload = {"model": {"w": np.zeros(2, np.float32), "x": _Touch(marker)}}
    files = {}
    for name in ("evil.pkl", "evil.pt", "evil.pth"):
        with open(tmp_path / name, "wb") as f:
            pickle.dump(payload, f)  # a raw pickle: what torch.load(weights_only=False) would execute too
        files[name] = tmp_path / name
    torch.save({"model": {"w": torch.zeros(2)}, "x": _Touch(marker)}, tmp_path / "evil_zip.pt")
    files["evil_zip.pt"] = tmp_path / "evil_zip.pt"
    return marker, files


def test_the_payload_runs_code_when_unpickled_plainly(tmp_path):
    """The fixture is a real attack: plain pickle.load of it creates the marker."""
    marker, files = _evil_files(tmp_path)
    with open(files["evil.pkl"], "rb") as f:
        pickle.load(f)
    assert marker.exists()


@pytest.mark.parametrize("name", ["evil.pkl", "evil.pt", "evil.pth", "evil_zip.pt"])
def test_full_checkpoint_loading_refuses_code(tmp_path, name):
    marker, files = _evil_files(tmp_path)
    with pytest.raises(UserError):
        load_checkpoint_weights(files[name])
    assert not marker.exists()


@pytest.mark.parametrize("backbone", ["resnet50", "swin_tiny", "timm:resnet18"])
@pytest.mark.parametrize("name", ["evil.pkl", "evil.pth", "evil_zip.pt"])
def test_backbone_weights_refuse_code(tmp_path, backbone, name):
    """model.pretrained: every R101c recipe loads R-103.pkl through this path."""
    marker, files = _evil_files(tmp_path)
    with pytest.raises(UserError):
        build_backbone(backbone, pretrained=str(files[name]))
    assert not marker.exists()


def _train_once(data_root, run_dir: Path) -> None:
    from maskformer_cli.trainer import train

    train(tiny(data_root, "solver.max_iters=1", "solver.checkpoint_every=1"), run_dir=run_dir, quiet=True)


def test_init_from_and_resume_refuse_code(tmp_path, data_root):
    from maskformer_cli.trainer import train

    marker, files = _evil_files(tmp_path)
    recipe = tiny(data_root, "solver.max_iters=2")
    for name in ("evil.pkl", "evil_zip.pt"):
        with pytest.raises(UserError):
            train(recipe, run_dir=tmp_path / f"ft_{name}", init_from=files[name], quiet=True)
    # --resume: every checkpoint of a real run replaced by the payload
    run = tmp_path / "run"
    _train_once(data_root, run)
    ckpts = list((run / "checkpoints").glob("*.pt"))
    assert ckpts
    for c in ckpts:
        c.write_bytes(files["evil_zip.pt"].read_bytes())
    with pytest.raises(UserError, match="no valid checkpoint"):
        train(tiny(data_root, "solver.max_iters=2", "solver.checkpoint_every=1"), run_dir=run, resume=True,
              quiet=True)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["evil.pkl", "evil_zip.pt"])
def test_predict_and_evaluate_weights_refuse_code(tmp_path, name):
    marker, files = _evil_files(tmp_path)
    img = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    runner = CliRunner()
    r = runner.invoke(app, ["predict", str(img), "--weights", str(files[name]), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    r = runner.invoke(app, ["evaluate", str(files[name]), "--dataset", "synthetic"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert not marker.exists()


# ---------------------------------------------------------------------------------- static scan of the package

_YAML_PARSERS = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all",
                 "safe_load", "safe_load_all", "compose", "parse"}


def _unsafe_calls(tree: ast.AST, module: str) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        where = f"{module}:{node.lineno}"
        if isinstance(f, ast.Name) and f.id in {"eval", "exec", "__import__"}:
            found.append(f"{where} {f.id}(")
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            owner, attr = f.value.id, f.attr
            if owner in {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal"} and attr in {"load", "loads"}:
                found.append(f"{where} {owner}.{attr}(")
            if owner == "pickle" and attr == "Unpickler" and module != "models/pickle_safe.py":
                found.append(f"{where} pickle.Unpickler(")
            if owner == "torch" and attr == "load":
                ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in node.keywords)
                if not ok:
                    found.append(f"{where} torch.load( without weights_only=True")
            if owner == "yaml" and attr in _YAML_PARSERS and module != "yaml_strict.py":
                found.append(f"{where} yaml.{attr}( outside yaml_strict")
            if owner == "np" and attr == "load":
                ok = not any(k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant)
                                                              and k.value.value is False) for k in node.keywords)
                if not ok:
                    found.append(f"{where} np.load(allow_pickle)")
    return found


def test_package_has_no_unguarded_deserialisation():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).as_posix()
        offenders += _unsafe_calls(ast.parse(path.read_text(), filename=str(path)), module)
    assert offenders == []


def test_the_scan_finds_what_it_looks_for():
    src = ("import pickle, torch, yaml\npickle.load(f)\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
           "yaml.load(t)\nyaml.unsafe_load(t)\neval('1')\nx.eval()\ntorch.load(p, weights_only=True)\n")
    found = _unsafe_calls(ast.parse(src), "m.py")
    assert [f.split(" ", 1)[1] for f in found] == [
        "pickle.load(", "torch.load( without weights_only=True", "torch.load( without weights_only=True",
        "yaml.load( outside yaml_strict", "yaml.unsafe_load( outside yaml_strict", "eval(",
    ]


# --------------------------------------------------------------------------------------------- hostile YAML

LAUGHS = "".join(
    ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"]
    + [f"{chr(ord('a') + i)}: &{chr(ord('a') + i)} [{', '.join(['*' + chr(ord('a') + i - 1)] * 9)}]\n"
       for i in range(1, 9)]
    + ["model:\n  num_queries: *i\n"]
)


def test_billion_laughs_is_refused_at_once(tmp_path):
    recipe = tmp_path / "laughs.yaml"
    recipe.write_text(LAUGHS)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases expand to more than"):
        load_recipe(recipe)
    assert time.perf_counter() - t0 < 1.0
    for argv in (["train", str(recipe), "--print-config"], ["info", str(recipe)]):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "maskformer_cli", *argv], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 1, r.stderr
        assert "aliases expand" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert time.perf_counter() - t0 < 30  # the interpreter and torch import, not the YAML


def test_honest_aliases_still_load():
    data = load_yaml("base: &b {lr: 1.0e-4, steps: 10}\nrun: {<<: *b, steps: 20}\nlist: [*b, *b]\n")
    assert data["run"] == {"lr": 1e-4, "steps": 20} and data["list"][0] == {"lr": 1e-4, "steps": 10}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"solver:\n  lr: 1.0e-4\n  max_iters: 10\n  lr: 2.0e-4\n", r":4: duplicate key 'lr' \(first at line 2\)"),
        (b"model:\n  num_queries: 10\nmodel:\n  dec_layers: 2\n", r":3: duplicate key 'model' \(first at line 1\)"),
        (b"model:\n  backbone: r\xe9snet\n", r":2: not UTF-8 text \(byte 0xe9 at offset 20\)"),
        (b"", "the recipe is empty"),
        (b"# only a comment\n", "the recipe is empty"),
        (b"model:\n  num_queries: [1, 2\nsolver: {}\n", r":3:7: not valid YAML: while parsing a flow sequence; expected"),
        (b"model:\n\tnum_queries: 3\n", r":2:1: not valid YAML"),
        (b"[" * 500 + b"]" * 500, "nested"),
    ],
    ids=["dup-key", "dup-section", "latin1", "empty", "comment-only", "unclosed", "tab", "deep"],
)
def test_bad_recipe_files_are_one_line(tmp_path, content, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as e:
        load_recipe(recipe)
    assert "\n" not in str(e.value) and str(recipe) in str(e.value)


def test_bad_recipe_on_the_command_line_is_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  num_queries: [1, 2\nsolver: {}\n")
    r = subprocess.run([sys.executable, "-m", "maskformer_cli", "train", str(recipe), "--print-config"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and f"{recipe}:3:7: not valid YAML" in r.stderr, r.stderr


def test_bom_and_override_values(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"\xef\xbb\xbfmodel:\n  num_queries: 7\n")
    assert load_recipe(recipe).model.num_queries == 7
    with pytest.raises(ConfigError, match="override 'model.num_queries=\\[1'"):
        load_recipe(recipe, ["model.num_queries=[1"])


# ---------------------------------------------------------------------------------------- corrupt images


def test_a_panoptic_png_with_damaged_pixel_data_is_an_error_not_a_crash(tmp_path):
    """A valid header with garbage in IDAT made torchvision's libpng decoder kill the process (SIGSEGV)."""
    import struct
    import zlib

    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    data = bytearray((tmp_path / "ok.png").read_bytes())
    i = data.index(b"IDAT")
    length = struct.unpack(">I", data[i - 4 : i])[0]
    data[i + 14 : i + length - 6] = rng.integers(0, 255, length - 20, dtype=np.uint8).tobytes()
    data[i + 4 + length : i + 8 + length] = struct.pack(">I", zlib.crc32(bytes(data[i : i + 4 + length])))
    bad = tmp_path / "bad.png"
    bad.write_bytes(bytes(data))
    code = ("from maskformer_cli.data.datasets import read_panoptic_ids\n"
            "from maskformer_cli.errors import UserError\n"
            f"try:\n    read_panoptic_ids({str(bad)!r})\nexcept UserError as e:\n    print('refused:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-500:])  # -11 before: the process died
    assert f"cannot read panoptic PNG {bad}" in r.stdout
