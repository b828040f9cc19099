"""The fused, chunked focal + dice loss against the plain losses on upsampled logits (values and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maskformer_cli import losses_fused
from maskformer_cli.losses import dice_loss, sigmoid_focal_loss
from maskformer_cli.losses_fused import focal_dice_loss


def _reference(logits, targets, alpha=0.25, gamma=2.0):
    """Per-mask (focal, dice) with the plain losses, upsampling as the criterion did before fusion."""
    x = logits
    if x.dim() == 3 and x.shape[-2:] != targets.shape[-2:]:
        x = F.interpolate(x[:, None], size=targets.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    x, t = x.flatten(1), targets.flatten(1).to(x.dtype)
    focal = torch.stack(
        [sigmoid_focal_loss(x[i : i + 1], t[i : i + 1], 1.0, alpha, gamma) for i in range(len(x))]
    )
    dice = torch.stack([dice_loss(x[i : i + 1], t[i : i + 1], 1.0) for i in range(len(x))])
    return focal, dice


def _case(m=5, low=(6, 7), high=(24, 28), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(m, *low, generator=g) * 4).to(dtype)
    targets = torch.rand(m, *high, generator=g) > 0.6
    targets[-1] = False  # an empty target mask (a segment lost to padding or cropping)
    return logits, targets


@pytest.fixture(params=[1, 2, 1 << 30], ids=["chunk1", "chunk2", "one-chunk"])
def chunk_rows(request, monkeypatch):
    """Run each test with chunks of 1 mask, 2 masks (uneven end) and all masks at once."""
    monkeypatch.setattr(losses_fused, "_chunk_rows", lambda n, pixels, device: request.param)
    return request.param


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 2.0), (0.5, 1.0), (0.25, 1.5), (0.1, 3.0)])
def test_values_and_gradients_equal_the_plain_losses(chunk_rows, alpha, gamma):
    logits, targets = _case()
    w_focal, w_dice = torch.rand(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    grads = []
    for fn in (focal_dice_loss, _reference):
        x = logits.clone().requires_grad_()
        focal, dice = fn(x, targets, alpha, gamma)
        ((focal * w_focal).sum() + (dice * w_dice).sum()).backward()
        grads.append((focal.detach(), dice.detach(), x.grad))
    for got, want in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_gradcheck_upsampled_and_flat(chunk_rows):
    logits, targets = _case(m=3, low=(3, 4), high=(9, 10))
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: focal_dice_loss(v, targets), (x,))
    flat = logits.flatten(1).clone().requires_grad_()  # [M, P] with P = h*w: no upsampling
    t = targets[:, :3, :4].flatten(1).double() * 0.7  # fractional targets (point-sampled edges)
    assert torch.autograd.gradcheck(lambda v: focal_dice_loss(v, t), (flat,))


def test_fp32_matches_the_plain_losses_at_training_size():
    logits, targets = _case(m=4, low=(32, 32), high=(128, 128), dtype=torch.float32)
    want = _reference(logits.double(), targets)
    got = focal_dice_loss(logits, targets)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)


def test_one_loss_only_and_no_masks():
    logits, targets = _case(m=2)
    x = logits.clone().requires_grad_()
    focal_dice_loss(x, targets)[1].sum().backward()  # dice alone: focal's gradient arrives as None
    y = logits.clone().requires_grad_()
    _reference(y, targets)[1].sum().backward()
    torch.testing.assert_close(x.grad, y.grad)
    empty = torch.zeros(0, 6, 7, dtype=torch.float64, requires_grad=True)
    focal, dice = focal_dice_loss(empty, torch.zeros(0, 24, 28, dtype=torch.bool))
    assert focal.shape == dice.shape == (0,)
    (focal.sum() + dice.sum()).backward()
    assert empty.grad.shape == empty.shape


def test_bad_input_is_refused():
    logits, targets = _case(m=2)
    with pytest.raises(ValueError, match="2 mask logits but 1 targets"):
        focal_dice_loss(logits, targets[:1])
    with pytest.raises(ValueError, match="gamma must be >= 1"):
        focal_dice_loss(logits, targets, gamma=0.5)


@pytest.mark.parametrize("low,high", [((7, 9), (28, 36)), ((5, 6), (15, 12)), ((4, 4), (20, 8)), ((1, 3), (4, 12)), ((5, 7), (17, 23))])
def test_upsample_gradient_equals_aten(low, high):
    # integer factors (equal, unequal per axis) take the stencil; (17, 23) is not a multiple: aten's kernel
    g = torch.randn(3, *high, dtype=torch.float64)
    want = torch.ops.aten.upsample_bilinear2d_backward(g[:, None], list(high), [3, 1, *low], False)[:, 0]
    torch.testing.assert_close(losses_fused._upsample_backward(g, low), want, rtol=1e-12, atol=1e-12)


def test_values_and_gradients_at_a_non_integer_scale():
    logits, targets = _case(m=3, low=(5, 7), high=(17, 23))
    grads = []
    for fn in (focal_dice_loss, _reference):
        x = logits.clone().requires_grad_()
        focal, dice = fn(x, targets)
        (focal.sum() + 2 * dice.sum()).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_second_derivative_fails_loudly():
    logits, targets = _case(m=2)
    x = logits.clone().requires_grad_()
    focal, dice = focal_dice_loss(x, targets)
    (g,) = torch.autograd.grad(focal.sum() + dice.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad"):
        g.sum().backward()


def test_extreme_logits_stay_finite_and_agree():
    # confident right and confident wrong pixels, far past where sigmoid saturates in fp32
    x = torch.tensor([[[-1e4, -100.0, -30.0, 0.0], [30.0, 100.0, 1e4, 5.0]]], dtype=torch.float32)
    t = torch.tensor([[[True, False, True, False], [True, False, True, True]]])
    got = x.clone().requires_grad_()
    focal, dice = focal_dice_loss(got, t)
    (focal.sum() + dice.sum()).backward()
    want = x.double().clone().requires_grad_()
    f64, d64 = _reference(want, t)
    (f64.sum() + d64.sum()).backward()
    assert torch.isfinite(focal).all() and torch.isfinite(dice).all() and torch.isfinite(got.grad).all()
    torch.testing.assert_close(focal.double(), f64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-7)
