"""From a recipe's data section to loaders: the only place that reads DataConfig for loading.

Training augmentation is made a pure function of the position in the sample stream: before each sample
the RNGs are seeded from (seed, rank, position). A resumed run therefore sees exactly the crops and flips
the uninterrupted run would have seen, whatever the number of workers.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from maskformer_cli.config import DataConfig
from maskformer_cli.data.catalog import DatasetInfo, dataset_dir, datasets_root, get_dataset_info
from maskformer_cli.data.collate import Batch, collate
from maskformer_cli.data.datasets import build_dataset
from maskformer_cli.data.sampler import InferenceSampler, TrainingSampler, worker_init_fn
from maskformer_cli.data.transforms import build_transforms
from maskformer_cli.errors import UserError


def dataset_info(data: DataConfig) -> DatasetInfo:
    """The catalog entry (or custom spec) of the recipe's dataset, with the recipe's ignore override."""
    info = get_dataset_info(data.dataset, num_classes=data.synthetic_num_classes)
    if data.ignore_label is not None and data.ignore_label != info.ignore_label:
        from dataclasses import replace

        info = replace(info, ignore_label=data.ignore_label)
    return info


def with_synthetic_on_disk(data: DataConfig) -> DataConfig:
    """`data` with the synthetic generation parameters of the set already on disk, if there is one: for
    weights that carry no recipe (official / HF files), evaluating on `synthetic` must use the scenes the
    user has, not regenerate them with the defaults."""
    from dataclasses import replace

    from maskformer_cli.data.staging import stamp_entry

    info = get_dataset_info(data.dataset, num_classes=data.synthetic_num_classes)
    path = dataset_dir(info, data.root)
    entry = stamp_entry(path, "synthetic") if path.exists() else None
    params = (entry or {}).get("params") or {}
    fields = {"num_images": "synthetic_num_images", "size": "synthetic_size", "seed": "synthetic_seed"}
    found = {f: params[k] for k, f in fields.items() if isinstance(params.get(k), int)}
    return replace(data, **found) if found else data


def ensure_prepared(info: DatasetInfo, data: DataConfig) -> Path:
    """The prepared dataset's directory; the embedded synthetic set is generated on first use, and again
    when the recipe asks for other generation parameters than the ones on disk."""
    path = dataset_dir(info, data.root)
    if info.name == "synthetic":
        from maskformer_cli.data.staging import stamp_entry
        from maskformer_cli.data.synthetic import generate_synthetic

        want = {"num_classes": data.synthetic_num_classes, "num_images": data.synthetic_num_images,
                "size": data.synthetic_size, "seed": data.synthetic_seed}
        entry = stamp_entry(path, "synthetic") if path.exists() else None
        have = {k: (entry or {}).get("params", {}).get(k) for k in want}
        if entry is None or have != want:
            if entry is not None:
                _notice_regenerating(path, have, want)
            generate_synthetic(path, **want)
    if not path.exists():
        name = info.name.replace("_", "-")
        raise UserError(f"dataset '{name}' not found at {path}: run `maskformer prepare-data {name}` "
                        f"(or set $MASKFORMER_DATASETS / data.root)")
    return path


def _notice_regenerating(path: Path, have: dict, want: dict) -> None:
    """One line (rank 0) naming what differs, because regenerating replaces a set the user may have made
    on purpose (e.g. `prepare-data synthetic --num-images 40`); recipes stay reproducible only this way."""
    from rich.markup import escape

    from maskformer_cli import distributed as dist
    from maskformer_cli.reporting import console

    if not dist.is_main():
        return
    diff = ", ".join(f"{k} {have[k]} -> {want[k]}" for k in want if have[k] != want[k])
    console.print(f"[yellow]note:[/] regenerating the synthetic dataset in {escape(str(path))} "
                  f"(on disk -> recipe: {escape(diff)})", highlight=False, soft_wrap=True)


@dataclass
class TrainBatch(Batch):
    """A training batch, plus the samples skipped under the bad-file policy as (dataset index, reason): the
    reasons are recorded in the loader's worker processes, so they travel to the training loop this way."""

    skipped_files: list[tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _Skipped:
    index: int
    reason: str


def _train_collate(samples: list, **kwargs) -> TrainBatch:
    skipped = [(s.index, s.reason) for s in samples if isinstance(s, _Skipped)]
    batch = collate([None if isinstance(s, _Skipped) else s for s in samples], **kwargs)
    return TrainBatch(**{f.name: getattr(batch, f.name) for f in fields(Batch)}, skipped_files=skipped)


class _SeededSamples(Dataset):
    """Wraps a dataset whose __getitem__ receives (stream_position, index): seeds RNGs, then loads. A sample
    skipped by the dataset's bad-file policy comes back as a _Skipped naming its index and reason."""

    def __init__(self, dataset: Dataset, seed: int, rank: int):
        self.dataset = dataset
        self.seed = seed
        self.rank = rank

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        position, index = key
        s = (self.seed * 1_000_003 + self.rank * 7_919 + position) % (2**31)
        random.seed(s)
        np.random.seed(s)
        # The CPU generator only (what augmentation draws from): torch.manual_seed also queues a reseed of
        # every accelerator's RNG, formatting a stack trace each time (~6 ms a sample, a quarter of loading).
        torch.default_generator.manual_seed(s)
        sample = self.dataset[index]
        if sample is None:
            # pop: the dataset's list lives in this worker and would otherwise grow with every repeat
            recorded = getattr(self.dataset, "skipped", None)
            return _Skipped(index, recorded.pop() if recorded else "unreadable sample")
        return sample


class _PositionedSampler(Sampler):
    """Yields (position, index) from a TrainingSampler that starts at `start` samples into its stream."""

    def __init__(self, sampler: TrainingSampler, start: int):
        self.sampler = sampler
        self.start = start
        sampler.set_position(start)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for k, idx in enumerate(self.sampler):
            yield self.start + k, int(idx)


def build_train_dataset(data: DataConfig, info: DatasetInfo, task: str | None = None) -> Dataset:
    """The training split with its augmentation, bad samples skipped (UserError when it is missing or empty);
    separate from the loader so that `train` can check it before it makes the run directory."""
    root = ensure_prepared(info, data)
    ds = build_dataset(info, datasets_root(data.root), data.train_split, task or data.task, build_transforms(data, train=True),
                       skip_bad=True)
    if len(ds) == 0:
        raise UserError(f"no training images in {root} (split '{data.train_split}')")
    return ds


def build_train_loader(data: DataConfig, info: DatasetInfo, *, batch_size: int, seed: int, rank: int,
                       world_size: int, start_position: int = 0, task: str | None = None,
                       dataset: Dataset | None = None) -> DataLoader:
    """Infinite training loader for this rank; `batch_size` is per rank and per micro-batch. Its batches are
    TrainBatch (skipped samples named). `dataset`: one from `build_train_dataset`, else built here."""
    ds = dataset if dataset is not None else build_train_dataset(data, info, task)
    sampler = TrainingSampler(len(ds), shuffle=True, seed=seed, rank=rank, world_size=world_size)
    return DataLoader(
        _SeededSamples(ds, seed, rank), batch_size=batch_size, sampler=_PositionedSampler(sampler, start_position),
        num_workers=data.num_workers, collate_fn=partial(_train_collate, size_divisibility=data.size_divisibility,
                                                         ignore_label=info.ignore_label),
        worker_init_fn=worker_init_fn, persistent_workers=data.num_workers > 0, drop_last=True,
    )


def build_eval_loader(data: DataConfig, info: DatasetInfo, *, split: str | None = None, batch_size: int = 1,
                      rank: int = 0, world_size: int = 1, limit: int | None = None, task: str | None = None,
                      num_workers: int | None = None) -> DataLoader:
    """This rank's exact shard of a split, with the test-time resize; no padded duplicates."""
    root = ensure_prepared(info, data)
    ds = build_dataset(info, datasets_root(data.root), split or data.val_split, task or data.task,
                       build_transforms(data, train=False), keep_ground_truth=True)
    if limit is not None:
        ds = torch.utils.data.Subset(ds, range(min(limit, len(ds))))
    if len(ds) == 0:
        raise UserError(f"no images in {root} for split '{split or data.val_split}'")
    return DataLoader(
        ds, batch_size=batch_size, sampler=InferenceSampler(len(ds), rank=rank, world_size=world_size),
        num_workers=data.num_workers if num_workers is None else num_workers,
        collate_fn=partial(collate, size_divisibility=data.size_divisibility, ignore_label=info.ignore_label),
    )
