"""`maskformer export`: a deployable graph (ONNX, OpenVINO IR, TorchScript) plus a JSON sidecar.

The graph (`ExportGraph`) takes a *normalised* image batch `images` [B, 3, H, W] float32 of any height
and width (dynamic axes), pads it on the right and bottom with zeros (the pixel mean after normalisation,
as `collate` pads) to the size divisibility, and returns the network's last-layer outputs for the padded
batch:
  MaskFormer:          class_logits [B, Q, K+1], mask_logits [B, Q, Hp/4, Wp/4]
  per-pixel baselines: sem_seg_logits [B, K, Hp/4, Wp/4]
With `--task semantic` it also returns `labels` [B, H, W] int64: the exact semantic inference (paper
Sec. 3.4: argmax_c sum_i p_i(c) sigmoid(m_i), masks upsampled bilinearly to the padded input and cropped
to H x W), so a deployment needs no Python post-processing. `predict --backend` reads the logits and runs
the same post-processor as the torch path (test-time resize undone, panoptic, overlays).

The sidecar `<file>.json` holds what a deployment needs besides the graph: classes, thing ids, ignore
label, test size, pixel mean / std, size divisibility, the outputs' names and shapes, the exported file's
and the source weights' sha256, and the recipe (its `data` and `inference` sections are what `predict`
uses).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from maskformer_cli.backends import SIDECAR_VERSION, require_packages, sidecar_path
from maskformer_cli.errors import UserError
from maskformer_cli.models import PIXEL_MEAN, PIXEL_STD
from maskformer_cli.structures import PerPixelOutput

FORMATS = {"onnx": ".onnx", "openvino": ".xml", "torchscript": ".ts"}
TASKS = ("semantic", "panoptic")
# The extra whose packages each format needs (pip install 'maskformer-cli[export]').
FORMAT_PACKAGES = {"onnx": ("onnx", "onnxscript"), "openvino": ("onnx", "onnxscript", "openvino"),
                   "torchscript": ()}
# Which precisions each format can carry, and how (README "Export and deployment").
#  onnx: fp32 only. ONNX Runtime's CPU execution provider has few fp16 kernels and no bf16 convolutions,
#        so a low-precision ONNX graph was not attempted (OpenVINO is the low-precision CPU route).
#  openvino: fp32 weights; bf16 = the CPU plugin's bf16 inference precision (AVX512-BF16 / AMX), fp16 = weights
#        stored in fp16 (a smaller file) and f16 inference where the CPU has it (else f32 compute).
#  torchscript: fp32, or the whole network converted to bf16 / fp16 (outputs cast back to float32).
PRECISIONS = {"onnx": ("fp32",), "openvino": ("fp32", "bf16", "fp16"), "torchscript": ("fp32", "bf16", "fp16")}


class ExportGraph(nn.Module):
    """normalised images [B, 3, H, W] -> the outputs named in `output_names` (module docstring)."""

    def __init__(self, net: nn.Module, *, size_divisibility: int, labels: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.net, self.size_divisibility, self.labels, self.dtype = net, int(size_divisibility), labels, dtype
        self.per_pixel = getattr(net, "class_embed", None) is None

    @property
    def output_names(self) -> list[str]:
        names = ["sem_seg_logits"] if self.per_pixel else ["class_logits", "mask_logits"]
        return names + (["labels"] if self.labels else [])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, w = images.shape[-2:]
        d = self.size_divisibility
        x = F.pad(images, (0, (d - w % d) % d, 0, (d - h % d) % d)) if d > 1 else images
        out = self.net(x.to(self.dtype), deep_supervision=False)
        if isinstance(out, PerPixelOutput):
            logits = out.sem_seg_logits.float()
            outputs: tuple[torch.Tensor, ...] = (logits,)
            if self.labels:
                up = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
                outputs += (up[:, :, :h, :w].argmax(1),)
            return outputs
        class_logits, mask_logits = out.pred_logits.float(), out.pred_masks.float()
        outputs = (class_logits, mask_logits)
        if self.labels:
            outputs += (semantic_label_map(class_logits, mask_logits, x.shape[-2:], (h, w)),)
        return outputs


def semantic_label_map(class_logits: torch.Tensor, mask_logits: torch.Tensor, padded_size, image_size
                       ) -> torch.Tensor:
    """The paper's semantic inference as one traceable expression: class_logits [B, Q, K+1], mask_logits
    [B, Q, h, w] of a batch padded to padded_size -> labels [B, H, W] int64 of the top-left image_size.
    Equal to `inference_tiled.semantic_labels` (which computes it in bands) except at exact float ties."""
    h, w = image_size
    probs = F.softmax(class_logits, dim=-1)[..., :-1]  # [B, Q, K]
    masks = F.interpolate(mask_logits, size=padded_size, mode="bilinear", align_corners=False)[:, :, :h, :w]
    scores = torch.einsum("bqk,bqhw->bkhw", probs, masks.sigmoid())
    return scores.argmax(1)


# ------------------------------------------------------------------------------------------- command


def run_export(weights: Path, *, fmt: str, task: str = "panoptic", precision: str = "fp32", out: Path | None = None,
               dataset: str | None = None, overrides: list[str] | tuple[str, ...] = (),
               example_size: tuple[int, int] | None = None) -> Path:
    """Export `weights` (anything `predict` accepts) and write the sidecar; returns the exported file."""
    from dataclasses import replace

    from maskformer_cli.config import override_recipe
    from maskformer_cli.weights import file_hash, load_for_inference

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if task not in TASKS:
        raise UserError(f"--task {task!r}: choose semantic (adds the label map to the graph) or panoptic "
                        f"(logits only; panoptic post-processing runs in predict)")
    if precision not in PRECISIONS[fmt]:
        raise UserError(f"--precision {precision!r} with --format {fmt}: choose {', '.join(PRECISIONS[fmt])}"
                        + ("; for a low-precision CPU deployment use --format openvino --precision bf16"
                           if fmt == "onnx" else ""))
    require_packages(FORMAT_PACKAGES[fmt], f"--format {fmt}")
    out = Path(out) if out is not None else Path(weights).with_suffix(FORMATS[fmt]) if Path(weights).is_file() \
        else Path(str(weights).rstrip("/") + FORMATS[fmt])
    if out.suffix != FORMATS[fmt]:
        raise UserError(f"--out {out}: --format {fmt} writes a {FORMATS[fmt]} file")
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out}: is a directory")
    loaded = load_for_inference(Path(weights), torch.device("cpu"), dataset=dataset)
    loaded = replace(loaded, recipe=override_recipe(loaded.recipe, list(overrides), sections=("inference", "data")))
    rc = loaded.recipe
    if task == "panoptic" and rc.model.meta_architecture != "maskformer":
        raise UserError("--task panoptic needs a mask-classification model; this checkpoint is a per-pixel "
                        "baseline: export it with --task semantic")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    net = loaded.model.float()
    if fmt == "torchscript" and precision != "fp32":
        net = net.to(dtype)
    graph = ExportGraph(net, size_divisibility=rc.data.size_divisibility, labels=task == "semantic",
                        dtype=dtype if fmt == "torchscript" else torch.float32).eval()
    example = example_input(example_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        export_onnx(graph, example, out)
    elif fmt == "openvino":
        export_openvino(graph, example, out, precision)
    else:
        export_torchscript(graph, example, out)
    info = loaded.info()
    sidecar = {
        "maskformer_export": SIDECAR_VERSION,
        "format": fmt,
        "file": out.name,
        "sha256": file_hash(out),
        "precision": precision,
        "task": task,
        "meta_architecture": rc.model.meta_architecture,
        "input": {"name": "images", "shape": ["B", 3, "H", "W"], "dtype": "float32",
                  "normalised": "(rgb 0-255 - pixel_mean) / pixel_std; any H, W (padded inside to the size "
                                "divisibility with zeros)"},
        "outputs": _output_specs(graph.output_names),
        "classes": list(info.classes),
        "thing_ids": list(info.thing_ids),
        "ignore_label": info.ignore_label,
        "dataset": loaded.dataset,
        "pixel_mean": list(PIXEL_MEAN),
        "pixel_std": list(PIXEL_STD),
        "size_divisibility": rc.data.size_divisibility,
        "test_size": {"short_side": rc.data.test_short_side, "max_long_side": rc.data.test_max_long_side},
        "source": {"weights": str(weights), "sha256": loaded.sha256},
        "recipe": asdict(rc),
    }
    sidecar_path(out).write_text(json.dumps(sidecar, indent=1))
    return out


def example_input(size: tuple[int, int] | None = None) -> torch.Tensor:
    """The input traced (any batch and size run later): batch 2 and sizes whose stride-32 grid is 8 x 11,
    because torch.export fixes every dimension that is 0 or 1 in the example (a batch of one would be
    baked in, and so would Swin's single window of a small image's last stage) and 11 leaves a padding
    remainder for Swin's window of 7 and 12."""
    h, w = size or (256, 352)
    return torch.zeros(2, 3, h, w)


