"""Recipe overrides for a model and dataset small enough to train in seconds on a CPU (shared by tests)."""

import json
from pathlib import Path

from maskformer_cli.config import Recipe, load_recipe

TINY = [
    "model.backbone=timm:resnet18", "model.hidden_dim=32", "model.conv_dim=32", "model.mask_dim=32",
    "model.dim_feedforward=64", "model.nheads=4", "model.num_queries=8", "model.dec_layers=2",
    "model.dropout=0.0", "data.dataset=synthetic", "data.synthetic_num_classes=6",
    "data.synthetic_num_images=20", "data.synthetic_size=64", "data.crop_size=[64,64]",
    "data.test_short_side=64", "data.num_workers=0", "solver.batch_size=2", "solver.lr=3e-4",
    "solver.backbone_multiplier=1.0", "solver.log_every=1", "solver.eval_every=1000",
    "solver.checkpoint_every=1000",
]


def tiny(data_root, *extra: str) -> Recipe:
    """The tiny recipe on the synthetic dataset under `data_root` (generated on first use), plus overrides."""
    return load_recipe(None, [*TINY, f"data.root={data_root}", *extra])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
