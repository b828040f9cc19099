"""`maskformer train`: the run directory, resume, checkpoints, signals, evaluation during training.

`train(recipe, run_dir, ...)` is the programmatic entry (tests and `ablate` call it); `run_train` is what
the CLI calls: it relaunches under torchrun for `--gpus N` and sets up the process group.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maskformer_cli import distributed as dist
from maskformer_cli import launch
from maskformer_cli.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    CheckpointManager,
    capture_rng_state,
    check_compatible,
    remove_stale_temps,
    restore_rng_state,
)
from maskformer_cli.checkpoint import (
    load as load_checkpoint,
)
from maskformer_cli.config import Recipe, dump_recipe, load_recipe, to_dict, with_absolute_dataset_spec
from maskformer_cli.criterion import build_criterion
from maskformer_cli.data.build import build_eval_loader, build_train_dataset, build_train_loader, dataset_info
from maskformer_cli.engine import default_metrics, evaluate, train_step, unwrap
from maskformer_cli.errors import UserError
from maskformer_cli.models import build_model
from maskformer_cli.optim import build_optimizer, build_scheduler, clip_grad_norm_full_model
from maskformer_cli.postprocess import build_postprocessor
from maskformer_cli.precision import resolve_precision
from maskformer_cli.reporting import Logger, console, metrics_table, plot_curves, save_prediction_overlay
from maskformer_cli.run_dir import env_json, prepare_run_dir


def run_train(recipe_path: Path, overrides: list[str], *, resume: bool, init_from: Path | None, gpus: int,
              run_dir: Path | None, exist_ok: bool, device: str) -> None:
    """The `train` command. A run stopped by SIGINT / SIGTERM (checkpoint saved) exits with 128 + the signal
    (130, 143), not 0."""
    recipe = load_recipe(recipe_path, overrides)
    if gpus > 0 and "LOCAL_RANK" not in os.environ:
        argv = launch.strip_option(sys.argv[1:], "--gpus")
        raise SystemExit(launch.relaunch_with_torchrun(gpus, argv))
    try:
        info = dist.init_distributed(device)
        try:
            result = train(recipe, run_dir=run_dir, resume=resume, init_from=init_from, exist_ok=exist_ok,
                           device=info.device)
        finally:
            dist.cleanup()
    except UserError as e:
        # A rank of `train --gpus N`: the relaunching process prints the job's one line (rank 0's).
        if launch.report_user_error(_one_line(e)) and not _verbose():
            raise SystemExit(1) from None
        raise
    except Exception:
        # A peer's UserError ended its process, which breaks this rank's collectives ("Connection closed"):
        # a consequence, not a second error worth a traceback.
        if launch.peer_reported_user_error() and not _verbose():
            raise SystemExit(1) from None
        raise
    if result.stop_signal is not None:
        # A stopped run is not a finished one: `train && evaluate` and schedulers must see the failure.
        raise SystemExit(128 + result.stop_signal)


def _one_line(e: UserError) -> str:
    from maskformer_cli.cli import _original_message  # the CLI's own reading of a UserError

    return _original_message(e)


def _verbose() -> bool:
    """`maskformer -v`: tracebacks wanted, from every rank."""
    cli = sys.modules.get("maskformer_cli.cli")
    return bool(os.environ.get("MASKFORMER_VERBOSE")) or bool(cli and cli._state.get("verbose"))


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    metrics: dict[str, Any]
    interrupted: bool
    stop_signal: int | None = None
    """The signal (SIGINT 2, SIGTERM 15) that stopped the run; the CLI exits with 128 + it."""


class _StopFlag:
    """SIGTERM/SIGINT ask for a checkpoint and a clean exit at the end of the current step."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading_main():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        # A second Ctrl-C stops at once. A second SIGTERM does not: under `--gpus N` a scheduler's SIGTERM
        # can reach a rank twice (directly, and passed on by torchrun), and must still save the checkpoint.
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def primary_metric(task: str) -> str:
    return "PQ" if task == "panoptic" else "mIoU"


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


MAX_SAMPLELESS_STEPS = 20
"""Steps in a row without a single readable training sample (on any rank) before training stops: by then
it is the data (a wrong label_suffix, a wrong folder), not bad luck."""


def _check_data_hint(dataset: str) -> str:
    if dataset.lower().endswith((".yaml", ".yml")):
        return f"check them with `maskformer prepare-data custom --check {dataset}`"
    return f"prepare the dataset again with `maskformer prepare-data {dataset.replace('_', '-')}`"