_OUTPUT_SHAPES = {"class_logits": (["B", "Q", "K+1"], "float32"),
                  "mask_logits": (["B", "Q", "ceil(H/32)*8", "ceil(W/32)*8"], "float32"),
                  "sem_seg_logits": (["B", "K", "ceil(H/32)*8", "ceil(W/32)*8"], "float32"),
                  "labels": (["B", "H", "W"], "int64")}


def _output_specs(names: list[str]) -> list[dict]:
    return [{"name": n, "shape": _OUTPUT_SHAPES[n][0], "dtype": _OUTPUT_SHAPES[n][1]} for n in names]


@contextmanager
def _quiet_exporter():
    """torch.onnx's dynamo exporter logs every skipped constant fold and progress line; keep one command's
    output to its own summary (errors still raise)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


def export_onnx(graph: ExportGraph, example: torch.Tensor, out: Path) -> None:
    """torch.onnx's dynamo exporter (torch.export), batch, height and width dynamic, opset 18."""
    import contextlib
    import io

    batch = torch.export.Dim("batch", min=1, max=1024)
    height = torch.export.Dim("height", min=1, max=16384)
    width = torch.export.Dim("width", min=1, max=16384)
    tmp = out.with_name(out.name + ".partial")
    with _quiet_exporter(), contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(graph, (example,), dynamo=True, input_names=["images"],
                                    output_names=graph.output_names, opset_version=18,
                                    dynamic_shapes={"images": {0: batch, 2: height, 3: width}},
                                    external_data=False, verbose=False)
        program.save(str(tmp), external_data=False)
    tmp.replace(out)


def export_openvino(graph: ExportGraph, example: torch.Tensor, out: Path, precision: str) -> None:
    """Through ONNX (the route tested above), then OpenVINO's converter; fp16 stores fp16 weights."""
    import openvino as ov

    with tempfile.TemporaryDirectory() as tmp:
        onnx_file = Path(tmp) / "model.onnx"
        export_onnx(graph, example, onnx_file)
        model = ov.convert_model(str(onnx_file))
        partial = Path(tmp) / out.name
        ov.save_model(model, str(partial), compress_to_fp16=precision == "fp16")
        shutil.move(str(partial.with_suffix(".bin")), out.with_suffix(".bin"))
        shutil.move(str(partial), out)


def export_torchscript(graph: ExportGraph, example: torch.Tensor, out: Path) -> None:
    """torch.jit.trace; the sizes flow through as traced values, so the trace runs at other sizes (tested)."""
    with torch.no_grad(), warnings.catch_warnings():
        # TracerWarnings about sizes taken as Python numbers, and torch's notice that TorchScript is deprecated
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(graph, (example,), check_trace=False)
        tmp = out.with_name(out.name + ".partial")
        torch.jit.save(traced, str(tmp))
    tmp.replace(out)
