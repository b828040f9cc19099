"""`maskformer export` and `predict --backend`: exported graphs (ONNX Runtime, OpenVINO, TorchScript) give
torch's logits, label maps and panoptic segments at sizes other than the one exported with; the [export]
extra's pins agree with the installed environment; bad exported files are one clear error.

References: the torch model itself (`ExportGraph` run eagerly, and the post-processor's tiled inference
for label maps), on random weights of tiny configurations of every backbone family."""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from maskformer_cli.backends import (
    OnnxRuntimeNet,
    OpenVinoNet,
    TorchScriptNet,
    load_exported,
    resolve_backend,
    sidecar_path,
)
from maskformer_cli.commands.export import (
    ExportGraph,
    example_input,
    export_onnx,
    export_openvino,
    export_torchscript,
)
from maskformer_cli.config import ModelConfig
from maskformer_cli.errors import UserError
from maskformer_cli.models import build_model
from maskformer_cli.postprocess import PostProcessor
from maskformer_cli.structures import MaskFormerOutput, PerPixelOutput

ROOT = Path(__file__).resolve().parents[1]
HEAD = dict(hidden_dim=32, conv_dim=32, mask_dim=32, nheads=4, dim_feedforward=64, num_queries=10, dec_layers=2)
VARIANTS = {
    "r50": dict(backbone="resnet50"),
    "r101c": dict(backbone="resnet101c"),
    "swin_t": dict(backbone="swin_tiny"),
    "per_pixel": dict(backbone="resnet50", meta_architecture="per_pixel_baseline"),
    "tiny": dict(backbone="timm:resnet18"),
}
K = 5
SIZES = [(64, 64), (72, 100), (130, 70)]  # square; neither side divisible by 32; taller than wide


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_model(ModelConfig(**{**HEAD, **VARIANTS[name]}), K).eval()
    with torch.no_grad():  # frozen BN statistics that are not the identity, so a mis-exported norm shows
        for m in net.modules():
            if hasattr(m, "running_var") and m.running_var is not None and m.running_var.dim() == 1:
                m.running_var.uniform_(0.5, 1.5)
                m.running_mean.normal_(0, 0.1)
        # decisive random heads: at init every query's scores and masks are near equal, so the panoptic
        # argmax over queries would be a tie-break of float rounding everywhere
        if getattr(net, "class_embed", None) is not None:
            net.class_embed.weight.mul_(10)
            net.class_embed.bias[-1] = -30.0  # "no object" never wins: every query makes a segment candidate
            net.mask_embed.layers[-1].weight.mul_(10)
    return net


def _close(got: np.ndarray, ref: torch.Tensor, tol: float = 1e-4) -> None:
    """Within tol relative to the output's scale (random deep ResNets produce logits in the hundreds)."""
    ref = ref.float()
    scale = max(1.0, float(ref.abs().max()))
    diff = float((torch.from_numpy(np.asarray(got)).float() - ref).abs().max())
    assert diff <= tol * scale, (diff, scale)


def _pp(thing_ids=(2, 3, 4)) -> PostProcessor:
    # overlap_threshold 0.3: random masks overlap so much that the paper's 0.8 would keep no segment
    return PostProcessor(num_classes=K, ignore_label=255, thing_ids=thing_ids, mode="semantic",
                         object_mask_threshold=0.0, overlap_threshold=0.3, panoptic_postprocessing="maskformer",
                         detr_threshold=0.85, general_threshold=0.0, iterative_ratio=0.5, tta=False, tta_scales=(1.0,),
                         tta_flip=False)


