"""`maskformer train`: the run directory, resume, checkpoints, signals, evaluation during training.

`train(recipe, run_dir, ...)` is the programmatic entry (tests and `ablate` call it); `run_train` is what
the CLI calls: it relaunches under torchrun for `--gpus N` and sets up the process group.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maskformer_cli import __version__
from maskformer_cli import distributed as dist
from maskformer_cli.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    CheckpointManager,
    capture_rng_state,
    check_compatible,
    restore_rng_state,
)
from maskformer_cli.config import Recipe, dump_recipe, load_recipe, to_dict
from maskformer_cli.criterion import build_criterion
from maskformer_cli.data.build import build_eval_loader, build_train_loader, dataset_info
from maskformer_cli.engine import EvalSpec, evaluate, train_step, unwrap
from maskformer_cli.errors import UserError
from maskformer_cli.models import build_model
from maskformer_cli.optim import build_optimizer, build_scheduler, clip_grad_norm_full_model
from maskformer_cli.reporting import Logger, metrics_table, plot_curves, save_prediction_overlay


def run_train(recipe_path: Path, overrides: list[str], *, resume: bool, init_from: Path | None, gpus: int,
              run_dir: Path | None, exist_ok: bool, device: str) -> None:
    recipe = load_recipe(recipe_path, overrides)
    if gpus > 0 and "LOCAL_RANK" not in os.environ:
        argv = dist.strip_option(sys.argv[1:], "--gpus")
        raise SystemExit(dist.relaunch_with_torchrun(gpus, argv))
    info = dist.init_distributed(device)
    try:
        train(recipe, run_dir=run_dir, resume=resume, init_from=init_from, exist_ok=exist_ok,
              device=info.device)
    finally:
        dist.cleanup()


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    metrics: dict[str, Any]
    interrupted: bool


class _StopFlag:
    """SIGTERM/SIGINT ask for a checkpoint and a clean exit at the end of the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading_main():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def primary_metric(task: str) -> str:
    return "PQ" if task == "panoptic" else "mIoU"


def eval_spec(recipe: Recipe, info, metrics: tuple[str, ...] | None = None, mode: str | None = None,
              tta: bool | None = None) -> EvalSpec:
    inf = recipe.inference
    if metrics is None:
        metrics = ("miou", "pq") if recipe.data.task == "panoptic" else ("miou", "pq-stuff")
        if recipe.model.meta_architecture != "maskformer":
            metrics = tuple(m for m in metrics if m != "pq")
    mode = mode or inf.mode
    if mode == "panoptic":
        mode = "semantic"  # the semantic map comes from semantic inference; PQ from panoptic inference
    return EvalSpec(
        metrics=metrics, mode=mode, num_classes=info.num_classes, ignore_label=info.ignore_label,
        thing_ids=tuple(info.thing_ids), object_mask_threshold=inf.object_mask_threshold,
        overlap_threshold=inf.overlap_threshold, general_threshold=inf.general_threshold,
        iterative_ratio=inf.iterative_ratio, tta=inf.tta if tta is None else tta, tta_scales=inf.tta_scales,
        tta_flip=inf.tta_flip,
    )


def _env_json(world_size: int, device: torch.device) -> dict[str, Any]:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {
        "maskformer": __version__, "git_sha": sha, "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "world_size": world_size, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "argv": sys.argv, "hostname": platform.node(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _prepare_run_dir(run_dir: Path, resume: bool, exist_ok: bool) -> None:
    if run_dir.exists() and any(run_dir.iterdir()) and not (resume or exist_ok):
        raise UserError(f"run directory {run_dir} already exists: use --resume to continue it, --exist-ok to "
                        f"write into it, or another --run-dir / name=")
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "eval").mkdir(exist_ok=True)


def load_init_weights(model: torch.nn.Module, path: Path) -> list[str]:
    """Fine-tuning start: load weights only; keys whose shapes differ (the class head when K differs) are
    skipped and returned; any other missing or unexpected key is an error."""
    from maskformer_cli.models.convert import load_checkpoint_weights

    state, _meta = load_checkpoint_weights(path)
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if k not in skipped}
    missing = [k for k in own if k not in state and k not in skipped]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not fit this model: missing {missing[:20]} "
                        f"({len(missing)}), unexpected {unexpected[:20]} ({len(unexpected)})")
    own.update(state)
    model.load_state_dict(own)
    return skipped


