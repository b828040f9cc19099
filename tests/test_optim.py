"""Optimizer groups, the poly schedule and full-model clipping, checked against independent references."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from maskformer_cli.config import SolverConfig
from maskformer_cli.optim import (
    build_optimizer,
    build_param_groups,
    build_scheduler,
    clip_grad_norm_full_model,
    poly_lr_lambda,
)


class _SwinBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))
        self.norm1 = nn.LayerNorm(8)
        self.qkv = nn.Linear(8, 24)


class _Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.block = _SwinBlock()
        self.frozen = nn.Conv2d(8, 8, 1)
        for p in self.frozen.parameters():
            p.requires_grad_(False)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = _Backbone()
        self.pixel_decoder = nn.Sequential(nn.Conv2d(8, 8, 3), nn.GroupNorm(4, 8), nn.ReLU())
        self.query_embed = nn.Embedding(5, 8)
        self.class_embed = nn.Linear(8, 4)
        self.decoder_norm = nn.LayerNorm(8)
        # a parameter shared by two modules (weight tying) must be optimised once
        self.tied = nn.Linear(4, 8, bias=False)
        self.tied_again = nn.Linear(4, 8, bias=False)
        self.tied_again.weight = self.tied.weight


# (name, expected lr multiplier, expected weight decay kind) for every trainable parameter, by hand
EXPECTED = {
    "backbone.stem.weight": ("bb", "wd"),
    "backbone.bn.weight": ("bb", "norm"),
    "backbone.bn.bias": ("bb", "norm"),
    "backbone.absolute_pos_embed": ("bb", "embed"),
    "backbone.block.relative_position_bias_table": ("bb", "embed"),
    "backbone.block.norm1.weight": ("bb", "norm"),
    "backbone.block.norm1.bias": ("bb", "norm"),
    "backbone.block.qkv.weight": ("bb", "wd"),
    "backbone.block.qkv.bias": ("bb", "wd"),
    "pixel_decoder.0.weight": ("head", "wd"),
    "pixel_decoder.0.bias": ("head", "wd"),
    "pixel_decoder.1.weight": ("head", "norm"),
    "pixel_decoder.1.bias": ("head", "norm"),
    "query_embed.weight": ("head", "embed"),
    "class_embed.weight": ("head", "wd"),
    "class_embed.bias": ("head", "wd"),
    "decoder_norm.weight": ("head", "norm"),
    "decoder_norm.bias": ("head", "norm"),
    "tied.weight": ("head", "wd"),
}


@pytest.mark.parametrize("wrap", [False, True])
def test_param_groups_follow_the_reference_rules(wrap: bool) -> None:
    model = _Model()
    target: nn.Module = model
    if wrap:  # DDP puts the model under "module."
        target = nn.Module()
        target.module = model
    lr, wd, mult, wd_norm, wd_embed = 1e-4, 0.05, 0.1, 0.001, 0.002
    groups = build_param_groups(target, lr, wd, mult, weight_decay_norm=wd_norm, weight_decay_embed=wd_embed)
    by_id = {id(p): n for n, p in model.named_parameters()}  # named_parameters dedups the tied weight
    got: dict[str, tuple[float, float]] = {}
    for g in groups:
        for p in g["params"]:
            name = by_id[id(p)]
            assert name not in got, f"{name} appears twice"
            got[name] = (g["lr"], g["weight_decay"])
    lrs = {"bb": lr * mult, "head": lr}
    wds = {"wd": wd, "norm": wd_norm, "embed": wd_embed}
    expected = {n: (lrs[a], wds[b]) for n, (a, b) in EXPECTED.items()}
    assert set(got) == set(expected)
    for name, (want_lr, want_wd) in expected.items():
        assert got[name][0] == pytest.approx(want_lr) and got[name][1] == pytest.approx(want_wd), name
    # counts add up: every trainable parameter exactly once, frozen ones never
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in trainable)
    assert "backbone.frozen.weight" not in got


def test_build_optimizer_reads_the_solver_config() -> None:
    model = _Model()
    cfg = SolverConfig(lr=2e-4, weight_decay=0.01, backbone_multiplier=1.0, betas=(0.8, 0.95))
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["betas"] == (0.8, 0.95) for g in opt.param_groups)
    assert {g["lr"] for g in opt.param_groups} == {2e-4}
    assert {g["weight_decay"] for g in opt.param_groups} == {0.01, 0.0}


def _closed_form(it: int, max_iters: int, power: float, warmup_iters: int, warmup_factor: float) -> float:
    # detectron2 WarmupPolyLR written out independently
    w = warmup_factor + (1 - warmup_factor) * it / warmup_iters if it < warmup_iters else 1.0
    return w * (1 - it / max_iters) ** power


@pytest.mark.parametrize("warmup_iters,warmup_factor", [(0, 1.0), (10, 0.001), (25, 0.5)])
def test_poly_schedule_matches_closed_form(warmup_iters: int, warmup_factor: float) -> None:
    max_iters, power, base_lr = 100, 0.9, 1e-3
    fn = poly_lr_lambda(max_iters, power, warmup_iters, warmup_factor)
    for it in range(max_iters + 1):
        assert fn(it) == pytest.approx(
            _closed_form(it, max_iters, power, warmup_iters, warmup_factor), abs=1e-12
        )
    assert fn(max_iters + 5) == 0.0  # clamped, not complex

    # through LambdaLR: lr used at optimizer step `it` after `it` scheduler steps
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=base_lr)
    cfg = SolverConfig(
        lr=base_lr,
        max_iters=max_iters,
        poly_power=power,
        warmup_iters=warmup_iters,
        warmup_factor=warmup_factor,
    )
    sched = build_scheduler(opt, cfg)
    for it in range(max_iters):
        want = base_lr * _closed_form(it, max_iters, power, warmup_iters, warmup_factor)
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-9, abs=1e-15)
        opt.step()
        sched.step()
    assert "lr_lambdas" in sched.state_dict()
    # the state dict is plain data (weights_only-safe) and resumes the position
    sched2 = build_scheduler(torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=base_lr), cfg)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == max_iters


def test_step_schedule_drops_by_gamma_at_each_step() -> None:
    # detectron2's WarmupMultiStepLR (the reference's COCO panoptic schedule): lr * gamma^(#steps <= it)
    base_lr, steps = 1e-2, (4, 7)
    cfg = SolverConfig(lr=base_lr, max_iters=10, lr_schedule="step", lr_steps=steps, lr_gamma=0.1,
                       warmup_iters=2, warmup_factor=0.5)
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=base_lr)
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [0.5, 0.75, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01]
    assert seen == pytest.approx([base_lr * w for w in want], rel=1e-12)


@pytest.mark.parametrize("steps", [(), (5, 3), (0,), (10,)])
def test_step_schedule_rejects_bad_steps(steps: tuple[int, ...]) -> None:
    from maskformer_cli.config import ConfigError, load_recipe

    with pytest.raises(ConfigError, match="lr_steps"):
        load_recipe(None, ["solver.max_iters=10", "solver.lr_schedule=step", f"solver.lr_steps={list(steps)}"])


def _make_grads(seed: int, scale: float) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.zeros(s)) for s in [(3, 4), (7,), (2, 2, 2), (5,)]]
    for p in params[:-1]:
        p.grad = torch.randn(p.shape, generator=g) * scale
    return params  # the last one has no gradient


@pytest.mark.parametrize("scale,max_norm", [(1.0, 0.01), (1e-4, 0.01), (3.0, 100.0)])
def test_full_model_clipping_equals_torch(scale: float, max_norm: float) -> None:
    ours, ref = _make_grads(1, scale), _make_grads(1, scale)
    total = clip_grad_norm_full_model(ours, max_norm)
    ref_total = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    assert total.item() == pytest.approx(ref_total.item(), rel=1e-6)
    for a, b in zip(ours, ref, strict=True):
        if b.grad is None:
            assert a.grad is None
        else:
            torch.testing.assert_close(a.grad, b.grad)
    # one norm over ALL parameters: the clipped joint norm is max_norm (when clipping happened)
    joint = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in ours if p.grad is not None))
    assert joint == pytest.approx(min(max_norm, ref_total.item()), rel=1e-4)


def test_clipping_disabled_and_nonfinite() -> None:
    params = _make_grads(2, 1.0)
    before = [p.grad.clone() for p in params if p.grad is not None]
    total = clip_grad_norm_full_model(params, 0.0)
    expected = math.sqrt(sum(float(g.pow(2).sum()) for g in before))
    assert total.item() == pytest.approx(expected, rel=1e-6)
    for g, p in zip(before, params, strict=False):
        assert torch.equal(g, p.grad)
    params[0].grad[0, 0] = float("nan")
    kept = params[1].grad.clone()
    total = clip_grad_norm_full_model(params, 0.01)
    assert not torch.isfinite(total)
    assert torch.equal(params[1].grad, kept)  # untouched, the caller skips the step
    assert clip_grad_norm_full_model([nn.Parameter(torch.zeros(2))], 1.0).item() == 0.0