def _notice(log: Logger, text: str) -> None:
    """A yellow console line (rank 0, unless quiet) naming files: not wrapped, so paths stay whole, and
    plain text, so brackets in a path or message are not taken for markup."""
    from rich.text import Text

    if log.enabled and not log.quiet:
        console.print(Text(text, style="yellow"), soft_wrap=True)


def _some(reasons: list[str], k: int = 3) -> str:
    return "; ".join(reasons[:k]) + ("; ..." if len(reasons) > k else "")


def train(recipe: Recipe, *, run_dir: Path | None = None, resume: bool = False, init_from: Path | None = None,
          exist_ok: bool = False, device: torch.device | str = "cpu", stop_after: int | None = None,
          quiet: bool = False) -> TrainResult:
    """Train `recipe` to solver.max_iters (or until a stop signal / `stop_after` steps in this call).

    What can fail on the user's input (the dataset and its train and val splits, --init-from weights, the
    --resume checkpoint) is checked before the run directory is made: a run that fails to start leaves
    nothing in the way of its rerun.
    """
    device = torch.device(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    main = rank == 0
    recipe = with_absolute_dataset_spec(recipe)  # the saved recipe must work from any directory
    s = recipe.solver
    precision = resolve_precision(s.precision, device)
    run_dir = Path(run_dir) if run_dir is not None else Path(recipe.output_dir) / recipe.name
    log = Logger(run_dir, enabled=main, quiet=quiet)
    if s.batch_size % (world * s.grad_accum):
        raise UserError(f"solver.batch_size={s.batch_size} is not divisible by world size {world} x "
                        f"grad_accum {s.grad_accum}")
    per_rank = s.batch_size // (world * s.grad_accum)

    info = dataset_info(recipe.data)
    train_set = build_train_dataset(recipe.data, info)
    # built now, so that a missing val split stops the run before training, not after the whole schedule
    eval_loader = build_eval_loader(recipe.data, info, rank=rank, world_size=world, num_workers=0)
    check = getattr(eval_loader.dataset, "check_files", None)
    problems = check() if check is not None else []
    if problems:  # found now, not after the whole training schedule
        raise UserError(f"validation split '{recipe.data.val_split}': {len(problems)}{'+' if len(problems) >= 5 else ''} "
                        f"missing or unreadable file(s), first: {problems[0]}"
                        + (f"; also {'; '.join(problems[1:3])}" if len(problems) > 1 else ""))
    resume_path = None
    if resume:
        ckpt_dir = run_dir / "checkpoints"
        resume_path = CheckpointManager(ckpt_dir, keep_last=s.keep_last).latest_valid() if ckpt_dir.is_dir() else None
        if resume_path is None:
            raise UserError(f"--resume: no valid checkpoint in {ckpt_dir} (a run that never saved one starts "
                            f"again without --resume, with --exist-ok if its directory holds its logs)")

    if s.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(s.seed)
    # Weights to come (--init-from, --resume) replace the backbone's: loading ImageNet weights first would
    # only cost a download, and fail offline.
    weights_to_come = init_from is not None or resume
    model_cfg = dataclasses.replace(recipe.model, pretrained=None) if weights_to_come else recipe.model
    model = build_model(model_cfg, info.num_classes).to(device)
    init_skipped = load_init_weights(model, Path(init_from)) if init_from is not None and not resume else []
    criterion = build_criterion(recipe, info.num_classes)
    optimizer = build_optimizer(model, s)
    scheduler = build_scheduler(optimizer, s)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    start_step, best = 0, None
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        saved_ds = ((ckpt.get("recipe") or {}).get("data") or {}).get("dataset")
        if isinstance(saved_ds, str) and os.path.abspath(saved_ds) == recipe.data.dataset:
            ckpt["recipe"]["data"]["dataset"] = recipe.data.dataset  # saved relative by an earlier version
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

    notice, error = None, None
    if main:
        try:
            notice = prepare_run_dir(run_dir, resume, exist_ok)
        except UserError as e:
            error = str(e)
    # every rank stops on rank 0's verdict: a rank left waiting would only see a broken connection
    error = dist.broadcast_object(error)
    if error is not None:
        raise UserError(error)
    if notice:
        _notice(log, f"{notice}")
    if init_skipped:
        log.print(f"[yellow]init-from:[/] re-initialised {len(init_skipped)} tensors whose shape differs: "
                  f"{', '.join(init_skipped[:6])}")
    if resume_path is None:
        log.reset()
    else:
        dropped = log.rewind(start_step)
        log.print(f"resumed from {resume_path} at step {start_step}"
                  + (f" (dropped {dropped} log records of the steps after it, which run again)" if dropped else ""))
    if main:
        stale = remove_stale_temps(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else []
        if stale:
            _notice(log, f"removed {len(stale)} partial checkpoint file(s) left by an interrupted save: "
                         f"{', '.join(p.name for p in stale[:4])}")
    manager = CheckpointManager(run_dir / "checkpoints", keep_last=s.keep_last) if main else None
    if main:
        (run_dir / "config.yaml").write_text(dump_recipe(recipe))
        (run_dir / "env.json").write_text(json.dumps(env_json(world, device), indent=2))

    ddp_model: torch.nn.Module = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=False)

    loader = build_train_loader(recipe.data, info, batch_size=per_rank, seed=s.seed, rank=rank, world_size=world,
                                start_position=start_step * per_rank * s.grad_accum, dataset=train_set)
    task = recipe.data.task
    metric_name = primary_metric(task)
    eval_metrics = default_metrics(task, recipe.model.meta_architecture == "maskformer")
    postprocessor = build_postprocessor(recipe.inference, info, precision=precision)
    colors = [info.color(i) for i in range(info.num_classes)]

    def run_eval(step: int, num_overlays: int = 0) -> dict[str, Any]:
        dist.broadcast_buffers(model)
        shown: list[int] = []

        def draw(pred: dict, meta: dict) -> None:  # a few pictures of the final model, rank 0 only
            if main and len(shown) < num_overlays:
                shown.append(1)
                save_prediction_overlay(pred, meta, list(info.classes), colors,
                                        run_dir / "vis" / f"{Path(meta['file_name']).stem}.png", info.ignore_label)

        t0 = time.perf_counter()
        metrics = evaluate(ddp_model, eval_loader, eval_metrics, postprocessor, device=device,
                           class_names=info.classes, on_prediction=draw)
        metrics["eval_seconds"] = round(time.perf_counter() - t0, 2)
        if main:
            per_class = metrics.pop("per_class", None)
            (run_dir / "eval" / f"step_{step:08d}.json").write_text(json.dumps(
                {"step": step, **metrics, "per_class": per_class}, indent=1, default=float))
            log.log({"kind": "eval", "step": step, **metrics})
            log.result({"step": step, **metrics})
        return metrics

    def checkpoint_state(step: int) -> dict[str, Any] | None:
        """The checkpoint of this step (a collective: every rank calls it); None on ranks other than 0."""
        rngs = dist.all_gather_object(capture_rng_state())
        dist.broadcast_buffers(model)
        extra = {}
        if world > 1:  # DDP keeps replicas identical; a checksum per rank catches any divergence
            sums = dist.all_gather_object(parameter_checksum(model))
            extra["ddp_params_identical"] = all(x == sums[0] for x in sums)
            if not extra["ddp_params_identical"]:
                log.print(f"[red]step {step}: parameters differ across ranks: {sums}")
        if not main:
            return None
        return {
            "format_version": CHECKPOINT_FORMAT_VERSION, "step": step, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {}, "rng": rngs,
            "sampler": {"position": step * per_rank * s.grad_accum}, "best_metric": best,
            "recipe": to_dict(recipe), "classes": list(info.classes), "dataset": info.name,
            "thing_ids": list(info.thing_ids), "ignore_label": info.ignore_label, **extra,
        }

    def save(step: int, state: dict[str, Any] | None, is_best: bool) -> None:
        if state is not None:
            state["best_metric"] = best
            manager.save(step, state, is_best=is_best)

    def evaluate_and_mark_best(step: int, state: dict[str, Any] | None, num_overlays: int) -> dict[str, Any]:
        """Evaluate at `step`, whose checkpoint `state` is already saved; save it again as best.pt (with the
        new best metric) when the primary metric improves."""
        nonlocal best
        metrics = run_eval(step, num_overlays=num_overlays)
        value = metrics.get(metric_name)
        if value is not None and (best is None or value > best):
            best = value
            save(step, state, is_best=True)
        return metrics

    metrics: dict[str, Any] = {}
    step, bad, skipped_samples, interrupted, stop_signal = start_step, 0, 0, False, None
    skipped_files: dict[int, str] = {}  # dataset index -> why it was skipped (first seen)
    empty_steps, sampleless = 0, 0
    if start_step >= s.max_iters:
        final = run_dir / "eval" / f"step_{start_step:08d}.json"
        saved = dist.broadcast_object(json.loads(final.read_text()) if main and final.is_file() else None)
        if saved is not None:
            metrics = {k: v for k, v in saved.items() if k not in ("step", "per_class")}
            _notice(log, f"{run_dir} had already finished (step {start_step}, solver.max_iters="
                      f"{s.max_iters}): nothing to train or evaluate; its final evaluation is {final}")
        else:
            _notice(log, f"{run_dir} had already finished training (step {start_step}, solver.max_iters="
                      f"{s.max_iters}) but has no final evaluation: evaluating now")
            state = checkpoint_state(start_step)
            metrics = evaluate_and_mark_best(start_step, state, num_overlays=6)
    model.train()
    log.start(s.max_iters, completed=start_step)
    it = iter(loader) if step < s.max_iters else None
    t_last, imgs_since = time.perf_counter(), 0
    try:
        with _StopFlag() as stop:
            while step < s.max_iters:
                micro = [next(it) for _ in range(s.grad_accum)]
                for b in micro:
                    skipped_samples += b.num_skipped
                    for index, reason in b.skipped_files:
                        if not skipped_files:
                            _notice(log, f"skipping a bad training sample: {reason} (all are listed at the end)")
                        skipped_files.setdefault(index, reason)
                res = train_step(ddp_model, criterion, optimizer, micro, device=device, precision=precision,
                                 scaler=scaler, clip_grad=s.clip_grad, clip_fn=clip_grad_norm_full_model)
                with warnings.catch_warnings():
                    # A skipped first step triggers torch's "scheduler before optimizer" warning; the
                    # schedule follows the iteration count whether or not the step was applied.
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                    scheduler.step()
                step += 1
                imgs_since += per_rank * s.grad_accum * world
                # agreed on every rank (res.samples is summed over ranks), so every rank stops together
                sampleless = sampleless + 1 if res.samples == 0 else 0
                # ... and a schedule shorter than that which never saw a sample must not end as a success
                if sampleless >= MAX_SAMPLELESS_STEPS or (step >= s.max_iters and sampleless == step - start_step):
                    raise UserError(
                        f"stopped at step {step}: no training sample could be read in {sampleless} steps in a row; "
                        f"{len(skipped_files)} files skipped, e.g. {_some(list(skipped_files.values()))}; "
                        f"{_check_data_hint(recipe.data.dataset)}")
                if res.empty:
                    empty_steps += 1  # a micro-batch of bad files only: nothing to learn from, not a bad step
                elif res.overflow:
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
                # a signal reaches the ranks at different moments: they agree, or one would wait for the others
                stopping = (dist.any_rank(stop.requested, device)
                            or (stop_after is not None and step - start_step >= stop_after))
                state = None
                if step % s.checkpoint_every == 0 or last or stopping:
                    # saved before evaluating: an evaluation that fails must not take these weights with it
                    state = checkpoint_state(step)
                    save(step, state, is_best=False)
                if step % s.eval_every == 0 or last:
                    metrics = evaluate_and_mark_best(step, state, num_overlays=6 if last else 0)
                if stopping and not last:
                    # every rank exits with the signal, also those it did not reach (torchrun sees one cause)
                    stop_signal = next((x for x in dist.all_gather_object(stop.signum) if x is not None), None)
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
    # every rank's skipped files (each rank loads its own share of the samples)
    files: dict[int, str] = {}
    times = 0
    for rank_files, rank_times in dist.all_gather_object((skipped_files, skipped_samples)):
        times += rank_times
        for index, reason in rank_files.items():
            files.setdefault(index, reason)
    if main and not interrupted:
        plot_curves(run_dir)
        if metrics:
            log.print(metrics_table(metrics, title=f"{recipe.name} @ step {step}"))
    if files:
        empty = f"; {empty_steps} steps had a batch of bad files only and were skipped" if empty_steps else ""
        _notice(log, f"{len(files)} training files were skipped ({times} times in all{empty}): "
                  f"{_some(sorted(files.values()))}; {_check_data_hint(recipe.data.dataset)}")
    return TrainResult(run_dir=run_dir, step=step, metrics=metrics, interrupted=interrupted,
                       stop_signal=stop_signal)


__all__ = ["run_train", "train", "TrainResult", "unwrap"]
