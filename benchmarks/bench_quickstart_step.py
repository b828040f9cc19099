"""Training-step throughput of the quickstart recipe: variants (precision, channels_last, recipe overrides)
alternated step by step in one process, on the same real synthetic batches. Prints images/s per variant and
its ratio to the first.

    python benchmarks/bench_quickstart_step.py [--steps 12] [--threads 2] [--root datasets]
        [--variant NAME:key=value,key=value ...]    (default: fp32 vs bf16 vs bf16+channels_last)

A variant's keys are recipe overrides, plus `channels_last=true` (model and input in channels_last memory) and
`fused=false` (AdamW's unfused per-parameter loop, what the optimiser was before it became fused).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from bench_common import alternate

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"
DEFAULT_VARIANTS = ["fp32:", "bf16:solver.precision=bf16", "bf16_cl:solver.precision=bf16,channels_last=true"]


def build_variant(spec: str, root: str):
    """(name, step fn, images per step) of one `NAME:key=value,...` spec."""
    from maskformer_cli.config import load_recipe
    from maskformer_cli.criterion import build_criterion
    from maskformer_cli.data.build import build_train_dataset, build_train_loader, dataset_info
    from maskformer_cli.engine import train_step
    from maskformer_cli.models import build_model
    from maskformer_cli.optim import build_optimizer, clip_grad_norm_full_model
    from maskformer_cli.precision import resolve_precision

    name, _, rest = spec.partition(":")
    keys = [kv for kv in rest.split(",") if kv]
    cl = "channels_last=true" in keys
    overrides = [kv for kv in keys if not kv.startswith(("channels_last=", "fused="))]
    recipe = load_recipe(RECIPE, [f"data.root={root}", "data.num_workers=0", *overrides])
    info = dataset_info(recipe.data)
    torch.manual_seed(0)
    model = build_model(recipe.model, info.num_classes)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    criterion = build_criterion(recipe.loss, info.num_classes)
    optimizer = build_optimizer(model, recipe.solver)
    if "fused=false" in keys:
        optimizer = torch.optim.AdamW(optimizer.param_groups, fused=False)
    loader = build_train_loader(recipe.data, info, batch_size=recipe.solver.batch_size, seed=0, rank=0,
                                world_size=1, dataset=build_train_dataset(recipe.data, info))
    it = iter(loader)
    batches = [next(it) for _ in range(4)]
    if cl:
        for b in batches:
            b.images = b.images.contiguous(memory_format=torch.channels_last)
    state = {"i": 0}
    device = torch.device("cpu")
    precision = resolve_precision(recipe.solver.precision, device)

    def step() -> None:
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        train_step(model, criterion, optimizer, [b], device=device, precision=precision,
                   clip_grad=recipe.solver.clip_grad, clip_fn=clip_grad_norm_full_model)

    return name, step, recipe.solver.batch_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--root", default="datasets")
    ap.add_argument("--variant", action="append", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    built = [build_variant(v, args.root) for v in (args.variant or DEFAULT_VARIANTS)]
    fns = {name: fn for name, fn, _ in built}
    for fn in fns.values():  # warm-up: allocations, oneDNN kernel selection
        fn()
        fn()
    times = alternate(fns, args.steps, torch.device("cpu"))
    base = None
    print(f"{args.threads} thread(s), {args.steps} alternated steps each, median")
    for name, _, bs in built:
        ips = bs / statistics.median(times[name])
        base = base or ips
        print(f"  {name:<20} {ips:6.1f} img/s   x{ips / base:.2f}   (s/step: "
              f"{', '.join(f'{t:.2f}' for t in times[name][:6])} ...)")


if __name__ == "__main__":
    main()
