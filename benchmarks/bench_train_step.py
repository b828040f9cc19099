"""One MaskFormer training step, ours vs transformers' MaskFormerForInstanceSegmentation, same run.

A step = forward, Hungarian matching, losses, backward, AdamW step. Both models use the same configuration
(ResNet-50 with trainable BatchNorm as HF has it, FPN 256, 6 decoder layers, 100 queries, 150 classes) and
the same weights (HF's, converted), and torch's fused AdamW. `--cuda-graphs` adds a third peer: ours with
`solver.cuda_graphs` (the network's forward and backward replayed as CUDA graphs). Measured twice: with deep supervision (the paper's loss after every
decoder layer; transformers' `use_auxiliary_loss=True`, which adds a seventh loss on the decoder's input)
and without (transformers' default). The two run alternately, step by step. Prints seconds per step, the
ratio, and the matcher's share of ours.

    python benchmarks/bench_train_step.py [--size 512] [--batch 2] [--steps 3] [--device cpu|cuda]
                                          [--precision fp32|bf16] [--profile] [--cuda-graphs]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from bench_common import alternate, sync


def make_targets(batch: int, size: int, num_classes: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        m = int(torch.randint(3, 12, (1,), generator=g))
        seg = torch.randint(0, m, (size // 16, size // 16), generator=g)
        seg = torch.nn.functional.interpolate(seg[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()
        classes = torch.randperm(num_classes, generator=g)[:m]
        masks = torch.stack([seg == i for i in range(m)])
        keep = masks.flatten(1).any(1)
        out.append((classes[keep].to(device), masks[keep].to(device)))
    return out


def measure(args, device, deep_supervision: bool) -> tuple[list[float], list[float], float]:
    """(transformers' step times, ours, the matcher's share of ours) at one deep-supervision setting."""
    from transformers import MaskFormerConfig, MaskFormerForInstanceSegmentation, ResNetConfig

    from maskformer_cli import matcher as matcher_mod
    from maskformer_cli.config import load_recipe
    from maskformer_cli.criterion import build_criterion
    from maskformer_cli.cuda_graphs import enable_cuda_graphs
    from maskformer_cli.models import build_model, normalize
    from maskformer_cli.models.convert import load_checkpoint_weights
    from maskformer_cli.models.strict_load import load_into
    from maskformer_cli.optim import build_optimizer
    from maskformer_cli.structures import Target

    K = 150
    torch.manual_seed(0)
    hf_cfg = MaskFormerConfig(backbone_config=ResNetConfig(out_features=["stage1", "stage2", "stage3", "stage4"]),
                              num_labels=K, id2label={i: str(i) for i in range(K)},
                              label2id={str(i): i for i in range(K)}, use_auxiliary_loss=deep_supervision)
    hf = MaskFormerForInstanceSegmentation(hf_cfg)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        state, _ = load_checkpoint_weights(d)
    recipe = load_recipe(None, ["model.backbone_norm=bn", "solver.clip_grad=0.0",
                                f"model.deep_supervision={str(deep_supervision).lower()}"])
    ours = build_model(recipe.model, K)
    load_into(ours, state)
    criterion = build_criterion(recipe.loss, K)
    hf.to(device).train()
    ours.to(device).train()
    graphed = None
    if args.cuda_graphs:  # a third peer: our model with solver.cuda_graphs (same weights, its own optimizer)
        graphed = build_model(recipe.model, K)
        load_into(graphed, state)
        enable_cuda_graphs(graphed.to(device).train())

    x = torch.rand(args.batch, 3, args.size, args.size, device=device) * 255
    targets = make_targets(args.batch, args.size, K, device)
    ours_targets = [Target(classes=c, masks=m) for c, m in targets]
    hf_labels = [c for c, _ in targets]
    hf_masks = [m.float() for _, m in targets]
    # Both with torch's fused AdamW (one kernel per step: what our trainer builds, and transformers' Trainer's
    # "adamw_torch_fused"), so that the optimiser's launches do not decide the ratio.
    opt_ours = build_optimizer(ours, recipe.solver)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)
    opt_graphed = build_optimizer(graphed, recipe.solver) if graphed is not None else None

    matcher_time, depth = [0.0], [0]
    cls = matcher_mod.HungarianMatcher
    real = {"__call__": cls.__call__, "match_layers": cls.match_layers}

    def timed(name):
        def run(self, *a, **kw):
            depth[0] += 1
            if depth[0] == 1:  # match_layers may call __call__: count the outer call only
                sync(device)
                t = time.perf_counter()
            try:
                return real[name](self, *a, **kw)
            finally:
                if depth[0] == 1:
                    sync(device)
                    matcher_time[0] += time.perf_counter() - t
                depth[0] -= 1
        return run

    amp = {"device_type": device.type, "dtype": torch.bfloat16, "enabled": args.precision == "bf16"}

    def step_of(model, opt):
        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(**amp):
                loss = criterion.weighted_total(criterion(model(normalize(x)), ours_targets))
            loss.backward()
            opt.step()
        return step

    step_ours = step_of(ours, opt_ours)

    def step_hf():
        opt_hf.zero_grad(set_to_none=True)
        pixel_values = (x / 255 - torch.tensor([0.485, 0.456, 0.406], device=device)[:, None, None]) / torch.tensor(
            [0.229, 0.224, 0.225], device=device)[:, None, None]
        # transformers (5.x) builds its auxiliary losses only when the decoder's hidden states are returned
        with torch.autocast(**amp):
            out = hf(pixel_values=pixel_values, mask_labels=hf_masks, class_labels=hf_labels,
                     output_hidden_states=deep_supervision)
        out.loss.backward()
        opt_hf.step()

    steps = {"transformers": step_hf, "maskformer": step_ours}
    if graphed is not None:
        steps["maskformer_graphs"] = step_of(graphed, opt_graphed)
    for step in steps.values():  # warm-ups: allocations, cudnn autotune, graph capture
        step()
    if args.profile:
        profile(steps, device)
    # Only our step calls HungarianMatcher (transformers has its own), so the tally is ours alone.
    for name in real:
        setattr(cls, name, timed(name))
    try:
        times = alternate(steps, args.steps, device)
    finally:
        for name, fn in real.items():
            setattr(cls, name, fn)
    # The tally covers both of our peers' matching; each runs it on the same targets, equally often.
    return times, matcher_time[0] / (sum(times["maskformer"]) + sum(times.get("maskformer_graphs", [])))


def profile(steps: dict, device: torch.device, rows: int = 18) -> None:
    """Where each step's time goes: torch.profiler over 3 steps, operators by self time on the device (CPU
    time on a CPU), the top `rows`."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name, step in steps.items():
        with torch_profile(activities=activities) as prof:
            for _ in range(3):
                step()
            sync(device)
        print(f"profile of 3 steps, {name}:")
        print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: forward passes of both under autocast (the training's --precision bf16)")
    ap.add_argument("--profile", action="store_true", help="also print where each step's time goes (torch.profiler)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="also time our step with solver.cuda_graphs (CUDA only: elsewhere it runs eagerly)")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{args.precision}, batch {args.batch}, {args.size}x{args.size}, ResNet-50, 100 queries, 6 decoder layers, 150 classes")
    for ds in (True, False):
        times, share = measure(args, device, ds)
        m_hf = statistics.median(times["transformers"])
        label = ("deep supervision on (the paper; transformers: use_auxiliary_loss=True)" if ds
                 else "deep supervision off (transformers' default)")
        print(label)
        for name, t in times.items():
            m = statistics.median(t)
            ratio = "" if name == "transformers" else f"  speed-up {m_hf / m:.2f}x"
            print(f"  {name:<18}: {m:.3f} s/step{ratio}  (runs: {', '.join(f'{v:.3f}' for v in t)})")
        print(f"  matcher share of our steps: {100 * share:.1f}%")


if __name__ == "__main__":
    main()
