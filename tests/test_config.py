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
])
def test_options_the_model_cannot_honour_are_load_errors(overrides, message):
    """Before, each of these was silently ignored by the model or the loss that was built."""
    with pytest.raises(ConfigError, match=message):
        load_recipe(None, overrides)
    # the same options where they mean something still load
    assert load_recipe(None, ["model.meta_architecture=per_pixel_baseline_plus", "loss.per_pixel_loss=focal_dice"])
    assert load_recipe(None, ["model.box_head=true", "loss.matcher=box", "loss.num_points=100"])
