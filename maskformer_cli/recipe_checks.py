"""The checks a recipe must pass beyond its types: value ranges per section, and options that the chosen
model, data or loss cannot honour together (an error at load time, not a silently ignored key or a failure
when training starts)."""

from __future__ import annotations

import math
from typing import Any

from maskformer_cli.data.catalog import get_dataset_info
from maskformer_cli.recipe_schema import (
    ConfigError,
    DataConfig,
    InferenceConfig,
    LossConfig,
    ModelConfig,
    Recipe,
    SolverConfig,
)


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
