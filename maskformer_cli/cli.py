"""The `maskformer` command: thin Typer commands, each parse -> one call -> render.

Heavy imports (torch, the model) happen inside the commands, so `maskformer --help` stays instant.
Known errors (`UserError`, including `ConfigError`) print one red line and exit 1; `--verbose`
shows the traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from maskformer_cli import __version__, errors
from maskformer_cli.errors import UserError

app = typer.Typer(
    name="maskformer",
    help="MaskFormer for semantic and panoptic segmentation: prepare-data, train, evaluate, predict, ablate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Shared options, defined once.
Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="Recipe overrides as key=value, e.g. solver.lr=2e-4 model.num_queries=50.", show_default=False),
]
Device = Annotated[str, typer.Option(help="'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'.")]
InferPrecision = Annotated[str, typer.Option(
    help="Network precision: fp32, or bf16 / fp16 autocast (post-processing stays fp32). bf16 roughly halves "
         "the forward pass on CPUs with AVX512-BF16 / AMX and on recent GPUs.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"maskformer {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    errors.set_verbose(verbose)


# ------------------------------------------------------------------------------------------------ info


@app.command()
def info(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe YAML (default: the built-in defaults).")] = None,
    overrides: Overrides = None,
    num_classes: Annotated[int | None, typer.Option(help="Classes K (default: the recipe's dataset).")] = None,
    size: Annotated[
        str | None, typer.Option(help="Input HxW for the FLOP count (default: the recipe's data.crop_size).",
                                 show_default=False)
    ] = None,
    flops: Annotated[bool, typer.Option(help="Count FLOPs (multiply-adds, one forward).")] = True,
    fps: Annotated[bool, typer.Option(
        help="Also measure images/s (network + semantic inference to the label map, batch 1, random weights) "
             "at the recipe's test size (data.test_short_side, square), or --fps-size.")] = False,
    fps_size: Annotated[str | None, typer.Option(help="HxW for --fps.", show_default=False)] = None,
    precision: InferPrecision = "fp32",
    device: Annotated[str, typer.Option(help="Device for --fps: 'cpu', 'cuda', 'cuda:N' or 'auto'.")] = "cpu",
) -> None:
    """Build the model of a recipe (no pretrained weights: nothing is downloaded) and print its summary:
    parameters per module, FLOPs and, with --fps, images per second (the paper's params / FLOPs / fps)."""
    from maskformer_cli.commands.info import run_info
    recipe, overrides, size = _info_inputs(recipe, overrides or [], size)
    run_info(recipe, overrides, num_classes=num_classes, size=size, count_flops=flops, fps=fps, fps_size=fps_size,
             device=device, precision=precision)


def _info_inputs(recipe: Path | None, overrides: list[str], size: str | None) -> tuple[Path | None, list[str], str]:
    """`info`'s recipe, overrides and FLOP size: pretrained weights off (counting needs the architecture
    only, and must work offline), and the size defaulting to the recipe's training crop (the paper counts
    FLOPs at the crop size, Table 1)."""
    from maskformer_cli.config import load_recipe

    if recipe is not None and "=" in str(recipe) and not recipe.exists():
        # `maskformer info model.backbone=resnet101`: an override given where the recipe would be.
        overrides, recipe = [str(recipe), *overrides], None
    overrides = [*overrides, "model.pretrained=null"]
    if size is None:
        h, w = load_recipe(recipe, overrides).data.crop_size
        size = f"{h}x{w}"
    return recipe, overrides, size


# ---------------------------------------------------------------------------------------- prepare-data


@app.command("prepare-data")
def prepare_data(
    name: Annotated[
        str,
        typer.Argument(
            help="ade20k | ade20k-full | coco-stuff-10k | cityscapes | mapillary | coco-panoptic | "
            "ade20k-panoptic | synthetic | custom"
        ),
    ],
    root: Annotated[
        Path | None,
        typer.Option(help="Dataset root (default $MASKFORMER_DATASETS, else $DETECTRON2_DATASETS, else ./datasets)."),
    ] = None,
    from_archive: Annotated[
        list[Path] | None, typer.Option("--from-archive", help="Use an archive you downloaded (repeatable).")
    ] = None,
    download: Annotated[bool, typer.Option(help="Download archives that have a public URL.")] = True,
    check: Annotated[Path | None, typer.Option(help="With 'custom': validate this dataset spec YAML.")] = None,
    accept_checksum: Annotated[
        bool, typer.Option(help="Accept a local archive whose checksum differs from the official one.")
    ] = False,
    force: Annotated[bool, typer.Option(help="Prepare again even if a complete stamp exists.")] = False,
    num_classes: Annotated[int, typer.Option(help="synthetic: number of categories.")] = 12,
    num_images: Annotated[int, typer.Option(help="synthetic: images in train + val.")] = 240,
    image_size: Annotated[int, typer.Option(help="synthetic: image side in pixels.")] = 128,
    seed: Annotated[int, typer.Option(help="synthetic: random seed.")] = 0,
) -> None:
    """Download (resumable, checksummed) and convert a dataset into the layout the tools read."""
    from maskformer_cli.commands.prepare_data import run_prepare
    run_prepare(
        name,
        root=root,
        archives=from_archive or [],
        download=download,
        check=check,
        accept_checksum=accept_checksum,
        force=force,
        synthetic={"num_classes": num_classes, "num_images": num_images, "size": image_size, "seed": seed},
    )


# ----------------------------------------------------------------------------------------------- train


@app.command(context_settings={"allow_extra_args": False})
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML, e.g. recipes/ade20k/maskformer_r50.yaml.")],
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option(help="Continue the run from its latest valid checkpoint.")] = False,
    init_from: Annotated[
        Path | None, typer.Option(help="Start from these weights (our .pt, official .pkl, or a HF directory).")
    ] = None,
    gpus: Annotated[int, typer.Option(help="Relaunch under torchrun with this many GPUs (0: run in place).")] = 0,
    run_dir: Annotated[Path | None, typer.Option(help="Run directory (default output_dir/name).")] = None,
    exist_ok: Annotated[bool, typer.Option(help="Allow writing into an existing run directory.")] = False,
    precision: Annotated[
        str | None, typer.Option(help="fp32 | bf16 | fp16 (fp16 uses a grad scaler) | auto (bf16 where fast); same as solver.precision=.")
    ] = None,
    print_config: Annotated[
        bool, typer.Option(help="Print the resolved recipe (file + overrides, validated) as YAML and exit.")
    ] = False,
    device: Device = "auto",
) -> None:
    """Train MaskFormer (or a baseline) from a recipe; works as is under torchrun."""
    from maskformer_cli.commands.train import run_train
    if precision is not None:
        # One name per idea: the flag is a shorthand for the recipe key, validated by the config loader.
        overrides = [*(overrides or []), f"solver.precision={precision}"]
    if print_config:
        from maskformer_cli.config import dump_recipe, load_recipe

        typer.echo(dump_recipe(load_recipe(recipe, overrides or [])), nl=False)
        return
    run_train(
        recipe,
        overrides or [],
        resume=resume,
        init_from=init_from,
        gpus=gpus,
        run_dir=run_dir,
        exist_ok=exist_ok,
        device=device,
    )


