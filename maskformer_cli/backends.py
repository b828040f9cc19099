"""Exported models as networks: an ONNX Runtime, OpenVINO or TorchScript session that `predict` calls like
the torch model (`net(images, deep_supervision=False)` -> MaskFormerOutput / PerPixelOutput), so the
post-processor, overlays and writers stay one code path.

`load_exported(path, backend)` reads the sidecar written by `maskformer export` (`<file>.json`), checks
that it describes this file (sha256), and returns a `LoadedModel` whose recipe (test size, inference
thresholds) and classes come from the sidecar.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from maskformer_cli.errors import UserError
from maskformer_cli.structures import MaskFormerOutput, PerPixelOutput

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
SIDECAR_VERSION = 1  # the "maskformer_export" key of a sidecar written by `maskformer export`
EXPORTED_SUFFIXES = {".onnx": "onnxruntime", ".xml": "openvino", ".ts": "torch"}
# A backend's packages (all in the [export] extra) and which exported formats it runs.
BACKEND_PACKAGES = {"onnxruntime": ("onnxruntime",), "openvino": ("openvino",), "torch": ()}
RUNS = {"onnxruntime": (".onnx",), "openvino": (".onnx", ".xml"), "torch": (".ts",)}
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


def sidecar_path(path: Path) -> Path:
    """`model.onnx` -> `model.onnx.json` (not model.json: an .onnx and an .xml of one stem may sit together)."""
    return Path(str(path) + ".json")


def require_packages(modules: tuple[str, ...], what: str) -> None:
    """One UserError naming the extra to install when an optional package is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"{what} needs {', '.join(missing)}: pip install 'maskformer-cli[export]'")


def is_exported(path: Path) -> bool:
    return Path(path).suffix.lower() in EXPORTED_SUFFIXES and Path(path).is_file()


def resolve_backend(path: Path, backend: str) -> str:
    """--backend for these weights: auto picks by suffix (.onnx -> onnxruntime, .xml -> openvino, .ts and
    checkpoints -> torch); an explicit backend that cannot run the file is one UserError."""
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    suffix = Path(path).suffix.lower() if Path(path).is_file() else ""
    if backend == "auto":
        return EXPORTED_SUFFIXES.get(suffix, "torch")
    if suffix in EXPORTED_SUFFIXES and suffix not in RUNS[backend]:
        return_runs = [b for b, s in RUNS.items() if suffix in s]
        raise UserError(f"--backend {backend} cannot run {Path(path).name} (a {suffix} file): use --backend "
                        f"{' or '.join(return_runs)}")
    if suffix not in EXPORTED_SUFFIXES and backend != "torch":
        raise UserError(f"--backend {backend} runs exported models (.onnx / .xml from `maskformer export`); "
                        f"{Path(path).name} is a checkpoint: export it first, or use --backend torch")
    return backend


def read_sidecar(path: Path) -> dict:
    """The sidecar of an exported file, checked to belong to it."""
    from maskformer_cli.weights import file_hash

    side = sidecar_path(path)
    if not side.is_file():
        raise UserError(f"{path}: no sidecar {side.name} beside it (classes, test size, pixel statistics): export "
                        f"with `maskformer export`, which writes both, and keep them together")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{side}: not a valid sidecar JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("maskformer_export") != SIDECAR_VERSION:
        raise UserError(f"{side}: not a maskformer export sidecar (version {SIDECAR_VERSION})")
    missing = [k for k in ("sha256", "classes", "recipe", "outputs", "precision") if k not in meta]
    if missing:
        raise UserError(f"{side}: missing key(s) {', '.join(missing)}")
    if file_hash(path) != meta["sha256"]:
        raise UserError(f"{path}: its sha256 differs from the one in {side.name}: the file was changed or the "
                        f"sidecar belongs to another export; export again")
    return meta


