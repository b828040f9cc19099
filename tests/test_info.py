"""`maskformer info`: counts a recipe's model without its pretrained weights, FLOPs at the recipe's crop size."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from maskformer_cli.cli import _info_inputs, app

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"backbone": "timm:resnet18", "hidden_dim": 32, "conv_dim": 32, "mask_dim": 32, "dim_feedforward": 64,
              "nheads": 4, "num_queries": 8, "dec_layers": 2}


def _no_weights(*args, **kwargs):
    raise AssertionError("info loaded pretrained weights")


def test_info_never_loads_pretrained_weights(tmp_path, monkeypatch):
    import maskformer_cli.models.resnet as resnet

    monkeypatch.setattr(resnet, "imagenet_state_dict", _no_weights)  # the download path of 'imagenet'
    monkeypatch.setattr(resnet, "read_state_dict", _no_weights)  # the local-file path
    r = CliRunner().invoke(app, ["info", str(ROOT / "recipes/ade20k/maskformer_r50.yaml"), "--no-flops"])
    assert r.exit_code == 0, r.output
    assert "resnet50" in r.output and "total" in r.output
    # a weights file that does not exist would fail any attempt to read it
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {**TINY_MODEL, "pretrained": str(tmp_path / "missing.pth")}}))
    r = CliRunner().invoke(app, ["info", str(recipe), "--no-flops"])
    assert r.exit_code == 0, r.output


def test_flops_default_to_the_recipes_crop_size(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": TINY_MODEL, "data": {"crop_size": [64, 96]}}))
    r = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["info", str(recipe)])
    assert r.exit_code == 0, r.output
    assert "for one 64x96 image" in " ".join(r.output.split())
    r = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["info", str(recipe), "--size", "96x64"])
    assert "for one 96x64 image" in " ".join(r.output.split())


@pytest.mark.parametrize("name, size", [("ade20k/maskformer_swin_base.yaml", "640x640"),
                                        ("ade20k/maskformer_r50.yaml", "512x512"),
                                        ("cityscapes/maskformer_r101.yaml", "512x1024")])
def test_shipped_recipes_count_at_their_crop(name, size):
    recipe, overrides, got = _info_inputs(ROOT / "recipes" / name, ["model.num_queries=50"], None)
    assert got == size and overrides == ["model.num_queries=50", "model.pretrained=null"]
    # an override where the recipe would be is an override, and the crop follows it
    recipe, overrides, got = _info_inputs(Path("data.crop_size=[320,480]"), [], None)
    assert recipe is None and got == "320x480"


def test_a_size_too_small_for_the_model_is_a_user_error():
    from maskformer_cli.commands.info import run_info
    from maskformer_cli.errors import UserError

    overrides = ["model.backbone=timm:resnet18", "model.pretrained=null", "model.conv_dim=32", "model.mask_dim=32",
                 "model.hidden_dim=32", "model.nheads=4", "model.dim_feedforward=64", "model.dec_layers=1"]
    with pytest.raises(UserError, match="too small for this model"):
        run_info(None, overrides, num_classes=3, size="16x16")
    assert run_info(None, overrides, num_classes=3, size="64x64")["flops"] > 0


def test_fps_times_the_label_map_path_at_the_test_size(tmp_path, monkeypatch):
    """--fps runs the post-processor that predict uses (network + semantic inference), at data.test_short_side."""
    import maskformer_cli.postprocess as postprocess

    calls = []
    real = postprocess.PostProcessor.__call__

    def spy(self, net, images, image_sizes, output_sizes, want=("sem_seg",)):
        calls.append((tuple(images.shape[-2:]), self.precision))
        return real(self, net, images, image_sizes, output_sizes, want)

    monkeypatch.setattr(postprocess.PostProcessor, "__call__", spy)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": TINY_MODEL, "data": {"crop_size": [64, 96], "test_short_side": 64}}))
    r = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["info", str(recipe), "--fps", "--no-flops",
                                                       "--precision", "bf16"])
    assert r.exit_code == 0, r.output
    assert "images/s (64x64, batch 1, cpu, bf16" in " ".join(r.output.split())
    assert len(calls) >= 4 and set(calls) == {((64, 64), "bf16")}  # one warm-up, then at least 3 timed
    r = CliRunner().invoke(app, ["info", str(recipe), "--fps", "--no-flops", "--precision", "fp8"])
    assert r.exit_code == 1 and "choose one of fp32, bf16, fp16" in str(r.exception)
