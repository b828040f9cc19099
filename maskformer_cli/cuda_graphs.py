"""CUDA graphs for a network's training forward and backward (`solver.cuda_graphs`).

At the paper's batch per GPU (2 images of 512x512 with R50) a training step is bound by the host: on an H200
the GPU is busy ~19 ms of a ~100-140 ms step; the rest is Python and thousands of kernel launches (README,
"On a GPU"). Capturing the network's forward and its backward as two CUDA graphs (torch's
`make_graphed_callables`) turns those launches into two replays. The matcher and the losses stay eager:
their shapes change with every batch's ground truth.

`enable_cuda_graphs(model)` patches `model.forward` on the instance; state-dict keys, DDP wrapping and
checkpoints are unchanged. A call in training mode, with gradients enabled, on CUDA, whose images have a
shape / dtype / autocast setting seen before, replays that setting's graphs; a new setting is captured, up
to `max_shapes` (after that, new shapes run eagerly: each graph keeps its activations' memory). Evaluation
(eval mode or no_grad) and an explicit `deep_supervision` argument run eagerly.

What a graph needs, and how it is met here:
- static shapes: one graph per input shape; the semantic recipes' fixed-size crops make it one;
- no host synchronisation inside the forward (none of the models has one; the GPU tests capture each);
- autocast without its weight-cast cache (`cache_enabled=False` during capture; replays repeat the casts);
- capture runs the network a few times to warm up: BatchNorm running statistics and the CUDA RNG are put
  back afterwards, so the graphed run computes what the eager one does (tested step for step on a GPU);
- parameter gradients come back in the graph's static buffers, which its next replay overwrites: under
  gradient accumulation, engine.train_step calls `own_graph_gradients` after each micro-batch but the last.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_ATTR = "_maskformer_cuda_graphs"


class _Leaf:
    """Marks where a tensor sat in a flattened output."""


def flatten_output(out: Any, leaves: list[torch.Tensor]) -> Any:
    """The structure of a model output (tensors, None, lists, dataclasses of those), its tensors appended to
    `leaves` in order; `unflatten_output(spec, iter(leaves))` rebuilds it."""
    if isinstance(out, torch.Tensor):
        leaves.append(out)
        return _Leaf
    if out is None:
        return None
    if isinstance(out, list):
        return [flatten_output(v, leaves) for v in out]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return (type(out), {f.name: flatten_output(getattr(out, f.name), leaves) for f in dataclasses.fields(out)})
    raise TypeError(f"cannot graph a model output of type {type(out).__name__}")


def unflatten_output(spec: Any, leaves) -> Any:
    if spec is _Leaf:
        return next(leaves)
    if spec is None:
        return None
    if isinstance(spec, list):
        return [unflatten_output(s, leaves) for s in spec]
    cls, fields = spec
    return cls(**{name: unflatten_output(s, leaves) for name, s in fields.items()})


class _Flat(nn.Module):
    """images -> the tuple of the model output's tensors (what make_graphed_callables can graph); the
    output's structure is kept in `spec`."""

    def __init__(self, model: nn.Module, forward: Callable) -> None:
        super().__init__()
        self.net = model  # its parameters are the graph's inputs
        self.eager_forward = forward
        self.spec: Any = None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        leaves: list[torch.Tensor] = []
        self.spec = flatten_output(self.eager_forward(images), leaves)
        return tuple(leaves)


def _on_cuda(images: torch.Tensor) -> bool:  # a seam: the CPU tests drive the dispatch through it
    return images.is_cuda


def _autocast_key() -> tuple[bool, torch.dtype | None]:
    on = torch.is_autocast_enabled("cuda")
    return on, (torch.get_autocast_dtype("cuda") if on else None)


def _capture(model: nn.Module, eager_forward: Callable, images: torch.Tensor, warmup: int) -> _Flat:
    flat = _Flat(model, eager_forward)
    buffers = list(model.buffers())
    with torch.no_grad():
        saved = [b.clone() for b in buffers]
    rng = torch.cuda.get_rng_state(images.device)
    on, dtype = _autocast_key()
    # The warm-up passes run on this very batch; their BatchNorm updates and RNG draws are undone below.
    # thread_local: other threads' CUDA calls (the loader's pin-memory thread, gloo's workers under DDP) must
    # not invalidate this thread's capture. Only where make_graphed_callables takes the argument (torch 2.14
    # does; older releases did not): elsewhere its global default, which the GPU tests of 2026-12-04 ran.
    mode = ({"capture_error_mode": "thread_local"}
            if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters else {})
    with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=on, cache_enabled=False):
        torch.cuda.make_graphed_callables(flat, (images.detach().clone(),), num_warmup_iters=warmup,
                                          allow_unused_input=True, **mode)
    with torch.no_grad():
        for b, s in zip(buffers, saved, strict=True):
            b.copy_(s)
    torch.cuda.set_rng_state(rng, images.device)
    return flat


def enable_cuda_graphs(model: nn.Module, *, max_shapes: int = 2, warmup: int = 3) -> nn.Module:
    """Make `model`'s training forward and backward replay CUDA graphs (see the module docstring); returns
    `model`. model.forward(images, deep_supervision=None) keeps its contract: images [B, 3, H, W] -> the
    model's output dataclass. Idempotent."""
    if is_graphed(model):
        return model
    eager_forward = model.forward
    graphs: dict[tuple, _Flat] = {}
    warned: list[bool] = []  # the fallback is said once

    def forward(images: torch.Tensor, deep_supervision: bool | None = None):
        if not (model.training and torch.is_grad_enabled() and _on_cuda(images) and deep_supervision is None
                and not images.requires_grad):
            return eager_forward(images, deep_supervision)
        key = (tuple(images.shape), images.dtype, images.device, _autocast_key())
        flat = graphs.get(key)
        if flat is None:
            if len(graphs) >= max_shapes:
                if not warned:
                    warned.append(True)
                    warnings.warn(f"solver.cuda_graphs: graphs exist for {max_shapes} input shapes already; "
                                  f"{tuple(images.shape)} and any further new shape run eagerly (graphs pay "
                                  "off when training batches have a fixed size)", stacklevel=2)
                return eager_forward(images)
            flat = graphs[key] = _capture(model, eager_forward, images, warmup)
        return unflatten_output(flat.spec, iter(flat(images)))

    model.forward = forward
    setattr(model, _ATTR, graphs)
    if hasattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch"):
        # The captured autograd graph keeps the parameters' gradient accumulators it made on the capture's
        # side stream; every replayed backward then warns that their stream differs from the producer's.
        # The engine synchronises the two streams itself: correct, and one warning per step is noise.
        torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(False)
    return model


def own_graph_gradients(model: nn.Module, params: list[torch.Tensor]) -> None:
    """Before another backward accumulates into them: if `model` is graphed, give `params` gradients of their
    own. A replayed backward hands gradients back in the graph's static buffers (autograd keeps them as .grad
    without a copy), which its next replay overwrites; a no-op for a model that is not graphed."""
    if is_graphed(model):
        for p in params:
            if p.grad is not None:
                p.grad = p.grad.clone()


def is_graphed(model: nn.Module) -> bool:
    """Whether enable_cuda_graphs patched `model` (its backward then hands gradients back in static buffers)."""
    return getattr(model, _ATTR, None) is not None


def captured_shapes(model: nn.Module) -> list[tuple]:
    """The (shape, dtype, device, autocast) settings that have graphs, in capture order."""
    return list(getattr(model, _ATTR, {}))