def load_exported(path: Path, backend: str, dataset: str | None = None):
    """An exported file -> LoadedModel (weights.LoadedModel) with a backend session as its `model`."""
    from maskformer_cli.config import recipe_from_dict
    from maskformer_cli.weights import LoadedModel

    path = Path(path)
    meta = read_sidecar(path)
    try:
        recipe = recipe_from_dict(meta["recipe"])
    except UserError as e:
        raise UserError(f"{path}.json: recipe: {e}") from None
    classes = tuple(meta["classes"])
    if dataset is not None:
        from dataclasses import replace

        from maskformer_cli.data.catalog import get_dataset_info

        info = get_dataset_info(dataset)
        if info.num_classes != len(classes):
            raise UserError(f"{path} predicts {len(classes)} classes but dataset '{dataset}' has "
                            f"{info.num_classes}")
        recipe = replace(recipe, data=replace(recipe.data, dataset=dataset))
    outputs = [o["name"] for o in meta["outputs"]]
    require_packages(BACKEND_PACKAGES[backend], f"{path.name}: --backend {backend}")
    net = open_session(path, backend, outputs, meta["precision"])
    return LoadedModel(model=net, recipe=recipe, classes=classes, thing_ids=tuple(meta.get("thing_ids") or ()),
                       ignore_label=int(meta.get("ignore_label", 255)), dataset=dataset or meta.get("dataset"),
                       sha256=meta["sha256"])


def open_session(path: Path, backend: str, outputs: list[str], precision: str = "fp32"):
    """A session for an exported file whose sidecar names `outputs` (backend's packages installed)."""
    if backend == "onnxruntime":
        return OnnxRuntimeNet(path, outputs)
    if backend == "openvino":
        return OpenVinoNet(path, outputs, precision)
    return TorchScriptNet(path, outputs)


class ExportedNet:
    """Common part: numpy / torch in, the network's output structure out (only the logits are used)."""

    exported = True
    outputs: list[str]

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def eval(self):  # the torch model's interface, as far as predict uses it
        return self

    def __call__(self, images: torch.Tensor, deep_supervision: bool = False):
        x = np.ascontiguousarray(images.detach().float().cpu().numpy())
        out = dict(zip(self.outputs, self.run(x), strict=True))
        dev = images.device
        if "sem_seg_logits" in out:
            return PerPixelOutput(torch.from_numpy(np.asarray(out["sem_seg_logits"])).to(dev))
        return MaskFormerOutput(torch.from_numpy(np.asarray(out["class_logits"])).to(dev),
                                torch.from_numpy(np.asarray(out["mask_logits"])).to(dev))


class OnnxRuntimeNet(ExportedNet):
    def __init__(self, path: Path, outputs: list[str], threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for unparsable / invalid graphs
            raise UserError(f"{path}: not a readable ONNX model ({_first_line(e)})") from None
        names = [o.name for o in self.session.get_outputs()]
        if names != outputs or [i.name for i in self.session.get_inputs()] != ["images"]:
            raise UserError(f"{path}: its graph has inputs {[i.name for i in self.session.get_inputs()]} and "
                            f"outputs {names}, not those of a maskformer export ({outputs})")
        self.outputs = outputs

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.outputs, {"images": images})


class OpenVinoNet(ExportedNet):
    """OpenVINO's CPU plugin. Its inference precision is set explicitly: on CPUs with AVX512-BF16 / AMX it
    would otherwise run an fp32 model in bf16."""

    def __init__(self, path: Path, outputs: list[str], precision: str = "fp32", threads: int | None = None) -> None:
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": _OV_PRECISION[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            model = core.read_model(str(path))
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError with multi-line reports
            raise UserError(f"{path}: not a readable OpenVINO / ONNX model ({_first_line(e)})") from None
        names = [o.get_any_name() for o in self.compiled.outputs]
        if names != outputs:
            raise UserError(f"{path}: its graph has outputs {names}, not those of a maskformer export ({outputs})")
        self.outputs = outputs
        self.request = self.compiled.create_infer_request()

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        result = self.request.infer({0: images})
        return [result[o] for o in self.compiled.outputs]


class TorchScriptNet(ExportedNet):
    def __init__(self, path: Path, outputs: list[str]) -> None:
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
                self.module = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as e:  # torch.jit raises RuntimeError for any unreadable archive
            raise UserError(f"{path}: not a readable TorchScript file ({_first_line(e)})") from None
        self.outputs = outputs

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            out = self.module(torch.from_numpy(images))
        return [o.numpy() for o in out]


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else e.__class__.__name__)[:200]