def parameter_checksum(model: torch.nn.Module) -> float:
    """A position-weighted sum of every parameter and float buffer: equal for identical replicas, different otherwise."""
    total = torch.zeros((), dtype=torch.float64)
    for i, p in enumerate([*model.parameters(), *model.buffers()]):
        if not p.is_floating_point():
            continue
        w = torch.arange(1, p.numel() + 1, dtype=torch.float64, device=p.device) % 9973 + i
        total += (p.detach().double().flatten() * w).sum().cpu()
    return float(total)


def train(recipe: Recipe, *, run_dir: Path | None = None, resume: bool = False, init_from: Path | None = None,
          exist_ok: bool = False, device: torch.device | str = "cpu", stop_after: int | None = None,
          quiet: bool = False) -> TrainResult:
    """Train `recipe` to solver.max_iters (or until a stop signal / `stop_after` steps in this call)."""
    device = torch.device(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    main = rank == 0
    s = recipe.solver
    run_dir = Path(run_dir) if run_dir is not None else Path(recipe.output_dir) / recipe.name
    if main:
        _prepare_run_dir(run_dir, resume, exist_ok)
    dist.barrier()
    log = Logger(run_dir, enabled=main, quiet=quiet)
    if s.batch_size % (world * s.grad_accum):
        raise UserError(f"solver.batch_size={s.batch_size} is not divisible by world size {world} x "
                        f"grad_accum {s.grad_accum}")
    per_rank = s.batch_size // (world * s.grad_accum)
    if s.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(s.seed)

    info = dataset_info(recipe.data)
    model = build_model(recipe.model, info.num_classes).to(device)
    if init_from is not None and not resume:
        skipped = load_init_weights(model, Path(init_from))
        if skipped:
            log.print(f"[yellow]init-from:[/] re-initialised {len(skipped)} tensors whose shape differs: "
                      f"{', '.join(skipped[:6])}")
    criterion = build_criterion(recipe, info.num_classes)
    optimizer = build_optimizer(model, s)
    scheduler = build_scheduler(optimizer, s)
    scaler = torch.amp.GradScaler(device.type) if s.precision == "fp16" else None
    manager = CheckpointManager(run_dir / "checkpoints", keep_last=s.keep_last) if main else None

    start_step, best = 0, None
    if resume:
        path = CheckpointManager(run_dir / "checkpoints", keep_last=s.keep_last).latest_valid()
        if path is None:
            raise UserError(f"--resume: no valid checkpoint in {run_dir / 'checkpoints'}")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        check_compatible(ckpt, to_dict(recipe))
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_step, best = int(ckpt["step"]), ckpt.get("best_metric")
        rngs = ckpt.get("rng") or []
        if rank < len(rngs):
            restore_rng_state(rngs[rank])
        log.print(f"resumed from {path} at step {start_step}")
    if main:
        (run_dir / "config.yaml").write_text(dump_recipe(recipe))
        (run_dir / "env.json").write_text(json.dumps(_env_json(world, device), indent=2))

    ddp_model: torch.nn.Module = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=False)

    loader = build_train_loader(recipe.data, info, batch_size=per_rank, seed=s.seed, rank=rank, world_size=world,
                                start_position=start_step * per_rank * s.grad_accum)
    task = recipe.data.task
    metric_name = primary_metric(task)
    spec = eval_spec(recipe, info)
    colors = [info.color(i) for i in range(info.num_classes)]

    def run_eval(step: int, num_overlays: int = 0) -> dict[str, Any]:
        dist.broadcast_buffers(model)
        eval_loader = build_eval_loader(recipe.data, info, rank=rank, world_size=world, num_workers=0)
        shown: list[int] = []

        def draw(pred: dict, meta: dict) -> None:  # a few pictures of the final model, rank 0 only
            if main and len(shown) < num_overlays:
                shown.append(1)
                save_prediction_overlay(pred, meta, list(info.classes), colors,
                                        run_dir / "vis" / f"{Path(meta['file_name']).stem}.png", info.ignore_label)

        t0 = time.perf_counter()
        metrics = evaluate(ddp_model, eval_loader, spec, device=device, precision=s.precision,
                           class_names=info.classes, on_prediction=draw)
        metrics["eval_seconds"] = round(time.perf_counter() - t0, 2)
        if main:
            per_class = metrics.pop("per_class", None)
            (run_dir / "eval" / f"step_{step:08d}.json").write_text(json.dumps(
                {"step": step, **metrics, "per_class": per_class}, indent=1, default=float))
            log.log({"kind": "eval", "step": step, **metrics})
            log.result({"step": step, **metrics})
        return metrics

    def checkpoint(step: int, is_best: bool) -> None:
        rngs = dist.all_gather_object(capture_rng_state())
        dist.broadcast_buffers(model)
        extra = {}
        if world > 1:  # DDP keeps replicas identical; a checksum per rank catches any divergence
            sums = dist.all_gather_object(parameter_checksum(model))
            extra["ddp_params_identical"] = all(x == sums[0] for x in sums)
            if not extra["ddp_params_identical"]:
                log.print(f"[red]step {step}: parameters differ across ranks: {sums}")
        if not main:
            return
        manager.save(step, {
            "format_version": CHECKPOINT_FORMAT_VERSION, "step": step, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {}, "rng": rngs,
            "sampler": {"position": step * per_rank * s.grad_accum}, "best_metric": best,
            "recipe": to_dict(recipe), "classes": list(info.classes), "dataset": info.name,
            "thing_ids": list(info.thing_ids), "ignore_label": info.ignore_label, **extra,
        }, is_best=is_best)

    metrics: dict[str, Any] = {}
    step, bad, skipped_samples, interrupted = start_step, 0, 0, False
    model.train()
    log.start(s.max_iters, completed=start_step)
    it = iter(loader)
    t_last, imgs_since = time.perf_counter(), 0
    try:
        with _StopFlag() as stop:
            while step < s.max_iters:
                micro = [next(it) for _ in range(s.grad_accum)]
                skipped_samples += sum(b.num_skipped for b in micro)
                res = train_step(ddp_model, criterion, optimizer, micro, device=device, precision=s.precision,
                                 scaler=scaler, clip_grad=s.clip_grad, clip_fn=clip_grad_norm_full_model)
                with warnings.catch_warnings():
                    # A skipped first step triggers torch's "scheduler before optimizer" warning; the
                    # schedule follows the iteration count whether or not the step was applied.
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                    scheduler.step()
                step += 1
                imgs_since += per_rank * s.grad_accum * world
                if res.overflow:
                    pass  # fp16 grad scaler calibrating its scale; it has already adjusted
                elif res.skipped:
                    bad += 1
                    log.print(f"[yellow]step {step}: non-finite loss or gradient, step skipped ({bad} in a row)")
                    if bad > s.max_bad_steps:
                        raise UserError(f"stopped at step {step}: {bad} non-finite steps in a row; the last good "
                                        f"checkpoint in {run_dir / 'checkpoints'} is intact (lower solver.lr?)")
                else:
                    bad = 0
                if step % s.log_every == 0 or step == s.max_iters or step == start_step + 1:
                    now = time.perf_counter()
                    rec = {"kind": "train", "step": step, "loss": res.total, "lr": scheduler.get_last_lr()[0],
                           "grad_norm": res.grad_norm, "images_per_s": imgs_since / max(now - t_last, 1e-9),
                           "skipped_samples": skipped_samples, **res.losses}
                    if device.type == "cuda":
                        rec["max_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    t_last, imgs_since = now, 0
                    log.log(rec)
                    log.advance(step, f"loss {res.total:.3f} lr {rec['lr']:.2e} {rec['images_per_s']:.1f} img/s")
                last = step == s.max_iters
                is_best = False
                if step % s.eval_every == 0 or last:
                    metrics = run_eval(step, num_overlays=6 if last else 0)
                    value = metrics.get(metric_name)
                    if value is not None and (best is None or value > best):
                        best, is_best = value, True
                stopping = stop.requested or (stop_after is not None and step - start_step >= stop_after)
                if step % s.checkpoint_every == 0 or last or stopping:
                    checkpoint(step, is_best)
                if stopping and not last:
                    interrupted = True
                    log.print(f"[yellow]stopped at step {step}; checkpoint saved. Continue with --resume.")
                    break
    finally:
        log.stop()
        # Persistent workers of an infinite sampler outlive the loop (the loader keeps its iterator);
        # stop them now, or every run of an in-process sweep (ablate) leaves its workers behind.
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    if main and not interrupted:
        plot_curves(run_dir)
        if metrics:
            log.print(metrics_table(metrics, title=f"{recipe.name} @ step {step}"))
        if skipped_samples:
            log.print(f"[yellow]{skipped_samples} unreadable training samples were skipped")
    return TrainResult(run_dir=run_dir, step=step, metrics=metrics, interrupted=interrupted)


__all__ = ["run_train", "train", "TrainResult", "eval_spec", "unwrap"]
