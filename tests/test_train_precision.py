"""Training under bf16 autocast on the CPU (solver.precision=bf16): the quickstart's precision."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_recipe import tiny

from maskformer_cli.criterion import build_criterion
from maskformer_cli.data.build import build_train_dataset, build_train_loader, dataset_info
from maskformer_cli.engine import train_step
from maskformer_cli.models import build_model
from maskformer_cli.optim import build_optimizer, clip_grad_norm_full_model


def _setup(data_root, precision: str, seed: int = 5):
    recipe = tiny(data_root, f"solver.precision={precision}", "solver.clip_grad=0.0")
    info = dataset_info(recipe.data)
    torch.manual_seed(seed)
    model = build_model(recipe.model, info.num_classes).train()
    criterion = build_criterion(recipe.loss, info.num_classes,
                                mask_classification=recipe.model.meta_architecture == "maskformer")
    optimizer = build_optimizer(model, recipe.solver)
    loader = build_train_loader(recipe.data, info, batch_size=2, seed=0, rank=0, world_size=1,
                                dataset=build_train_dataset(recipe.data, info))
    return model, criterion, optimizer, next(iter(loader))


def _steps(model, criterion, optimizer, batch, precision: str, n: int) -> list:
    return [train_step(model, criterion, optimizer, [batch], device=torch.device("cpu"), precision=precision,
                       clip_grad=0.0, clip_fn=clip_grad_norm_full_model) for _ in range(n)]


def test_bf16_steps_fit_a_batch_with_finite_gradients(data_root):
    """Repeated bf16 steps on one batch drive its loss down (as fp32 steps do) and every gradient stays
    finite; the weights and the optimiser state stay float32 (autocast casts per op, not the model)."""
    model, criterion, optimizer, batch = _setup(data_root, "bf16")
    res = _steps(model, criterion, optimizer, batch, "bf16", 8)
    assert not any(r.skipped for r in res) and all(math.isfinite(r.grad_norm) for r in res)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert res[-1].total < 0.8 * res[0].total, [r.total for r in res]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(v.dtype == torch.float32 for s in optimizer.state.values() for v in s.values() if v.numel() > 1)


def test_bf16_starts_where_fp32_starts(data_root):
    """Same weights, same batch: bf16 autocast changes the first loss by rounding only (bf16 has 8 bits of
    mantissa, so ~1% per op), and fp32 is bit-for-bit what it was without the precision argument."""
    first = {}
    for precision in ("fp32", "bf16"):
        model, criterion, optimizer, batch = _setup(data_root, precision)
        first[precision] = _steps(model, criterion, optimizer, batch, precision, 1)[0].total
    model, criterion, optimizer, batch = _setup(data_root, "fp32")
    plain = train_step(model, criterion, optimizer, [batch], device=torch.device("cpu"), clip_grad=0.0).total
    assert plain == first["fp32"]
    assert first["bf16"] == pytest.approx(first["fp32"], rel=5e-2)
    assert first["bf16"] != first["fp32"]  # autocast did run in bf16


def test_auto_precision_is_bf16_only_where_the_device_has_bf16_kernels(monkeypatch):
    from maskformer_cli import precision as p

    cpu = torch.device("cpu")
    assert p.resolve_precision("fp16", cpu) == "fp16" and p.resolve_precision("fp32", cpu) == "fp32"
    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native)
        assert p.resolve_precision("auto", cpu) == want
    assert p.resolve_precision("auto", torch.device("meta")) == "fp32"


def test_auto_precision_trains_in_the_resolved_precision(tmp_path, data_root, monkeypatch):
    """solver.precision=auto reaches train_step as the resolved value, never as 'auto'."""
    import maskformer_cli.trainer as train_mod

    seen = []
    real = train_mod.train_step
    monkeypatch.setattr(train_mod, "train_step", lambda *a, **kw: seen.append(kw["precision"]) or real(*a, **kw))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    train_mod.train(tiny(data_root, "solver.max_iters=1", "solver.precision=auto"), run_dir=tmp_path / "r",
                    quiet=True)
    assert seen == ["bf16"]
