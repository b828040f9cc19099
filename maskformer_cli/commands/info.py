"""`maskformer info`: build a recipe's model and show its size (parameters per module) and cost (FLOPs)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from maskformer_cli.errors import UserError

DEFAULT_NUM_CLASSES = 150  # ADE20K-150, the paper's Table 1 setting, when the dataset is unknown


def parse_size(size: str) -> tuple[int, int]:
    """'512x512' or '512' -> (height, width)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX*,]\s*(\d+))?\s*", size)
    if m is None or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
        raise UserError(f"--size: expected HxW like 512x512, got '{size}'")
    h = int(m.group(1))
    return h, int(m.group(2)) if m.group(2) is not None else h


def recipe_num_classes(recipe: Any) -> tuple[int, str]:
    """K of the recipe's dataset and where it came from; DEFAULT_NUM_CLASSES if the dataset is unknown."""
    from maskformer_cli.data.catalog import canonical_name, get_dataset_info

    name = recipe.data.dataset
    kwargs = {"num_classes": recipe.data.synthetic_num_classes} if canonical_name(name) == "synthetic" else {}
    try:
        return get_dataset_info(name, **kwargs).num_classes, f"dataset {name}"
    except UserError:
        return DEFAULT_NUM_CLASSES, f"default; dataset '{name}' unknown"


def model_summary(model: Any) -> dict[str, int]:
    """Parameters per top-level module (those with parameters), in registration order."""
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    return {k: v for k, v in counts.items() if v > 0}


def run_info(
    recipe_path: Path | str | None,
    overrides: list[str] | tuple[str, ...] = (),
    num_classes: int | None = None,
    size: str = "512x512",
    count_flops: bool = True,
    fps: bool = False,
    fps_size: str | None = None,
    device: str = "cpu",
    precision: str = "fp32",
) -> dict[str, Any]:
    """Print a table of the recipe's model (parameters per module, total, FLOPs at `size`, and with `fps`
    images per second at `fps_size`); return the numbers.

    Returns {"num_classes", "params": {module: count}, "total_params", "flops" (multiply-adds or None), "size",
    "fps" (images/s or None)}.
    """
    import torch
    from rich.console import Console
    from rich.table import Table

    from maskformer_cli.config import load_recipe
    from maskformer_cli.models import build_model
    from maskformer_cli.models.flops import count_flops as flops_of

    overrides = list(overrides)
    if recipe_path is not None and "=" in str(recipe_path) and not Path(recipe_path).exists():
        # `maskformer info model.backbone=resnet101`: an override given where the recipe would be.
        overrides, recipe_path = [str(recipe_path), *overrides], None
    recipe = load_recipe(recipe_path, overrides)
    h, w = parse_size(size)
    if num_classes is not None:
        if num_classes < 1:
            raise UserError(f"--num-classes must be >= 1, got {num_classes}")
        k, k_from = num_classes, "--num-classes"
    else:
        k, k_from = recipe_num_classes(recipe)
    model = build_model(recipe.model, k)
    params = model_summary(model)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = None
    if count_flops:
        try:
            flops = flops_of(model, torch.zeros(1, 3, h, w))
        except (ValueError, RuntimeError) as e:  # e.g. GroupNorm over a single value at stride 32
            raise UserError(f"--size {h}x{w} is too small for this model ({e}); the backbone downsamples 32x: "
                            f"try --size 64x64 or larger") from None

    measured_fps = None
    if fps:
        from maskformer_cli.precision import check_precision

        check_precision(precision)
        fh, fw = parse_size(fps_size) if fps_size else (recipe.data.test_short_side or h,) * 2
        measured_fps = images_per_second(model, recipe, k, (fh, fw), device=device, precision=precision)

    c = recipe.model
    title = f"{c.meta_architecture} | {c.backbone} | K={k} ({k_from})"
    table = Table(title=title)
    table.add_column("module")
    table.add_column("parameters (M)", justify="right")
    table.add_column("share", justify="right")
    for name, n in params.items():
        table.add_row(name, f"{n / 1e6:.2f}", f"{100 * n / max(total, 1):.1f}%")
    table.add_section()
    table.add_row("total", f"{total / 1e6:.2f}", "100.0%", style="bold")
    if trainable != total:
        table.add_row("trainable", f"{trainable / 1e6:.2f}", f"{100 * trainable / max(total, 1):.1f}%")
    if flops is not None:
        table.caption = f"FLOPs: {flops / 1e9:.1f} G (multiply-adds, fvcore's convention) for one {h}x{w} image"
    Console().print(table)
    if measured_fps is not None:
        rate, (fh, fw), dev = measured_fps
        Console().print(f"fps: {rate:.2f} images/s ({fh}x{fw}, batch 1, {dev}, {precision}; network + semantic "
                        f"inference to the label map, random weights)", highlight=False)
    return {"num_classes": k, "params": params, "total_params": total, "flops": flops, "size": (h, w),
            "fps": None if measured_fps is None else measured_fps[0]}


def images_per_second(model: Any, recipe: Any, num_classes: int, size: tuple[int, int], *, device: str = "cpu",
                      precision: str = "fp32", seconds: float = 5.0, max_images: int = 20
                      ) -> tuple[float, tuple[int, int], str]:
    """Images per second of image -> label map (the network, then the recipe's semantic inference through
    the post-processor that `predict` uses), batch 1, after one warm-up image. Times at most `max_images`
    images or about `seconds`; returns (images/s, size, device name)."""
    import time

    import torch

    from maskformer_cli.distributed import resolve_device
    from maskformer_cli.postprocess import build_postprocessor, channels_last_default

    dev = resolve_device(device)

    class _Info:  # the post-processor needs the dataset's facts; a semantic map needs only K
        ignore_label, thing_ids = 255, ()

    info = _Info()
    info.num_classes = num_classes
    pp = build_postprocessor(recipe.inference, info, mode="semantic", tta=False, precision=precision,
                             channels_last=channels_last_default(dev))
    model = model.to(dev).eval()
    image = torch.randint(0, 256, (1, 3, *size), generator=torch.Generator().manual_seed(0)).float().to(dev)

    def one() -> None:
        pp(model, image, [size], [size])[0]["sem_seg"].cpu()

    try:
        one()
    except (ValueError, RuntimeError) as e:
        raise UserError(f"--fps at {size[0]}x{size[1]}: the model cannot run at this size ({e})") from None
    n, t0 = 0, time.perf_counter()
    while n < max_images and (n < 3 or time.perf_counter() - t0 < seconds):
        one()
        n += 1
    return n / (time.perf_counter() - t0), size, str(dev)