def _labels_equal_except_ties(got: np.ndarray, graph: ExportGraph, x: torch.Tensor) -> None:
    """Label maps equal torch's tiled semantic inference, except where its two best class scores tie to
    float rounding (checked in float64)."""
    h, w = x.shape[-2:]
    with torch.no_grad():
        out = graph.net(torch.nn.functional.pad(x, (0, -w % 32, 0, -h % 32)), deep_supervision=False)
    padded = (h + (-h % 32), w + (-w % 32))
    for b in range(x.shape[0]):
        if isinstance(out, PerPixelOutput):
            up = torch.nn.functional.interpolate(out.sem_seg_logits[b:b + 1].double(), size=padded, mode="bilinear",
                                                 align_corners=False)[0, :, :h, :w]
            scores = up
            ref = _pp()._one_per_pixel(out.sem_seg_logits[b], (h, w), padded, (h, w), ("sem_seg",))["sem_seg"]
        else:
            ref = _pp().semantic_map(out.pred_logits[b], out.pred_masks[b], (h, w), padded, (h, w))
            probs = out.pred_logits[b].double().softmax(-1)[:, :-1]
            m = torch.nn.functional.interpolate(out.pred_masks[b:b + 1].double(), size=padded, mode="bilinear",
                                                align_corners=False)[0, :, :h, :w].sigmoid()
            scores = torch.einsum("qk,qhw->khw", probs, m)
        top2 = scores.topk(2, dim=0).values
        tie = (top2[0] - top2[1]) < 1e-5 * top2[0].abs().clamp(min=1)
        differ = torch.from_numpy(np.asarray(got[b])) != ref
        assert not bool((differ & ~tie).any()), int((differ & ~tie).sum())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (graph, .onnx path): each variant exported once (with the label map), traced at example_input()'s size."""
    pytest.importorskip("onnxscript")
    cache: dict[str, tuple[ExportGraph, Path]] = {}

    def get(name: str):
        if name not in cache:
            graph = ExportGraph(_model(name), size_divisibility=32, labels=True).eval()
            path = tmp_path_factory.mktemp(name) / "model.onnx"
            export_onnx(graph, example_input(), path)
            cache[name] = (graph, path)
        return cache[name]

    return get


def _check_backend(net, graph: ExportGraph, tol: float = 1e-4) -> None:
    torch.manual_seed(1)
    for i, (h, w) in enumerate(SIZES):
        x = torch.randn(2 if i == 1 else 1, 3, h, w)  # batch 2 once: the batch axis is dynamic too
        with torch.no_grad():
            ref = graph(x)
        got = net.run(x.numpy())
        assert len(got) == len(ref) == len(graph.output_names)
        for g, r in zip(got[:-1], ref[:-1], strict=True):
            assert g.shape == tuple(r.shape)
            _close(g, r, tol)
        assert got[-1].shape == (x.shape[0], h, w)
        _labels_equal_except_ties(got[-1], graph, x)


def _panoptic_identical(net, graph: ExportGraph, min_agreement: float = 1.0) -> None:
    """Panoptic segments from the backend's logits equal those from torch's: the same segment map and
    segments (min_agreement < 1: that fraction of pixels at least, for backends whose float rounding
    differs more, where a near-tie between two queries' weighted masks may flip)."""
    x = torch.randn(1, 3, *SIZES[1])
    h, w = x.shape[-2:]
    padded = (h + (-h % 32), w + (-w % 32))
    with torch.no_grad():
        ref = graph(x)
    got = net.run(x.numpy())
    pp = _pp()
    outs = [MaskFormerOutput(torch.from_numpy(got[0]), torch.from_numpy(got[1])), MaskFormerOutput(ref[0], ref[1])]
    (a,), (b,) = (pp.postprocess(o, [(h, w)], padded, [(90, 125)], ("panoptic",)) for o in outs)
    assert len(b["panoptic"][1]) > 1  # a test with one or no segment could hardly fail
    if min_agreement == 1.0:
        assert torch.equal(a["panoptic"][0], b["panoptic"][0])
        assert [(s["id"], s["category_id"], s["area"]) for s in a["panoptic"][1]] == \
            [(s["id"], s["category_id"], s["area"]) for s in b["panoptic"][1]]
    else:
        assert (a["panoptic"][0] == b["panoptic"][0]).float().mean() >= min_agreement
        assert [s["category_id"] for s in a["panoptic"][1]] == [s["category_id"] for s in b["panoptic"][1]]


