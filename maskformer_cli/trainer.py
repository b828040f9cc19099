"""Training: the run directory, resume, checkpoints, signals, evaluation during training.

`train(recipe, run_dir, ...)` is the programmatic entry (tests, `ablate`, and the `train` command in
commands/train.py, which adds the torchrun relaunch and the process group). It runs a
`Trainer`: its constructor builds the run (and restores it on resume), `Trainer.train` is the loop: step
(`engine.train_step`, judged by `step_policy.StepPolicy`), checkpoint and evaluate on the `Schedule`
(checkpoint content: `checkpoint.training_checkpoint`), final save and evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maskformer_cli import distributed as dist
from maskformer_cli.checkpoint import (
    CheckpointManager,
    capture_rng_state,
    remove_stale_temps,
    restore_training,
    training_checkpoint,
)
from maskformer_cli.checkpoint import (
    load as load_checkpoint,
)
from maskformer_cli.config import Recipe, dump_recipe, inert_options, to_dict, with_absolute_dataset_spec
from maskformer_cli.criterion import build_criterion
from maskformer_cli.cuda_graphs import enable_cuda_graphs
from maskformer_cli.data.build import build_eval_loader, build_train_dataset, build_train_loader, dataset_info
from maskformer_cli.engine import StepResult, default_metrics, evaluate, train_step
from maskformer_cli.errors import UserError
from maskformer_cli.models import build_model
from maskformer_cli.optim import build_optimizer, build_scheduler, clip_grad_norm_full_model
from maskformer_cli.postprocess import build_postprocessor
from maskformer_cli.precision import resolve_precision
from maskformer_cli.reporting import Logger, console, metrics_table, plot_curves, save_prediction_overlay
from maskformer_cli.run_dir import env_json, prepare_run_dir
from maskformer_cli.signals import StopFlag
from maskformer_cli.step_policy import StepPolicy
from maskformer_cli.weights import load_init_weights


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    metrics: dict[str, Any]
    interrupted: bool
    stop_signal: int | None = None
    """The signal (SIGINT 2, SIGTERM 15) that stopped the run; the CLI exits with 128 + it."""


def primary_metric(task: str) -> str:
    return "PQ" if task == "panoptic" else "mIoU"


def _notice(log: Logger, text: str) -> None:
    """A yellow console line (rank 0, unless quiet) naming files: not wrapped, so paths stay whole, and
    plain text, so brackets in a path or message are not taken for markup."""
    from rich.text import Text

    if log.enabled and not log.quiet:
        console.print(Text(text, style="yellow"), soft_wrap=True)


def _stop_workers(batches) -> None:
    """Persistent workers of an infinite sampler outlive the loop (the loader keeps its iterator): stop them,
    or every run of an in-process sweep (ablate) leaves its workers behind."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


@dataclass(frozen=True)
class Schedule:
    """When a step is followed by a checkpoint and by an evaluation (solver.checkpoint_every, eval_every).
    The last step has both; a stop (signal, `stop_after`) saves a checkpoint but does not evaluate."""

    checkpoint_every: int
    eval_every: int
    max_iters: int

    def checkpoint_due(self, step: int, stopping: bool) -> bool:
        return step % self.checkpoint_every == 0 or step == self.max_iters or stopping

    def evaluation_due(self, step: int) -> bool:
        return step % self.eval_every == 0 or step == self.max_iters


def train(recipe: Recipe, *, run_dir: Path | None = None, resume: bool = False, init_from: Path | None = None,
          exist_ok: bool = False, device: torch.device | str = "cpu", stop_after: int | None = None,
          quiet: bool = False) -> TrainResult:
    """Train `recipe` to solver.max_iters (or until a stop signal / `stop_after` steps in this call).

    What can fail on the user's input (the dataset and its train and val splits, --init-from weights, the
    --resume checkpoint) is checked before the run directory is made: a run that fails to start leaves
    nothing in the way of its rerun.
    """
    trainer = Trainer(recipe, run_dir=run_dir, resume=resume, init_from=init_from, exist_ok=exist_ok,
                      device=device, quiet=quiet)
    return trainer.train(stop_after=stop_after)


