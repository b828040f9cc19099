"""The bad-input corpus: files and command lines a user (or an attacker) may hand to maskformer, each with the
token its one-line error must name. `build(root)` writes the files under `root` and returns the cases;
test_bad_inputs.py runs each through the command a user would type."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Case:
    name: str
    argv: list[str]
    names: str  # what the one error line must contain (a file name, a key, a value)


class _Code:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _spec(root: Path, name: str, text: str) -> Path:
    return _write(root / "specs" / name / "spec.yaml", text)


def build(root: Path) -> list[Case]:
    rng = np.random.default_rng(0)
    img = _png(root / "img" / "ok.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    cases: list[Case] = []

    # ------------------------------------------------------------------------------------------ recipes
    def recipe(name: str, content: bytes | str, names: str, command: str = "print-config") -> None:
        path = _write(root / "recipes" / f"{name}.yaml", content)
        argv = ["train", str(path), "--print-config"] if command == "print-config" else ["info", str(path), "--no-flops"]
        cases.append(Case(f"recipe-{name}", argv, names))

    recipe("unknown-key", "model:\n  num_querys: 5\n", "model.num_queries")
    recipe("wrong-type", "model:\n  num_queries: ten\n", "num_queries")
    recipe("duplicate-key", "solver:\n  lr: 1.0e-4\n  lr: 2.0e-4\n", "duplicate key 'lr'")
    recipe("latin1", b"name: caf\xe9\n", "not UTF-8")
    recipe("empty", "", "empty")
    recipe("unclosed", "model:\n  num_queries: [1, 2\n", "not valid YAML")
    recipe("tab", "model:\n\tnum_queries: 3\n", "not valid YAML")
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
    recipe("billion-laughs", laughs, "aliases expand", command="info")
    recipe("deep", "[" * 300 + "]" * 300, "nested")
    recipe("list", "- model\n- data\n", "mapping")
    recipe("bad-section", "model: 5\n", "model")
    recipe("negative-crop", "data:\n  crop_size: [-1, 64]\n", "crop_size")
    recipe("scale-range", "data:\n  min_scale: 2.0\n  max_scale: 0.5\n", "min_scale")
    recipe("empty-choice", "data:\n  min_scale: 0.51\n  max_scale: 0.59\n", "scale_sampling")
    recipe("tta-scales", "inference:\n  tta_scales: []\n", "tta_scales")
    recipe("bad-enum", "inference:\n  panoptic_postprocessing: box\n", "panoptic_postprocessing")
    cases.append(Case("recipe-missing", ["train", str(root / "nope.yaml"), "--print-config"], "nope.yaml"))
    (root / "recipes" / "dir.yaml").mkdir(parents=True, exist_ok=True)
    cases.append(Case("recipe-is-a-directory", ["train", str(root / "recipes" / "dir.yaml"), "--print-config"],
                      "dir.yaml"))
    ok = _write(root / "recipes" / "ok.yaml", "name: ok\n")
    cases.append(Case("override-no-equals", ["train", str(ok), "solver.lr", "--print-config"], "solver.lr"))
    cases.append(Case("override-unknown", ["train", str(ok), "bogus.key=1", "--print-config"], "bogus"))
    cases.append(Case("override-bad-yaml", ["train", str(ok), "model.num_queries=[1", "--print-config"],
                      "model.num_queries"))

    # ------------------------------------------------------------------------------- weights / checkpoints
    def weights(name: str, path: Path, names: str) -> None:
        cases.append(Case(f"weights-{name}", ["predict", str(img), "--weights", str(path), "--out",
                                              str(root / "out" / name)], names))

    weights("missing", root / "w" / "missing.pt", "missing.pt")
    weights("truncated-pt", _write(root / "w" / "cut.pt", b"PK\x03\x04" + bytes(100)), "cut.pt")
    weights("text-as-pt", _write(root / "w" / "notes.pt", "these are not weights\n"), "notes.pt")
    code_pkl = root / "w" / "code.pkl"
    code_pkl.write_bytes(pickle.dumps({"model": {"x": _Code()}}))
    weights("code-pkl", code_pkl, "code.pkl")
    weights("code-pt", _write(root / "w" / "code.pt", pickle.dumps({"model": {"x": _Code()}})), "code.pt")
    (root / "w" / "emptydir").mkdir(parents=True, exist_ok=True)
    weights("empty-dir", root / "w" / "emptydir", "emptydir")
    hf = root / "w" / "hf"
    _write(hf / "config.json", json.dumps({"model_type": "maskformer"}))
    _write(hf / "model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1")
    weights("corrupt-safetensors", hf, "hf")
    weights("config-json", hf / "config.json", "config.json")
    weights("bad-pkl", _write(root / "w" / "bad.pkl", b"\x80\x04not a pickle"), "bad.pkl")

    # -------------------------------------------------------------------------------- images / predict
    good_weights = root / "w" / "good.pt"  # filled by the test (a tiny checkpoint), see test_bad_inputs.py
    def predict(name: str, args: list[str], names: str) -> None:
        cases.append(Case(f"predict-{name}", ["predict", *args, "--weights", str(good_weights), "--out",
                                              str(root / "out" / f"p-{name}")], names))

    predict("input-missing", [str(root / "nothing.jpg")], "nothing.jpg")
    (root / "emptyfolder").mkdir(exist_ok=True)
    predict("empty-folder", [str(root / "emptyfolder")], "emptyfolder")
    predict("corrupt-image", [str(_write(root / "corrupt" / "x.jpg", b"\xff\xd8\xff garbage"))], "x.jpg")
    predict("batch-size", [str(img), "--batch-size", "0"], "--batch-size")
    predict("task", [str(img), "--task", "depth"], "depth")
    predict("precision", [str(img), "--precision", "fp8"], "fp8")
    predict("set-model-key", [str(img), "--set", "model.num_queries=5"], "model.num_queries")
    _write(root / "out" / "taken", "a file where --out should be a folder")
    cases.append(Case("predict-out-is-a-file", ["predict", str(img), "--weights", str(good_weights), "--out",
                                                str(root / "out" / "taken")], "taken"))

    # ---------------------------------------------------------------------------- export / --backend
    def export(name: str, args: list[str], names: str) -> None:
        cases.append(Case(f"export-{name}", ["export", str(good_weights), *args], names))

    export("format", ["--format", "tflite"], "tflite")
    export("onnx-bf16", ["--format", "onnx", "--precision", "bf16"], "bf16")
    export("task", ["--task", "instance"], "instance")
    export("out-suffix", ["--format", "onnx", "--out", str(root / "out" / "model.xml")], "model.xml")
    predict("backend", [str(img), "--backend", "tensorrt"], "tensorrt")
    predict("backend-for-a-checkpoint", [str(img), "--backend", "onnxruntime"], "good.pt")
    no_sidecar = _write(root / "w" / "lonely.onnx", b"\x08\x07" + bytes(64))
    weights("onnx-without-sidecar", no_sidecar, "lonely.onnx.json")
    corrupt = _write(root / "w" / "corrupt.onnx", b"\x08\x07garbage that is no ONNX graph" * 4)
    _write(root / "w" / "corrupt.onnx.json", json.dumps({
        "maskformer_export": 1, "sha256": hashlib.sha256(corrupt.read_bytes()).hexdigest(), "precision": "fp32",
        "classes": ["a", "b"], "recipe": {}, "outputs": [{"name": "class_logits"}, {"name": "mask_logits"}]}))
    weights("corrupt-onnx", corrupt, "corrupt.onnx")
    _write(root / "w" / "swapped.onnx", b"\x08\x07another file")
    _write(root / "w" / "swapped.onnx.json", (root / "w" / "corrupt.onnx.json").read_text())
    weights("onnx-sidecar-of-another-file", root / "w" / "swapped.onnx", "swapped.onnx")
    _write(root / "w" / "sidecar.onnx", b"\x08\x07")
    _write(root / "w" / "sidecar.onnx.json", "{not json")
    weights("onnx-sidecar-not-json", root / "w" / "sidecar.onnx", "sidecar.onnx.json")

    # ---------------------------------------------------------------------------------- dataset specs
    def spec(name: str, text: str, names: str) -> None:
        path = _spec(root, name, text)
        cases.append(Case(f"spec-{name}", ["prepare-data", "custom", "--check", str(path)], names))

    spec("unknown-key", "name: x\nclases: [a]\nsemantic: {train: {images: i, labels: l}}\n", "classes")
    spec("bad-yaml", "classes: [a\n", "not valid YAML")
    spec("no-sections", "classes: [a, b]\n", "semantic")
    spec("missing-folder", "classes: [a, b]\nsemantic: {train: {images: nope, labels: nolabels}}\n", "spec.yaml")
    bad_label = _spec(root, "label-value", "classes: [a, b]\nsemantic: {train: {images: img, labels: lbl}}\n")
    _png(bad_label.parent / "img" / "a.png", np.zeros((8, 8, 3), np.uint8))
    _png(bad_label.parent / "lbl" / "a.png", np.full((8, 8), 7, np.uint8))
    cases.append(Case("spec-label-value", ["prepare-data", "custom", "--check", str(bad_label)], "problem"))
    cases.append(Case("spec-missing", ["prepare-data", "custom", "--check", str(root / "nospec.yaml")], "nospec.yaml"))

    # --------------------------------------------------------------------------------------- archives
    def archive(name: str, path: Path, names: str) -> None:
        cases.append(Case(f"archive-{name}", ["prepare-data", "ade20k", "--from-archive", str(path), "--no-download",
                                              "--root", str(root / f"datasets-{name}"), "--accept-checksum"], names))

    good_zip = io.BytesIO()
    with zipfile.ZipFile(good_zip, "w") as z:
        z.writestr("ADEChallengeData2016/images/training/a.jpg", b"x" * 1000)
    archive("truncated", _write(root / "arch" / "cut" / "ADEChallengeData2016.zip", good_zip.getvalue()[:-40]),
            "ADEChallengeData2016.zip")
    archive("zip-slip", _zip(root / "arch" / "slip" / "ADEChallengeData2016.zip",
                             {"../../evil.txt": b"x", "ADEChallengeData2016/x": b"y"}), "evil.txt")
    archive("foreign", _zip(root / "arch" / "other.zip", {"hello.txt": b"x"}), "other.zip")
    archive("not-a-zip", _write(root / "arch" / "nz" / "ADEChallengeData2016.zip", "plain text"),
            "ADEChallengeData2016.zip")

    # ------------------------------------------------------------------------------ command-line values
    cases.append(Case("evaluate-metric", ["evaluate", str(good_weights), "--metric", "bogus"], "bogus"))
    cases.append(Case("evaluate-batch-size", ["evaluate", str(good_weights), "--batch-size", "0"], "--batch-size"))
    cases.append(Case("evaluate-limit", ["evaluate", str(good_weights), "--limit", "0"], "--limit"))
    cases.append(Case("evaluate-predictions-not-dir", ["evaluate", "--predictions", str(img), "--dataset",
                                                       "synthetic"], "ok.png"))
    cases.append(Case("info-size", ["info", str(ok), "--size", "0x5"], "--size"))
    cases.append(Case("prepare-unknown-dataset", ["prepare-data", "imagenet-22k"], "imagenet-22k"))
    return cases