# ------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("name", ["tiny", pytest.param("r50", marks=pytest.mark.slow),
                                  pytest.param("r101c", marks=pytest.mark.slow),
                                  pytest.param("swin_t", marks=pytest.mark.slow),
                                  pytest.param("per_pixel", marks=pytest.mark.slow)])
def test_backends_equal_torch_at_sizes_other_than_the_exported_one(exported, name):
    """Both backends in one test: one export per variant, whichever xdist worker runs it."""
    import importlib.util

    backends = [b for b in ("onnxruntime", "openvino") if importlib.util.find_spec(b)]
    if not backends:
        pytest.skip("neither onnxruntime nor openvino is installed")
    graph, path = exported(name)
    for backend in backends:
        if backend == "onnxruntime":
            net, agreement = OnnxRuntimeNet(path, graph.output_names), 1.0
        else:  # OpenVINO reads the .onnx itself; its float rounding differs more (see _panoptic_identical)
            net, agreement = OpenVinoNet(path, graph.output_names, "fp32"), 0.999
        _check_backend(net, graph)
        if not graph.per_pixel:
            _panoptic_identical(net, graph, min_agreement=agreement)


def test_openvino_ir_and_its_bf16_variant(tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("onnxscript")
    graph = ExportGraph(_model("tiny"), size_divisibility=32, labels=True).eval()
    export_openvino(graph, example_input(), tmp_path / "m.xml", "fp32")
    assert (tmp_path / "m.bin").is_file()
    _check_backend(OpenVinoNet(tmp_path / "m.xml", graph.output_names, "fp32"), graph)
    x = torch.randn(1, 3, *SIZES[1])
    with torch.no_grad():
        ref = graph(x)
    low = OpenVinoNet(tmp_path / "m.xml", graph.output_names, "bf16").run(x.numpy())
    _close(low[0], ref[0], tol=0.1)  # bf16 has 8 bits of mantissa: close, not equal


def test_torchscript_trace_runs_at_other_sizes(tmp_path):
    graph = ExportGraph(_model("tiny"), size_divisibility=32, labels=True).eval()
    export_torchscript(graph, example_input(), tmp_path / "m.ts")
    _check_backend(TorchScriptNet(tmp_path / "m.ts", graph.output_names), graph)


# ------------------------------------------------------------------------------- command, predict


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_root):
    from tiny_recipe import tiny

    from maskformer_cli.trainer import train

    root = tmp_path_factory.mktemp("ckpt")
    run = train(tiny(data_root, "solver.max_iters=1"), run_dir=root / "run", quiet=True)
    return run.run_dir / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(64, 64), (50, 77), (90, 61)]):  # resized to short side 64: 64x98, 94x64
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("fmt,backend", [("onnx", "onnxruntime"), ("onnx", "openvino"), ("openvino", "auto"),
                                         ("torchscript", "auto")])
