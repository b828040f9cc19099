"""Full-resolution inference in tiles of rows: the paper's exact maps without [Q, H, W] tensors.

The reference brings every query's mask logits to the image size (bilinear upsampling of the stride-4
map to the padded input, crop of the padding, bilinear resize to the original image), applies the
sigmoid there and only then combines queries: sum_i p_i(c) * m_i[h, w] for semantic inference,
argmax_i score_i * m_i[h, w] for general / panoptic inference. Done as written this materialises
[Q, H, W] floats (100 MB at 512x512 with Q=100, 800 MB for a 1024x2048 Cityscapes image) and then a
[K, H, W] score map. Here the same values are produced for a band of output rows at a time, combined
and reduced while the band is in cache, and only the [H, W] results are kept.

Exactness. Bilinear upsampling by a power-of-two factor f (stride 4: f = 4) of rows r0..r1 with one
row of halo reproduces the full upsampling bit for bit: every source coordinate (y + 1/2) / f - 1/2 is
a binary fraction, the same in the band as in the whole. When the test-time resize must be undone
(crop + resize to another size), that second step is a separable linear map whose taps are computed
in float64 here; it equals PyTorch's bilinear resize up to float rounding (identical maps in float64,
differences only at near-exact ties in float32; tests check both).

Shapes: C channels (Q mask logits or K class logits), (h, w) stride-f map of the padded input (Hp, Wp),
(hi, wi) the valid image inside the padding (top-left), (H, W) the output size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

# Output pixels per band on a CPU: [Q, band] logits and [band, K] scores stay within a few MB (L2-sized).
TILE_PIXELS = 1 << 12
UPSAMPLE_BANDS = 4
# On a GPU the cost of small bands is kernel launches (and a host sync per band where a resize is undone),
# not cache misses: bands there hold up to this many float32 values per [C, band] tensor (64 MiB), which
# covers a 512x683 image with Q = 100 in one band. Measured on an H200 (benchmarks/bench_inference.py):
# the CPU's 4096-pixel tiles made the post-processing 4x slower than the written-out [Q, H, W] path.
GPU_BAND_VALUES = 1 << 24


def tile_pixels_for(device: torch.device | str, channels: int) -> int:
    """Pixels per tile for maps of `channels` (max of Q and K) on `device`: cache-sized on a CPU, as large
    as GPU_BAND_VALUES allows on an accelerator; what every function here uses when given no tile_pixels.
    The maps are exact whatever the tile (see above)."""
    if torch.device(device).type == "cpu":
        return TILE_PIXELS
    return max(TILE_PIXELS, GPU_BAND_VALUES // max(int(channels), 1))


def _interp_taps(in_size: int, out_size: int, dtype: torch.dtype, device: Any
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """1-D bilinear resizing, align_corners=False (PyTorch's and detectron2's): output i is
    w0[i] * x[i0[i]] + w1[i] * x[i1[i]]. The coordinates are computed as PyTorch's kernel does, in the
    maps' precision (float32 scale = in / out, then scale * (i + 0.5) - 0.5), so the weights match."""
    acc = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    scale = torch.tensor(in_size, dtype=acc) / torch.tensor(out_size, dtype=acc)
    src = ((torch.arange(out_size, dtype=acc) + 0.5) * scale - 0.5).clamp_(min=0)
    i0 = src.floor().long().clamp_(max=in_size - 1)
    i1 = (i0 + 1).clamp_(max=in_size - 1)
    lam = (src - i0).clamp_(0, 1)
    return (i0.to(device), i1.to(device), (1 - lam).to(dtype=dtype, device=device),
            lam.to(dtype=dtype, device=device))


def _power_of_two_factor(low: int, high: int) -> int | None:
    f = high // low if low else 0
    return f if f >= 1 and f * low == high and f & (f - 1) == 0 else None


