"""Config loading is strict: unknown keys and wrong types give one clear error naming the key."""

import pytest

from maskformer_cli.config import ConfigError, Recipe, dump_recipe, load_recipe, recipe_from_dict, to_dict


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_defaults_are_the_papers():
    r = load_recipe()
    assert r.model.num_queries == 100 and r.model.dec_layers == 6 and r.model.nheads == 8
    assert r.loss.focal_weight == 20.0 and r.loss.dice_weight == 1.0 and r.loss.no_object_weight == 0.1
    assert r.solver.lr == 1e-4 and r.solver.backbone_multiplier == 0.1 and r.solver.poly_power == 0.9


def test_recipe_and_overrides(tmp_path):
    p = write(tmp_path, "model:\n  num_queries: 50\nsolver:\n  lr: 6e-5\ndata:\n  crop_size: [640, 640]\n")
    r = load_recipe(p, ["solver.lr=2e-4", "model.backbone=swin_tiny"])
    assert r.model.num_queries == 50 and r.solver.lr == 2e-4 and r.model.backbone == "swin_tiny"
    assert r.data.crop_size == (640, 640)


def test_unknown_key_suggests_closest(tmp_path):
    p = write(tmp_path, "model:\n  num_querys: 50\n")
    with pytest.raises(ConfigError, match=r"unknown key 'model.num_querys'.*did you mean 'model.num_queries'"):
        load_recipe(p)
    with pytest.raises(ConfigError, match="unknown key 'solvr'.*did you mean 'solver'"):
        load_recipe(None, ["solvr.lr=1"])


@pytest.mark.parametrize(
    "override, match",
    [
        ("model.num_queries=abc", "model.num_queries: expected an integer"),
        ("model.num_queries=1.5", "model.num_queries: expected an integer"),
        ("model.pre_norm=3", "model.pre_norm: expected true or false"),
        ("loss.matcher=greedy", "loss.matcher: 'greedy' is not one of"),
        ("data.crop_size=[1,2,3]", "data.crop_size: expected list of 2 int"),
        ("model.num_queries=0", "model.num_queries: must be > 0"),
        ("model", "expected key=value"),
    ],
)
def test_wrong_types_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe(None, [override])


def test_round_trip():
    r = load_recipe(None, ["model.num_queries=20", "inference.tta_scales=[1.0, 1.5]"])
    again = recipe_from_dict(to_dict(r))
    assert again == r and isinstance(again, Recipe)
    assert "num_queries: 20" in dump_recipe(r)


def test_bad_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize("override, match", [
    ("inference.tta_scales=[]", "tta_scales"), ("inference.tta_scales=[1.0, 0]", "tta_scales"),
    ("data.test_short_side=-5", "test_short_side"), ("data.test_max_long_side=0", "test_max_long_side"),
])
def test_test_time_sizes_are_validated(override, match):
    """Bad test sizes and TTA scales are one clear error, not a resize traceback deep in inference."""
    from maskformer_cli.config import ConfigError, load_recipe, override_recipe

    with pytest.raises(ConfigError, match=match):
        load_recipe(None, [override])
    with pytest.raises(ConfigError, match=match):  # evaluate / predict overrides go through the same checks
        override_recipe(load_recipe(None), [override])
    load_recipe(None, ["data.test_short_side=0", "inference.tta_scales=[1.0]"])  # 0: the image's own size


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.meta_architecture=per_pixel_baseline", "model.box_head=true"], "model.box_head: per_pixel_baseline"),
    (["model.meta_architecture=per_pixel_baseline_plus", "loss.matcher=fixed"], "loss.matcher=fixed"),
    (["model.meta_architecture=per_pixel_baseline", "loss.num_points=100"], "loss.num_points"),
    (["loss.per_pixel_loss=focal_dice"], "loss.per_pixel_loss"),
    (["model.encoder_layers=3"], "model.encoder_layers: the fpn pixel decoder"),
    (["model.drop_path_rate=0.1"], "model.drop_path_rate: a Swin backbone option"),
    (["model.backbone=swin_tiny", "model.freeze_at=1"], "model.freeze_at: an option of the ResNet"),
    (["model.backbone=timm:resnet18", "model.backbone_norm=gn"], "model.backbone_norm: an option of the ResNet"),
    (["model.meta_architecture=per_pixel_baseline", "loss.class_weight=2"], "loss.class_weight: per_pixel_baseline"),
    (["model.meta_architecture=per_pixel_baseline_plus", "loss.dice_weight=2"], "loss.dice_weight"),
    (["loss.box_l1_weight=1"], "loss.box_l1_weight"),
    (["loss.oversample_ratio=2"], "loss.oversample_ratio"),
])
def test_options_the_model_cannot_honour_are_load_errors(overrides, message):
    """Before, each of these was silently ignored by the model or the loss that was built."""
    with pytest.raises(ConfigError, match=message):
        load_recipe(None, overrides)
    # the same options where they mean something still load
    assert load_recipe(None, ["model.meta_architecture=per_pixel_baseline_plus", "loss.per_pixel_loss=focal_dice"])
    assert load_recipe(None, ["model.box_head=true", "loss.matcher=box", "loss.num_points=100"])
    assert load_recipe(None, ["model.backbone=swin_tiny", "model.drop_path_rate=0.1", "model.swin_window_size=12"])
    assert load_recipe(None, ["model.pixel_decoder=transformer_encoder_fpn", "model.encoder_layers=3",
                              "loss.box_l1_weight=1", "loss.matcher=box", "model.box_head=true"])
    assert load_recipe(None, ["model.backbone=timm:resnet18", "model.backbone_norm=bn"])  # what timm does anyway



def test_per_pixel_baseline_transformer_keys_are_announced_not_refused(tmp_path, capsys):
    """Switching a MaskFormer recipe to the baseline by one override carries its transformer keys along: they
    load, and are named (train prints them) since the baseline has no transformer module."""
    from maskformer_cli.config import inert_options, recipe_from_dict, to_dict

    r = load_recipe(None, ["model.meta_architecture=per_pixel_baseline", "model.deep_supervision=false",
                           "model.dec_layers=3"])
    assert inert_options(r) == ["model.dec_layers=3", "model.deep_supervision=False"]
    assert inert_options(load_recipe(None, ["model.dec_layers=3"])) == []  # MaskFormer uses them
    assert inert_options(load_recipe(None, ["model.meta_architecture=per_pixel_baseline"])) == []
    # a recipe saved with a checkpoint loads even when it holds an option the newer checks refuse
    saved = to_dict(load_recipe(None))
    saved["model"]["encoder_layers"] = 2
    assert recipe_from_dict(saved).model.encoder_layers == 2
    with pytest.raises(ConfigError, match="encoder_layers"):
        load_recipe(None, ["model.encoder_layers=2"])


def test_per_pixel_baseline_plus_has_one_query_per_class():
    from maskformer_cli.errors import UserError
    from maskformer_cli.models import build_model

    cfg = load_recipe(None, ["model.meta_architecture=per_pixel_baseline_plus", "model.backbone=timm:test_resnet",
                             "model.num_queries=4"]).model
    with pytest.raises(UserError, match="one query per class; set it to 5"):
        build_model(cfg, 5)
    assert build_model(cfg, 4) is not None