def test_predict_through_a_backend_writes_what_the_torch_path_writes(tmp_path, checkpoint, images, fmt, backend):
    from maskformer_cli.commands.export import FORMATS, run_export
    from maskformer_cli.commands.predict import run_predict

    for module in {"onnx": ("onnxscript", "onnxruntime"), "openvino": ("onnxscript", "openvino"),
                   "torchscript": ()}[fmt] + (("openvino",) if backend == "openvino" else ()):
        pytest.importorskip(module)
    path = run_export(checkpoint, fmt=fmt, task="panoptic", out=tmp_path / f"model{FORMATS[fmt]}")
    side = json.loads(sidecar_path(path).read_text())
    assert side["format"] == fmt and side["classes"] and side["thing_ids"] and side["pixel_mean"]
    assert [o["name"] for o in side["outputs"]] == ["class_logits", "mask_logits"]
    common = dict(task="panoptic", dataset=None, device="cpu", overlays=True)
    run_predict([str(images)], weights=checkpoint, out=tmp_path / "torch", **common)
    run_predict([str(images)], weights=path, out=tmp_path / "exported", backend=backend, **common)
    for sub in ("labels", "panoptic"):
        for f in sorted((tmp_path / "torch" / sub).iterdir()):
            assert f.read_bytes() == (tmp_path / "exported" / sub / f.name).read_bytes(), f"{sub}/{f.name}"
    a, b = (json.loads((tmp_path / d / "panoptic.json").read_text()) for d in ("torch", "exported"))
    assert a["annotations"] == b["annotations"] and len(a["annotations"]) == 3
    assert sorted(p.name for p in (tmp_path / "exported" / "overlays").iterdir()) == ["im0.png", "im1.png", "im2.png"]


def test_exported_files_are_refused_with_one_clear_error(tmp_path):
    pytest.importorskip("onnxruntime")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not a protobuf at all" * 10)
    with pytest.raises(UserError, match="no sidecar bad.onnx.json"):
        load_exported(bad, "onnxruntime")
    with pytest.raises(UserError, match="not a readable ONNX model"):
        OnnxRuntimeNet(bad, ["class_logits", "mask_logits"])
    sidecar_path(bad).write_text(json.dumps({"maskformer_export": 1, "sha256": "0" * 64, "classes": [], "recipe": {},
                                             "outputs": [], "precision": "fp32"}))
    with pytest.raises(UserError, match="sha256 differs"):
        load_exported(bad, "onnxruntime")
    with pytest.raises(UserError, match="cannot run bad.onnx"):
        resolve_backend(bad, "torch")
    with pytest.raises(UserError, match="--backend 'cuda'"):
        resolve_backend(bad, "cuda")


def test_a_foreign_onnx_graph_is_named_as_such(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, tmp_path / "foreign.onnx")
    with pytest.raises(UserError, match="not those of a maskformer export"):
        OnnxRuntimeNet(tmp_path / "foreign.onnx", ["class_logits", "mask_logits"])


# ------------------------------------------------------------------------------------ the extra


def test_export_extra_pins_agree_with_the_installed_environment():
    """Every package of the [export] extra that is installed satisfies its pin, and the environment that
    holds it together with the test extra (numpy < 2 for panopticapi-lite) has no broken requirement."""
    import subprocess

    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    reqs = [Requirement(r) for r in extras["export"]]
    assert {r.name for r in reqs} == {"onnx", "onnxscript", "onnxruntime", "openvino"}
    assert "export" in extras["dev"][0]
    installed = {}
    for r in reqs:
        try:
            installed[r.name] = importlib.metadata.version(r.name)
        except importlib.metadata.PackageNotFoundError:
            continue
        assert r.specifier.contains(installed[r.name], prereleases=True), (r, installed[r.name])
    if not installed:
        pytest.skip("the [export] extra is not installed")
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not {Requirement(c).name for c in core} & {r.name for r in reqs}  # the core install does not grow
    r = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    broken = [ln for ln in r.stdout.splitlines() if any(n in ln.lower() for n in (*installed, "numpy"))]
    assert not broken, broken


def test_export_command_is_listed_with_its_options():
    from typer.testing import CliRunner

    from maskformer_cli.cli import app

    runner = CliRunner()
    assert "export" in runner.invoke(app, ["--help"]).output
    out = " ".join(runner.invoke(app, ["export", "--help"], env={"COLUMNS": "200"}).output.split())
    for option in ("--format", "--task", "--precision", "--out", "onnx | openvino | torchscript"):
        assert option in out
    assert "--backend" in " ".join(runner.invoke(app, ["predict", "--help"], env={"COLUMNS": "200"}).output.split())
