"""`maskformer evaluate` edge cases from a user trial: --tta on a panoptic checkpoint (PQ single-scale beside
test-time-augmented semantic metrics), `all` over a `predict --task panoptic` directory (PQ and mIoU together),
option validation, and the notice when the synthetic set on disk is regenerated with the recipe's parameters."""

from __future__ import annotations

import csv
import json

import pytest
import tiny_recipe
from test_evaluate_predict import TINY, invoke

from maskformer_cli.config import load_recipe
from maskformer_cli.errors import UserError
from maskformer_cli.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    recipe = load_recipe(None, [*TINY, f"data.root={root}"])
    res = train(recipe, run_dir=tmp_path_factory.mktemp("runs") / "tiny", quiet=True)
    # the comparisons below must compare real numbers, not zeros
    assert res.metrics["PQ"] > 1 and res.metrics["mIoU"] > 1, res.metrics
    return {"root": root, "ckpt": res.run_dir / "checkpoints" / "last.pt",
            "val_images": root / "synthetic_k12" / "images" / "validation"}


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


def test_tta_on_a_panoptic_checkpoint_keeps_pq_single_scale(trained, tmp_path):
    plain, tta = tmp_path / "plain", tmp_path / "tta"
    invoke(["evaluate", trained["ckpt"], "--limit", "2", "--out", plain], trained["root"])
    result = invoke(["evaluate", trained["ckpt"], "--tta", "--limit", "2", "--out", tta], trained["root"])
    assert "PQ is single-scale" in result.output
    p, t = _metrics(plain), _metrics(tta)
    assert t["tta"] is True and t["num_images"] == 2
    assert t["metrics"] == ["miou", "pq-stuff", "pq"] and t["tta_metrics"] == ["miou", "pq-stuff"]
    # PQ is the single-scale number; the semantic map (mIoU, PQ-stuff) is the augmented one
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert t[key] == pytest.approx(p[key], abs=1e-9), key
    assert p["PQ"] > 0
    assert t["mIoU"] != pytest.approx(p["mIoU"], abs=1e-6)
    assert 0 <= t["PQ_stuff"] <= 100


def test_tta_with_metric_pq_is_a_clear_error(trained, tmp_path):
    with pytest.raises(UserError, match="test-time augmentation is for semantic metrics; PQ is single-scale"):
        invoke(["evaluate", trained["ckpt"], "--tta", "--metric", "pq", "--out", tmp_path / "e"], trained["root"])


def test_post_processor_refuses_pq_from_per_pixel_scores_with_a_true_message():
    import torch

    from maskformer_cli.postprocess import PostProcessor
    from maskformer_cli.structures import PerPixelOutput

    pp = PostProcessor(num_classes=3, ignore_label=255, thing_ids=(2,), mode="semantic", object_mask_threshold=0.8,
                       overlap_threshold=0.8, panoptic_postprocessing="maskformer", detr_threshold=0.85,
                       general_threshold=0.3, iterative_ratio=0.3, tta=False, tta_scales=(1.0,), tta_flip=False)
    outputs = PerPixelOutput(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="need a mask-classification model"):
        pp.postprocess(outputs, [(16, 16)], (16, 16), [(16, 16)], want=("panoptic",))
    (res,) = pp.postprocess(outputs, [(16, 16)], (16, 16), [(16, 16)], want=("sem_seg",))
    assert res["sem_seg"].shape == (16, 16)


def test_all_on_saved_panoptic_predictions_gives_pq_and_semantic_metrics(trained, tmp_path):
    pred = tmp_path / "pred"
    invoke(["predict", trained["val_images"], "--weights", trained["ckpt"], "--task", "panoptic", "--out", pred],
           trained["root"])
    assert any((pred / "labels").glob("*.png")) and (pred / "panoptic.json").exists()
    runs = {}
    for metric in ("all", "pq", "miou", "pq-stuff"):
        out = tmp_path / metric
        invoke(["evaluate", "--predictions", pred, "--dataset", "synthetic", "--metric", metric, "--out", out],
               trained["root"])
        runs[metric] = out
    m = _metrics(runs["all"])
    for key in ("PQ", "PQ_th", "PQ_st"):
        assert m[key] == pytest.approx(_metrics(runs["pq"])[key], abs=1e-9), key
    assert m["mIoU"] == pytest.approx(_metrics(runs["miou"])["mIoU"], abs=1e-9)
    assert m["PQ_stuff"] == pytest.approx(_metrics(runs["pq-stuff"])["PQ_stuff"], abs=1e-9)
    assert m["num_images"] == 4 and "num_images_semantic" not in m
    # one row per class, semantic and panoptic columns side by side, the class's name kept
    rows = list(csv.DictReader((runs["all"] / "per_class.csv").open()))
    assert len(rows) == 12
    assert {"IoU", "Acc", "PQ_stuff", "PQ", "SQ", "RQ", "isthing"} <= set(rows[0])
    assert rows[5]["name"] == "bar_5"
    pq_rows = {r["id"]: r for r in csv.DictReader((runs["pq"] / "per_class.csv").open())}
    for r in rows:
        assert r["PQ"] == pq_rows[r["id"]]["PQ"]


@pytest.mark.parametrize(("args", "message"), [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--limit", "-1"], "--limit must be >= 1"),
])
def test_bad_batch_size_and_limit_are_clear_errors(trained, tmp_path, args, message):
    with pytest.raises(UserError, match=message):
        invoke(["evaluate", trained["ckpt"], *args, "--out", tmp_path / "e"], trained["root"])
    with pytest.raises(UserError, match=message):
        invoke(["evaluate", "--predictions", tmp_path, "--dataset", "synthetic", *args], trained["root"])
    assert not (tmp_path / "e").exists()


def test_regenerating_a_synthetic_set_with_other_parameters_says_so(tmp_path):
    from maskformer_cli.data.build import dataset_info, ensure_prepared
    from maskformer_cli.data.staging import stamp_entry
    from maskformer_cli.reporting import console

    small = tiny_recipe.tiny(tmp_path, "data.synthetic_num_images=6", "data.synthetic_size=32").data
    with console.capture() as first:
        path = ensure_prepared(dataset_info(small), small)
    assert "regenerating" not in first.get()  # a first generation is not news
    wanted = tiny_recipe.tiny(tmp_path, "data.synthetic_num_images=8", "data.synthetic_size=32").data
    with console.capture() as second:
        assert ensure_prepared(dataset_info(wanted), wanted) == path
    lines = [line for line in second.get().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "regenerating" in lines[0] and str(path) in lines[0] and "num_images 6 -> 8" in lines[0]
    differences = lines[0].split("(on disk")[1]
    assert "size" not in differences and "seed" not in differences  # only what differs
    assert stamp_entry(path, "synthetic")["params"]["num_images"] == 8  # still regenerated
    with console.capture() as third:
        ensure_prepared(dataset_info(wanted), wanted)
    assert third.get() == ""