def row_tiles(
    maps: torch.Tensor,
    image_size: tuple[int, int],
    padded_size: tuple[int, int],
    output_size: tuple[int, int],
    tile_pixels: int | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (y0, y1, band [C, y1 - y0, W]): rows y0..y1 of the maps brought to the output size.

    maps: [C, h, w] at stride Hp/h of the padded input. The bands cover 0..H in order. Equal to
    upsample(maps, (Hp, Wp))[:, :hi, :wi] resized to (H, W), bilinear with align_corners=False.
    """
    c, h, w = maps.shape
    tile_pixels = tile_pixels or tile_pixels_for(maps.device, c)
    hp, wp = (int(s) for s in padded_size)
    hi, wi = (int(s) for s in image_size)
    ho, wo = (int(s) for s in output_size)
    if not (0 < hi <= hp and 0 < wi <= wp):
        raise ValueError(f"image size {(hi, wi)} does not fit the padded size {(hp, wp)}")
    fy, fx = _power_of_two_factor(h, hp), _power_of_two_factor(w, wp)
    if fy is None or fx is None:  # not a stride-2^n map: upsample the whole (still cropped per band)
        full = F.interpolate(maps[None], size=(hp, wp), mode="bilinear", align_corners=False)[0, :, :hi, :wi]
        yield from _resized_tiles(full, (ho, wo), tile_pixels)
        return
    if (hi, wi) == (ho, wo):
        rows = max(fy, (tile_pixels // max(wo, 1)) // fy * fy)
        for y0 in range(0, ho, rows):
            y1 = min(y0 + rows, ho)
            yield y0, y1, _upsampled_rows(maps, fy, fx, y0, y1, wi)
        return
    # a test-time resize to undo: rows of the cropped map, then the separable 2-tap resize of them
    y_i0, y_i1, y_w0, y_w1 = _interp_taps(hi, ho, maps.dtype, maps.device)
    x_i0, x_i1, x_w0, x_w1 = _interp_taps(wi, wo, maps.dtype, maps.device)
    rows = max(1, tile_pixels // max(wo, 1))
    for y0 in range(0, ho, rows):
        y1 = min(y0 + rows, ho)
        s0, s1 = int(y_i0[y0]), int(y_i1[y1 - 1]) + 1  # source rows are monotone in the output row
        s0 -= s0 % fy
        band = _upsampled_rows(maps, fy, fx, s0, s1, wi)  # [C, s1 - s0, wi]
        band = band[..., x_i0] * x_w0 + band[..., x_i1] * x_w1  # columns inside, rows outside: the
        # order of PyTorch's 2-D kernel, so float rounding mostly agrees
        yield y0, y1, band[:, y_i0[y0:y1] - s0] * y_w0[y0:y1, None] + band[:, y_i1[y0:y1] - s0] * y_w1[y0:y1, None]


def _upsampled_rows(maps: torch.Tensor, fy: int, fx: int, y0: int, y1: int, width: int) -> torch.Tensor:
    """Rows y0..y1 (y0 a multiple of fy) and columns 0..width of the f-times bilinear upsampling of
    maps [C, h, w], bit-identical to slicing the full upsampling: one halo row on each side makes the
    band's border rows see the same neighbours, and the source coordinates are the same binary fractions."""
    h, w = maps.shape[-2:]
    a = max(y0 // fy - 1, 0)
    b = min(-(-y1 // fy) + 1, h)
    up = F.interpolate(maps[None, :, a:b], size=((b - a) * fy, w * fx), mode="bilinear", align_corners=False)[0]
    return up[:, y0 - a * fy : y1 - a * fy, :width]


def _resized_tiles(full: torch.Tensor, output_size: tuple[int, int], tile_pixels: int
                   ) -> Iterator[tuple[int, int, torch.Tensor]]:
    ho, wo = output_size
    if tuple(full.shape[-2:]) == (ho, wo):
        rows = max(1, tile_pixels // max(wo, 1))
        for y0 in range(0, ho, rows):
            yield y0, min(y0 + rows, ho), full[:, y0 : y0 + rows]
        return
    out = F.interpolate(full[None], size=(ho, wo), mode="bilinear", align_corners=False)[0]
    yield from _resized_tiles(out, output_size, tile_pixels)


# ------------------------------------------------------------------------------------------- reductions


def semantic_labels(
    class_probs: torch.Tensor,
    mask_logits: torch.Tensor,
    image_size: tuple[int, int],
    padded_size: tuple[int, int],
    output_size: tuple[int, int],
    tile_pixels: int | None = None,
) -> torch.Tensor:
    """argmax_c sum_i p_i(c) * sigmoid(m_i) at full resolution -> labels [H, W] int64.

    class_probs: [Q, K] (softmax over K+1 with "no object" dropped); mask_logits: [Q, h, w].
    Equal to `semantic_inference(...)` on the full-size masks, then argmax over K.
    """
    ho, wo = (int(s) for s in output_size)
    tile_pixels = tile_pixels or tile_pixels_for(mask_logits.device, max(class_probs.shape))
    labels = torch.empty((ho, wo), dtype=torch.int64, device=mask_logits.device)
    if class_probs.shape[0] == 0:
        return labels.zero_()
    flat = labels.view(-1)
    # bands of UPSAMPLE_BANDS tiles amortise the halo rows of the upsampling; the product and the max run
    # on one tile at a time, so [tile, K] scores stay in cache
    for y0, _, band in row_tiles(mask_logits, image_size, padded_size, output_size, tile_pixels * UPSAMPLE_BANDS):
        probs = band.flatten(1).sigmoid_()  # [Q, pixels of the band]
        for p0 in range(0, probs.shape[1], tile_pixels):
            scores = probs[:, p0 : p0 + tile_pixels].T @ class_probs  # [pixels, K]: reduce a contiguous dim
            # max(-1).indices: the first maximum, as argmax, but 2-3x faster on CPU for K = 150
            flat[y0 * wo + p0 : y0 * wo + p0 + scores.shape[0]] = scores.max(-1).indices
    return labels


def class_logit_labels(
    class_logits: torch.Tensor,
    image_size: tuple[int, int],
    padded_size: tuple[int, int],
    output_size: tuple[int, int],
    tile_pixels: int | None = None,
) -> torch.Tensor:
    """Per-pixel baselines: argmax over K of the upsampled class logits [K, h, w] -> labels [H, W] int64."""
    ho, wo = (int(s) for s in output_size)
    labels = torch.empty((ho, wo), dtype=torch.int64, device=class_logits.device)
    for y0, y1, band in row_tiles(class_logits, image_size, padded_size, output_size, tile_pixels):
        labels[y0:y1] = band.argmax(0)
    return labels


def weighted_mask_argmax(
    weights: torch.Tensor,
    mask_logits: torch.Tensor,
    image_size: tuple[int, int],
    padded_size: tuple[int, int],
    output_size: tuple[int, int],
    tile_pixels: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """argmax_i weights_i * sigmoid(m_i) per pixel (ties: lowest i), and each mask's binary area.

    weights: [N]; mask_logits: [N, h, w] (the kept queries). Returns (assignment [H, W] int64 in 0..N-1,
    binary_area [N] int64: pixels where sigmoid(m_i) >= 0.5, as the reference thresholds the probability).
    N must be > 0.
    """
    ho, wo = (int(s) for s in output_size)
    n = mask_logits.shape[0]
    tile_pixels = tile_pixels or tile_pixels_for(mask_logits.device, n)
    assignment = torch.empty((ho, wo), dtype=torch.int64, device=mask_logits.device)
    area = torch.zeros(n, dtype=torch.int64, device=mask_logits.device)
    w = weights.view(-1, 1, 1)
    for y0, y1, band in row_tiles(mask_logits, image_size, padded_size, output_size, tile_pixels):
        probs = band.sigmoid_()
        area += (probs >= 0.5).flatten(1).sum(1)
        assignment[y0:y1] = (w * probs).argmax(0)
    return assignment, area


def full_resolution(
    maps: torch.Tensor,
    image_size: tuple[int, int],
    padded_size: tuple[int, int],
    output_size: tuple[int, int],
    tile_pixels: int | None = None,
) -> torch.Tensor:
    """The whole [C, H, W] (for the few outputs that need every value: instance masks, TTA scores)."""
    ho, wo = (int(s) for s in output_size)
    out = maps.new_empty((maps.shape[0], ho, wo))
    for y0, y1, band in row_tiles(maps, image_size, padded_size, output_size, tile_pixels):
        out[:, y0:y1] = band
    return out
