"""Benchmark: the dense mask loss (focal x20 + dice on logits upsampled to the target size), fused vs plain.

    python benchmarks/bench_mask_loss.py [--masks 30] [--size 512] [--layers 6] [--device cpu|cuda]

One training step's mask loss with deep supervision: `--layers` decoder layers, each with `--masks` matched
masks of logits at size/4 against bool targets at `--size`, forward and backward. The peer is the plain
autograd formulation (`F.interpolate` then `losses.sigmoid_focal_loss` + `losses.dice_loss`, as the
criterion computed it before and as detectron2 and transformers compute it); ours is
`losses_fused.focal_dice_loss`. Both give the same loss and gradient (checked before timing). Prints
seconds per step and peak memory for each, and the ratios. Peak memory: CUDA's allocator peak on a GPU;
on a CPU (Linux) the resident-set growth of a fresh child process per variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_common import alternate

from maskformer_cli.losses import dice_loss, sigmoid_focal_loss
from maskformer_cli.losses_fused import focal_dice_loss


def plain(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    up = F.interpolate(logits[:, None], size=targets.shape[-2:], mode="bilinear", align_corners=False)
    x, t = up.flatten(1), targets.flatten(1).float()
    return 20 * sigmoid_focal_loss(x, t, len(x)) + dice_loss(x, t, len(x))


def fused(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    focal, dice = focal_dice_loss(logits, targets)
    return 20 * focal.sum() / len(focal) + dice.sum() / len(dice)


VARIANTS = {"plain": plain, "fused": fused}


def make_inputs(args, device):
    g = torch.Generator().manual_seed(0)
    low = args.size // 4
    logits = [(torch.randn(args.masks, low, low, generator=g) * 3).to(device) for _ in range(args.layers)]
    # blocky targets, as segments are: a coarse random map upsampled
    coarse = torch.randint(0, args.masks, (args.size // 32, args.size // 32), generator=g)
    seg = F.interpolate(coarse[None, None].float(), size=(args.size, args.size), mode="nearest")[0, 0]
    targets = torch.stack([seg == i for i in range(args.masks)]).to(device)
    return logits, targets


def step(fn, logits, targets) -> None:
    leaves = [x.detach().requires_grad_() for x in logits]
    sum(fn(x, targets) for x in leaves).backward()


def timings(args, device) -> dict[str, float]:
    """Median seconds per step of each variant, the variants alternating step by step."""
    logits, targets = make_inputs(args, device)
    steps = {name: (lambda fn=fn: step(fn, logits, targets)) for name, fn in VARIANTS.items()}
    for warm_up in steps.values():
        warm_up()
    return {name: statistics.median(ts) for name, ts in alternate(steps, args.steps, device).items()}


def cuda_peak(args, device, name: str) -> float:
    """Bytes the CUDA allocator's peak rises by during one step of `name`."""
    logits, targets = make_inputs(args, device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step(VARIANTS[name], logits, targets)
    return float(torch.cuda.max_memory_allocated(device) - base)


def _vm_hwm() -> int:
    """This process's resident-set high-water mark in bytes (Linux; per address space, so fresh after exec,
    unlike ru_maxrss, which a child inherits from its parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def cpu_peak(args, name: str) -> float:
    """Resident-set growth of a fresh process running one step of `name` (bytes; nan off Linux)."""
    code = (
        "import sys, torch; sys.argv = sys.argv[:1] + {argv!r}; import bench_mask_loss as b; "
        "a = b.parse(); lg, tg = b.make_inputs(a, torch.device('cpu')); h0 = b._vm_hwm(); "
        "b.step(b.VARIANTS[{name!r}], lg, tg); print(b._vm_hwm() - h0)"
    ).format(argv=[f"--masks={args.masks}", f"--size={args.size}", f"--layers={args.layers}"], name=name)
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        )
    except subprocess.CalledProcessError as e:
        print(e.stderr, file=sys.stderr)
        return float("nan")
    return float(out.stdout.strip().splitlines()[-1])


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--masks", type=int, default=30, help="matched masks per layer (whole batch)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap.parse_args(argv)


def main() -> None:
    args = parse()
    device = torch.device(args.device)
    logits, targets = make_inputs(args, device)
    # same loss and gradient before anything is timed
    results = {}
    for name, fn in VARIANTS.items():
        x = logits[0].detach().requires_grad_()
        loss = fn(x, targets)
        loss.backward()
        results[name] = (loss.detach(), x.grad)
    torch.testing.assert_close(results["fused"][0], results["plain"][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(results["fused"][1], results["plain"][1], rtol=1e-3, atol=1e-9)
    del logits, targets, results
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}; {args.layers} layers x "
          f"{args.masks} masks, logits {args.size // 4}^2 -> targets {args.size}^2, forward + backward")
    seconds = timings(args, device)
    stats = {
        name: {
            "seconds": seconds[name],
            "peak_bytes": cuda_peak(args, device, name) if device.type == "cuda" else cpu_peak(args, name),
        }
        for name in VARIANTS
    }
    for name, s in stats.items():
        print(f"  {name:6s}: {s['seconds'] * 1000:8.1f} ms/step   peak memory {s['peak_bytes'] / 2**20:8.1f} MiB")
    p, f = stats["plain"], stats["fused"]
    print(f"  fused is {p['seconds'] / f['seconds']:.2f}x faster and uses "
          f"{p['peak_bytes'] / max(f['peak_bytes'], 1):.1f}x less peak memory")
    print(json.dumps({k: {"ms": round(v["seconds"] * 1000, 1), "MiB": round(v["peak_bytes"] / 2**20, 1)}
                      for k, v in stats.items()}))


if __name__ == "__main__":
    main()
