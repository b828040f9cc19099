"""What training does with a step that did not go as planned: non-finite losses or gradients, micro-batches
of unreadable files only, and runs whose data cannot be read at all.

- A non-finite loss or gradient skips the step (`engine.train_step` drops the gradients); more than
  `solver.max_bad_steps` in a row stop the run (the last checkpoint is intact).
- An fp16 grad-scaler overflow is the scaler calibrating: not a bad step.
- A bad training file is skipped (the loader leaves it out of its batch) and named once; all of them are
  listed at the end. A micro-batch of bad files only skips the step, and is not a bad step either.
- `MAX_SAMPLELESS_STEPS` steps in a row without one readable sample on any rank stop the run, and so does
  a schedule that ends without having read one: that is the data, not bad luck.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from maskformer_cli import distributed as dist
from maskformer_cli.engine import StepResult
from maskformer_cli.errors import UserError

MAX_SAMPLELESS_STEPS = 20
"""Steps in a row without a single readable training sample (on any rank) before training stops: by then
it is the data (a wrong label_suffix, a wrong folder), not bad luck."""


def check_data_hint(dataset: str) -> str:
    """How the user checks the dataset of a recipe: the custom checker for a spec, else prepare it again."""
    if dataset.lower().endswith((".yaml", ".yml")):
        return f"check them with `maskformer prepare-data custom --check {dataset}`"
    return f"prepare the dataset again with `maskformer prepare-data {dataset.replace('_', '-')}`"


def some(reasons: list[str], k: int = 3) -> str:
    return "; ".join(reasons[:k]) + ("; ..." if len(reasons) > k else "")


class StepPolicy:
    """Counts what went wrong in the steps of one training call and stops the run when it is the data or the
    optimisation, not a passing accident. `notice(text)` shows a yellow line; `warn(markup)` a log line."""

    def __init__(self, *, max_bad_steps: int, max_iters: int, start_step: int, dataset: str, checkpoints: str,
                 notice: Callable[[str], None], warn: Callable[[str], None]) -> None:
        self.max_bad_steps, self.max_iters, self.start_step = max_bad_steps, max_iters, start_step
        self.dataset, self.checkpoints = dataset, checkpoints
        self.notice, self.warn = notice, warn
        self.bad = 0  # non-finite steps in a row
        self.sampleless = 0  # steps in a row without a readable sample (on any rank)
        self.empty_steps = 0  # steps skipped for a micro-batch of bad files only
        self.skipped_samples = 0  # bad samples left out of batches (this rank; a file may count often)
        self.skipped_files: dict[int, str] = {}  # dataset index -> why it was skipped (first seen)

    def note_batches(self, micro_batches: Iterable) -> None:
        """Record the bad files the loader left out of these micro-batches; name the first one at once."""
        for b in micro_batches:
            self.skipped_samples += b.num_skipped
            for index, reason in b.skipped_files:
                if not self.skipped_files:
                    self.notice(f"skipping a bad training sample: {reason} (all are listed at the end)")
                self.skipped_files.setdefault(index, reason)

    def after_step(self, step: int, res: StepResult) -> None:
        """Judge the step just taken (`step` counts it); raise UserError when training must stop."""
        # agreed on every rank (res.samples is summed over ranks), so every rank stops together
        self.sampleless = self.sampleless + 1 if res.samples == 0 else 0
        # ... and a schedule shorter than that which never saw a sample must not end as a success
        if self.sampleless >= MAX_SAMPLELESS_STEPS or (
                step >= self.max_iters and self.sampleless == step - self.start_step):
            raise UserError(
                f"stopped at step {step}: no training sample could be read in {self.sampleless} steps in a row; "
                f"{len(self.skipped_files)} files skipped, e.g. {some(list(self.skipped_files.values()))}; "
                f"{check_data_hint(self.dataset)}")
        if res.empty:
            self.empty_steps += 1  # a micro-batch of bad files only: nothing to learn from, not a bad step
        elif res.overflow:
            pass  # fp16 grad scaler calibrating its scale; it has already adjusted
        elif res.skipped:
            self.bad += 1
            self.warn(f"[yellow]step {step}: non-finite loss or gradient, step skipped ({self.bad} in a row)")
            if self.bad > self.max_bad_steps:
                raise UserError(f"stopped at step {step}: {self.bad} non-finite steps in a row; the last good "
                                f"checkpoint in {self.checkpoints} is intact (lower solver.lr?)")
        else:
            self.bad = 0

    def report(self) -> None:
        """At the end: every rank's skipped files (each rank loads its own share of the samples), once."""
        files: dict[int, str] = {}
        times = 0
        for rank_files, rank_times in dist.all_gather_object((self.skipped_files, self.skipped_samples)):
            times += rank_times
            for index, reason in rank_files.items():
                files.setdefault(index, reason)
        if files:
            empty = f"; {self.empty_steps} steps had a batch of bad files only and were skipped" if self.empty_steps else ""
            self.notice(f"{len(files)} training files were skipped ({times} times in all{empty}): "
                        f"{some(sorted(files.values()))}; {check_data_hint(self.dataset)}")
