"""Batching: pad images and targets of different sizes to one size divisible by the backbone's stride."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from maskformer_cli.data.datasets import Sample
from maskformer_cli.models import PIXEL_MEAN
from maskformer_cli.structures import Target


@dataclass
class Batch:
    """A padded batch.

    images:      float [B, 3, Hp, Wp] on the 0-255 scale, not normalised; the pixel mean outside each image's
                 valid region, so that padding is 0 after normalisation, as in the reference (which normalises,
                 then pads with 0): a batch of mixed sizes then sees the padding a single image sees.
    image_sizes: B (h, w): the valid (unpadded) region of each image, top-left aligned.
    targets:     B Targets at (Hp, Wp): masks padded with False, ignore padded with True.
    sem_seg:     int64 [B, Hp, Wp] category maps (ignore_label where no mask covers, padding included), for the
                 per-pixel baselines and the semantic metrics.
    metas:       B meta dicts of the samples.
    num_skipped: samples that were None (unreadable files under skip_bad) and were dropped.
    """

    images: torch.Tensor
    image_sizes: list[tuple[int, int]]
    targets: list[Target]
    sem_seg: torch.Tensor
    metas: list[dict[str, Any]] = field(default_factory=list)
    num_skipped: int = 0

    def __len__(self) -> int:
        return len(self.image_sizes)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            images=self.images.to(device, non_blocking=True),
            image_sizes=self.image_sizes,
            targets=[t.to(device) for t in self.targets],
            sem_seg=self.sem_seg.to(device, non_blocking=True),
            metas=self.metas,
            num_skipped=self.num_skipped,
        )

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) on custom batch types."""

        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory()

        return Batch(
            images=self.images.pin_memory(),
            image_sizes=self.image_sizes,
            targets=[Target(t.classes.pin_memory(), t.masks.pin_memory(), pin(t.ignore), pin(t.is_crowd),
                            pin(t.segment_ids)) for t in self.targets],
            sem_seg=self.sem_seg.pin_memory(),
            metas=self.metas,
            num_skipped=self.num_skipped,
        )


def padded_size(sizes: Sequence[tuple[int, int]], size_divisibility: int) -> tuple[int, int]:
    """The smallest (H, W) holding every size, rounded up to a multiple of size_divisibility (<= 1: none)."""
    h = max(s[0] for s in sizes)
    w = max(s[1] for s in sizes)
    if size_divisibility > 1:
        h = math.ceil(h / size_divisibility) * size_divisibility
        w = math.ceil(w / size_divisibility) * size_divisibility
    return h, w


def _pad_target(t: Target, hp: int, wp: int) -> Target:
    h, w = t.masks.shape[-2:]
    pad = (0, wp - w, 0, hp - h)  # F.pad order: last dim first (left, right, top, bottom)
    ignore = t.ignore if t.ignore is not None else torch.zeros((h, w), dtype=torch.bool)
    return Target(
        classes=t.classes,
        masks=F.pad(t.masks, pad, value=False),
        ignore=F.pad(ignore, pad, value=True),
        is_crowd=t.is_crowd,
        segment_ids=t.segment_ids,
    )


def collate(samples: Sequence[Sample | None], size_divisibility: int = 32, ignore_label: int = 255) -> Batch:
    """Stack samples into a Batch, dropping None (skipped) samples; an all-None list gives an empty batch
    (images [0, 3, 0, 0]) that the training loop skips."""
    kept = [s for s in samples if s is not None]
    skipped = len(samples) - len(kept)
    if not kept:
        return Batch(images=torch.zeros((0, 3, 0, 0)), image_sizes=[], targets=[],
                     sem_seg=torch.zeros((0, 0, 0), dtype=torch.int64), metas=[], num_skipped=skipped)
    sizes = [(int(s.image.shape[-2]), int(s.image.shape[-1])) for s in kept]
    hp, wp = padded_size(sizes, size_divisibility)
    images = torch.tensor(PIXEL_MEAN, dtype=torch.float32).view(1, 3, 1, 1).repeat(len(kept), 1, hp, wp)
    for i, s in enumerate(kept):
        images[i, :, : sizes[i][0], : sizes[i][1]] = s.image.float()
    targets = [_pad_target(s.target, hp, wp) for s in kept]
    sem_seg = torch.stack([t.semantic_map(ignore_label) for t in targets])
    return Batch(images=images, image_sizes=sizes, targets=targets, sem_seg=sem_seg,
                 metas=[s.meta for s in kept], num_skipped=skipped)
