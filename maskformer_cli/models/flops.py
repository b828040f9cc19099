"""FLOP count of one forward pass, in multiply-adds.

torch.utils.flop_counter counts 2 FLOPs per multiply-add (convolutions, matmuls, attention, einsum). The
paper's numbers come from fvcore, which counts one multiply-add as one flop, so we divide by 2. Like
fvcore's defaults for these layers, element-wise work (norms, activations, interpolation, softmax) is not
counted here; fvcore does count norms and upsampling, a small difference.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: nn.Module, images: torch.Tensor) -> int:
    """Multiply-adds of `model(images)` (images: [B, 3, H, W]), in eval mode, without autograd.

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(images)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // 2