# -------------------------------------------------------------------------------------------- evaluate


@app.command()
def evaluate(
    checkpoint: Annotated[Path | None, typer.Argument(help="Checkpoint (.pt, official .pkl or HF dir).")] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="inference.* / data.* overrides as key=value, e.g. inference.object_mask_threshold=0.7.",
                       show_default=False),
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset name or custom spec YAML.")] = None,
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "val",
    metric: Annotated[str, typer.Option(help="miou | pq | pq-stuff | all | cityscapes (the benchmark's class/category IoU and iIoU via cityscapesscripts)")] = "all",
    inference: Annotated[
        str | None, typer.Option(help="semantic | general | iterative | panoptic (default: the recipe's).")
    ] = None,
    tta: Annotated[bool, typer.Option(help="Multi-scale + flip test-time augmentation.")] = False,
    predictions: Annotated[
        Path | None, typer.Option(help="Evaluate saved predictions (label PNGs / panoptic JSON) without a model.")
    ] = None,
    out: Annotated[Path | None, typer.Option(
        help="Where to write metrics.json and per_class.csv (default: RUN/eval/<checkpoint>_<split> for a run's "
             "checkpoint, else eval/<split>; replaced on each evaluation).", show_default=False)] = None,
    per_class: Annotated[bool, typer.Option(help="Print the per-class table.")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 1,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N images.")] = None,
    query_stats: Annotated[
        bool, typer.Option(help="Also plot unique categories predicted per query (the paper's query analysis).")
    ] = False,
    precision: InferPrecision = "fp32",
    device: Device = "auto",
) -> None:
    """Compute mIoU, PQ and PQ-stuff of a checkpoint (or of saved predictions) on a dataset split."""
    from maskformer_cli.commands.evaluate import run_evaluate
    run_evaluate(
        checkpoint,
        dataset=dataset,
        split=split,
        metric=metric,
        inference=inference,
        tta=tta,
        predictions=predictions,
        out=out,
        per_class=per_class,
        batch_size=batch_size,
        limit=limit,
        device=device,
        query_stats=query_stats,
        overrides=overrides or [],
        precision=precision,
    )


# --------------------------------------------------------------------------------------------- predict