class Trainer:
    """One training run: built (and restored from its checkpoint on resume) by the constructor, run by
    `train`. Every rank of a DDP job builds one; rank 0 alone writes the run directory."""

    def __init__(self, recipe: Recipe, *, run_dir: Path | None = None, resume: bool = False,
                 init_from: Path | None = None, exist_ok: bool = False, device: torch.device | str = "cpu",
                 quiet: bool = False) -> None:
        self.device = torch.device(device)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.main = self.rank == 0
        self.recipe = recipe = with_absolute_dataset_spec(recipe)  # the saved recipe must work from any directory
        self.solver = s = recipe.solver
        self.precision = resolve_precision(s.precision, self.device)  # 'auto' decided once, here
        self.run_dir = Path(run_dir) if run_dir is not None else Path(recipe.output_dir) / recipe.name
        self.log = Logger(self.run_dir, enabled=self.main, quiet=quiet)
        if s.cuda_graphs and self.world > 1:
            # not yet run on 2+ GPUs: the one two-rank trial (gloo, one GPU) failed before its cause was seen
            raise UserError("solver.cuda_graphs=true is single-GPU for now (not yet verified under DDP with "
                            f"{self.world} ranks); drop the option for multi-GPU training")
        if s.cuda_graphs and self.device.type != "cuda":
            raise UserError(f"solver.cuda_graphs=true needs a CUDA device; this run is on {self.device} "
                            "(drop the option, or pass --device cuda)")
        if s.batch_size % (self.world * s.grad_accum):
            raise UserError(f"solver.batch_size={s.batch_size} is not divisible by world size {self.world} x "
                            f"grad_accum {s.grad_accum}")
        self.per_rank = s.batch_size // (self.world * s.grad_accum)
        inert = inert_options(recipe)
        if inert:
            _notice(self.log, f"{recipe.model.meta_architecture} has no transformer module: {', '.join(inert)} "
                              "do nothing")
        self.info = dataset_info(recipe.data)
        train_set = build_train_dataset(recipe.data, self.info)
        # built now, so that a missing val split stops the run before training, not after the whole schedule
        self.eval_loader = self._checked_eval_loader()
        resume_path = self._resume_path() if resume else None
        init_skipped = self._build(init_from, resume)
        self.step, self.best = 0, None
        if resume_path is not None:
            self.step, self.best = restore_training(
                load_checkpoint(resume_path), to_dict(recipe), model=self.model, optimizer=self.optimizer,
                scheduler=self.scheduler, scaler=self.scaler, rank=self.rank)
        self.start_step = self.step
        self.manager = self._open_run_dir(resume_path, exist_ok, init_skipped)
        if s.cuda_graphs:
            # after the weights are in place (the graphs read parameters and buffers where they are now)
            enable_cuda_graphs(self.model)
        self.ddp_model: torch.nn.Module = self.model
        if self.world > 1:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=False)
        self.loader = build_train_loader(recipe.data, self.info, batch_size=self.per_rank, seed=s.seed,
                                         rank=self.rank, world_size=self.world,
                                         start_position=self.position(self.start_step), dataset=train_set)
        self.metric_name = primary_metric(recipe.data.task)
        self.eval_metrics = default_metrics(recipe.data.task, recipe.model.meta_architecture == "maskformer")
        self.postprocessor = build_postprocessor(recipe.inference, self.info, precision=self.precision)
        self.schedule = Schedule(checkpoint_every=s.checkpoint_every, eval_every=s.eval_every,
                                 max_iters=s.max_iters)
        self.policy = StepPolicy(max_bad_steps=s.max_bad_steps, max_iters=s.max_iters, start_step=self.start_step,
                                 dataset=recipe.data.dataset, checkpoints=str(self.run_dir / "checkpoints"),
                                 notice=lambda text: _notice(self.log, text), warn=self.log.print)
        self.metrics: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------- the main loop

    def train(self, stop_after: int | None = None) -> TrainResult:
        """Step to solver.max_iters, saving and evaluating on the schedule; a stop signal or `stop_after`
        steps in this call end it early with a checkpoint saved."""
        s = self.solver
        if self.start_step >= s.max_iters:
            self._conclude_finished_run()
        self.model.train()
        self.log.start(s.max_iters, completed=self.start_step)
        batches = iter(self.loader) if self.step < s.max_iters else None
        interrupted, stop_signal = False, None
        self._clock = (time.perf_counter(), 0)  # (time of the last log record, images since)
        try:
            with StopFlag() as stop:
                while self.step < s.max_iters:
                    self._train_step(batches)
                    last = self.step == s.max_iters
                    stopping = self._stop_agreed(stop, stop_after)
                    state = None
                    if self.schedule.checkpoint_due(self.step, stopping):
                        # saved before evaluating: an evaluation that fails must not take these weights with it
                        state = self._checkpoint_state()
                        self._save(state, is_best=False)
                    if self.schedule.evaluation_due(self.step):
                        self.metrics = self._evaluate_and_mark_best(state, num_overlays=6 if last else 0)
                    if stopping and not last:
                        interrupted, stop_signal = True, self._stopped(stop)
                        break
        finally:
            self.log.stop()
            _stop_workers(batches)
        if self.main and not interrupted:
            plot_curves(self.run_dir)
            if self.metrics:
                self.log.print(metrics_table(self.metrics, title=f"{self.recipe.name} @ step {self.step}"))
        self.policy.report()
        return TrainResult(run_dir=self.run_dir, step=self.step, metrics=self.metrics, interrupted=interrupted,
                           stop_signal=stop_signal)

    def _stop_agreed(self, stop: StopFlag, stop_after: int | None) -> bool:
        # a signal reaches the ranks at different moments: they agree, or one would wait for the others
        return (dist.any_rank(stop.requested, self.device)
                or (stop_after is not None and self.step - self.start_step >= stop_after))

    def _stopped(self, stop: StopFlag) -> int | None:
        """The signal that stopped the run, on every rank, also those it did not reach (torchrun sees one
        cause); None for `stop_after`."""
        self.log.print(f"[yellow]stopped at step {self.step}; checkpoint saved. Continue with --resume.")
        return next((x for x in dist.all_gather_object(stop.signum) if x is not None), None)

    # --------------------------------------------------------------------------------------- one step

    def position(self, step: int) -> int:
        """Samples this rank's sampler has handed out after `step` steps."""
        return step * self.per_rank * self.solver.grad_accum

    def _train_step(self, batches) -> None:
        """One optimiser step on the next `grad_accum` micro-batches, judged by the step policy, logged."""
        s = self.solver
        micro = [next(batches) for _ in range(s.grad_accum)]
        self.policy.note_batches(micro)
        res = train_step(self.ddp_model, self.criterion, self.optimizer, micro, device=self.device,
                         precision=self.precision, scaler=self.scaler, clip_grad=s.clip_grad,
                         clip_fn=clip_grad_norm_full_model)
        with warnings.catch_warnings():
            # A skipped first step triggers torch's "scheduler before optimizer" warning; the
            # schedule follows the iteration count whether or not the step was applied.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        self.step += 1
        t_last, imgs_since = self._clock
        self._clock = (t_last, imgs_since + self.per_rank * s.grad_accum * self.world)
        self.policy.after_step(self.step, res)
        if self.step % s.log_every == 0 or self.step == s.max_iters or self.step == self.start_step + 1:
            self._log_step(res)

    def _log_step(self, res: StepResult) -> None:
        now = time.perf_counter()
        t_last, imgs_since = self._clock
        rec = {"kind": "train", "step": self.step, "loss": res.total, "lr": self.scheduler.get_last_lr()[0],
               "grad_norm": res.grad_norm, "images_per_s": imgs_since / max(now - t_last, 1e-9),
               "skipped_samples": self.policy.skipped_samples, **res.losses}
        if self.device.type == "cuda":
            rec["max_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._clock = (now, 0)
        self.log.log(rec)
        self.log.advance(self.step, f"loss {res.total:.3f} lr {rec['lr']:.2e} {rec['images_per_s']:.1f} img/s")

    # -------------------------------------------------------------------------- checkpoints, evaluation

    def _checkpoint_state(self) -> dict[str, Any] | None:
        """The checkpoint of this step (a collective: every rank calls it); None on ranks other than 0."""
        rngs = dist.all_gather_object(capture_rng_state())
        dist.broadcast_buffers(self.model)
        extra = {}
        if self.world > 1:  # DDP keeps replicas identical; a checksum per rank catches any divergence
            sums = dist.all_gather_object(dist.parameter_checksum(self.model))
            extra["ddp_params_identical"] = all(x == sums[0] for x in sums)
            if not extra["ddp_params_identical"]:
                self.log.print(f"[red]step {self.step}: parameters differ across ranks: {sums}")
        if not self.main:
            return None
        return training_checkpoint(
            step=self.step, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            scaler=self.scaler, rng=rngs, position=self.position(self.step), best_metric=self.best,
            recipe_dict=to_dict(self.recipe), dataset=self.info, extra=extra)

    def _save(self, state: dict[str, Any] | None, is_best: bool) -> None:
        if state is not None:
            state["best_metric"] = self.best
            self.manager.save(self.step, state, is_best=is_best)

    def _evaluate_and_mark_best(self, state: dict[str, Any] | None, num_overlays: int) -> dict[str, Any]:
        """Evaluate at this step, whose checkpoint `state` is already saved; save it again as best.pt (with
        the new best metric) when the primary metric improves."""
        metrics = self._evaluate(num_overlays)
        value = metrics.get(self.metric_name)
        if value is not None and (self.best is None or value > self.best):
            self.best = value
            self._save(state, is_best=True)
        return metrics

    def _evaluate(self, num_overlays: int = 0) -> dict[str, Any]:
        """Metrics on the validation split (exact under DDP); rank 0 writes eval/step_N.json, the logs, and
        overlays of the first `num_overlays` predictions."""
        dist.broadcast_buffers(self.model)
        info, shown = self.info, []
        colors = [info.color(i) for i in range(info.num_classes)]

        def draw(pred: dict, meta: dict) -> None:  # a few pictures of the final model, rank 0 only
            if self.main and len(shown) < num_overlays:
                shown.append(1)
                save_prediction_overlay(pred, meta, list(info.classes), colors,
                                        self.run_dir / "vis" / f"{Path(meta['file_name']).stem}.png",
                                        info.ignore_label)

        t0 = time.perf_counter()
        metrics = evaluate(self.ddp_model, self.eval_loader, self.eval_metrics, self.postprocessor,
                           device=self.device, class_names=info.classes, on_prediction=draw)
        metrics["eval_seconds"] = round(time.perf_counter() - t0, 2)
        if self.main:
            per_class = metrics.pop("per_class", None)
            (self.run_dir / "eval" / f"step_{self.step:08d}.json").write_text(json.dumps(
                {"step": self.step, **metrics, "per_class": per_class}, indent=1, default=float))
            self.log.log({"kind": "eval", "step": self.step, **metrics})
            self.log.result({"step": self.step, **metrics})
        return metrics

    def _conclude_finished_run(self) -> None:
        """Resumed at or past solver.max_iters: report its final evaluation, or evaluate it if it has none."""
        s, final = self.solver, self.run_dir / "eval" / f"step_{self.start_step:08d}.json"
        saved = dist.broadcast_object(json.loads(final.read_text()) if self.main and final.is_file() else None)
        if saved is not None:
            self.metrics = {k: v for k, v in saved.items() if k not in ("step", "per_class")}
            _notice(self.log, f"{self.run_dir} had already finished (step {self.start_step}, solver.max_iters="
                              f"{s.max_iters}): nothing to train or evaluate; its final evaluation is {final}")
        else:
            _notice(self.log, f"{self.run_dir} had already finished training (step {self.start_step}, "
                              f"solver.max_iters={s.max_iters}) but has no final evaluation: evaluating now")
            self.metrics = self._evaluate_and_mark_best(self._checkpoint_state(), num_overlays=6)

    # -------------------------------------------------------------------------------------------- setup

    def _checked_eval_loader(self):
        """The validation loader, its files checked now: a missing val split must stop the run before
        training, not after the whole schedule."""
        data = self.recipe.data
        loader = build_eval_loader(data, self.info, rank=self.rank, world_size=self.world, num_workers=0)
        check = getattr(loader.dataset, "check_files", None)
        problems = check() if check is not None else []
        if problems:
            raise UserError(f"validation split '{data.val_split}': {len(problems)}{'+' if len(problems) >= 5 else ''} "
                            f"missing or unreadable file(s), first: {problems[0]}"
                            + (f"; also {'; '.join(problems[1:3])}" if len(problems) > 1 else ""))
        return loader

    def _resume_path(self) -> Path:
        ckpt_dir = self.run_dir / "checkpoints"
        found = (CheckpointManager(ckpt_dir, keep_last=self.solver.keep_last).latest_valid()
                 if ckpt_dir.is_dir() else None)
        if found is None:
            raise UserError(f"--resume: no valid checkpoint in {ckpt_dir} (a run that never saved one starts "
                            f"again without --resume, with --exist-ok if its directory holds its logs)")
        return found

    def _build(self, init_from: Path | None, resume: bool) -> list[str]:
        """Seed, then build model, criterion, optimizer, scheduler and grad scaler; returns the tensors that
        --init-from re-initialised (their shape differs)."""
        s, recipe = self.solver, self.recipe
        if s.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(s.seed)
        # Weights to come (--init-from, --resume) replace the backbone's: loading ImageNet weights first would
        # only cost a download, and fail offline.
        weights_to_come = init_from is not None or resume
        model_cfg = dataclasses.replace(recipe.model, pretrained=None) if weights_to_come else recipe.model
        self.model = build_model(model_cfg, self.info.num_classes).to(self.device)
        init_skipped = load_init_weights(self.model, Path(init_from)) if init_from is not None and not resume else []
        self.criterion = build_criterion(recipe.loss, self.info.num_classes,
                                         mask_classification=recipe.model.meta_architecture == "maskformer")
        self.optimizer = build_optimizer(self.model, s)
        self.scheduler = build_scheduler(self.optimizer, s)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        return init_skipped

    def _open_run_dir(self, resume_path: Path | None, exist_ok: bool, init_skipped: list[str]):
        """Rank 0 claims the run directory (every rank stops on its verdict), writes config.yaml and env.json,
        trims the logs to the resumed step; returns its CheckpointManager (None on other ranks)."""
        log, run_dir, notice, error = self.log, self.run_dir, None, None
        if self.main:
            try:
                notice = prepare_run_dir(run_dir, resume_path is not None, exist_ok)
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
            dropped = log.rewind(self.start_step)
            log.print(f"resumed from {resume_path} at step {self.start_step}"
                      + (f" (dropped {dropped} log records of the steps after it, which run again)" if dropped else ""))
        if not self.main:
            return None
        stale = remove_stale_temps(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else []
        if stale:
            _notice(log, f"removed {len(stale)} partial checkpoint file(s) left by an interrupted save: "
                         f"{', '.join(p.name for p in stale[:4])}")
        manager = CheckpointManager(run_dir / "checkpoints", keep_last=self.solver.keep_last)
        (run_dir / "config.yaml").write_text(dump_recipe(self.recipe))
        (run_dir / "env.json").write_text(json.dumps(env_json(self.world, self.device), indent=2))
        return manager


__all__ = ["train", "Trainer", "TrainResult"]