@app.command()
def predict(
    inputs: Annotated[list[str], typer.Argument(
        help="Image files, directories (their images, not sub-folders) or globs ('photos/**/*.jpg').")],
    weights: Annotated[Path, typer.Option(
        help="Checkpoint: our .pt, official model_final_*.pkl, a HF dir, or an exported .onnx / .xml / .ts.")],
    task: Annotated[str, typer.Option(help="semantic | panoptic | instance")] = "semantic",
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("predictions"),
    dataset: Annotated[
        str | None, typer.Option(help="The dataset the weights were trained on: class names, colors, things and "
                                      "(official .pkl/HF weights) the paper's test size for it.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="inference.* or data.* override as key=value, repeatable, e.g. "
                                   "--set inference.object_mask_threshold=0.5 --set data.test_short_side=800.",
                     show_default=False),
    ] = None,
    exist_ok: Annotated[bool, typer.Option(help="Replace the predictions already in --out.")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 1,
    precision: InferPrecision = "fp32",
    overlays: Annotated[bool, typer.Option(
        help="Write overlays/ (image + prediction + legend). On by default; --no-overlays saves about a third "
             "of the time per image on a CPU.")] = True,
    rle: Annotated[bool, typer.Option(
        help="Also write COCO RLE JSON: semantic_rle.json (semantic) or instances.json (panoptic). Off by "
             "default (costly: every mask is encoded); --task instance always writes instances.json.")] = False,
    backend: Annotated[str, typer.Option(
        help="auto | torch | onnxruntime | openvino. auto: by the weights' suffix (.onnx: onnxruntime, .xml: "
             "openvino, .ts and checkpoints: torch); exported files come from `maskformer export`.")] = "auto",
    device: Device = "auto",
) -> None:
    """Segment images: overlays with a legend, label PNGs, COCO panoptic JSON + PNGs, RLE JSON."""
    from maskformer_cli.commands.predict import run_predict
    run_predict(inputs, weights=weights, task=task, out=out, dataset=dataset, device=device, overrides=set_ or [],
                exist_ok=exist_ok, batch_size=batch_size, precision=precision, overlays=overlays, rle=rle,
                backend=backend)


# ---------------------------------------------------------------------------------------------- export


@app.command()
def export(
    weights: Annotated[Path, typer.Argument(help="Checkpoint: our .pt, official model_final_*.pkl, or a HF dir.")],
    format_: Annotated[str, typer.Option("--format", help="onnx | openvino | torchscript")] = "onnx",
    task: Annotated[str, typer.Option(
        help="semantic: the graph also outputs the label map (no post-processing needed); panoptic: class and "
             "mask logits only (predict runs the panoptic post-processing).")] = "panoptic",
    precision: Annotated[str, typer.Option(
        help="fp32 (every format); openvino: bf16 / fp16 inference precision; torchscript: bf16 / fp16 weights.")
    ] = "fp32",
    out: Annotated[Path | None, typer.Option(
        help="Output file (default: the weights' path with .onnx / .xml / .ts); the sidecar is <out>.json.",
        show_default=False)] = None,
    dataset: Annotated[str | None, typer.Option(
        help="The dataset the weights were trained on (class names, things, test size for .pkl / HF weights).")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="inference.* or data.* override stored in the sidecar, as for predict.", show_default=False)
    ] = None,
) -> None:
    """Export weights to a deployable graph (dynamic height and width) plus a JSON sidecar that predict reads."""
    from maskformer_cli.commands.export import run_export

    path = run_export(weights, fmt=format_, task=task, precision=precision, out=out, dataset=dataset,
                      overrides=set_ or [])
    typer.echo(f"exported {path} (+ {path.name}.json)")


# ---------------------------------------------------------------------------------------------- ablate


@app.command()
def ablate(
    file: Annotated[Path, typer.Argument(
        help="Ablation YAML (a base recipe plus named variants), or a plain recipe to repeat over --seeds.")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Recipe overrides as key=value for every variant (they win over the variant's own "
                            "keys), e.g. solver.max_iters=50.", show_default=False),
    ] = None,
    seeds: Annotated[int, typer.Option(help="Seeds per variant (the paper reports the median of 3; Cityscapes 5).")] = 1,
    dry_run: Annotated[bool, typer.Option(help="Print the torchrun commands instead of running.")] = False,
    gpus: Annotated[
        int, typer.Option(help="GPUs per run, each run a torchrun job. Default: train in this process; with "
                               "--dry-run, the file's gpus: value (more than 8: nodes of 8).", show_default=False)
    ] = 0,
    out: Annotated[Path | None, typer.Option(help="Output directory for the runs and the table.")] = None,
) -> None:
    """Train and evaluate every variant of an ablation and print the paper-style table."""
    from maskformer_cli.commands.ablate import run_ablate
    result = run_ablate(file, overrides or [], seeds=seeds, dry_run=dry_run, gpus=gpus, out=out)
    if result.stop_signal is not None:
        # Stopped by a signal (checkpoint saved): not finished, so not exit 0 (schedulers, `&&` chains).
        raise typer.Exit(128 + result.stop_signal)


# ------------------------------------------------------------------------------------------ entrypoint


def main() -> None:
    """Console entry point: run the app, turning known errors into one red line."""
    try:
        app()
    except UserError as e:
        if errors.verbose():
            raise
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {errors.one_line(e)}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
