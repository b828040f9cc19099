"""`maskformer evaluate` and `maskformer predict` end to end on the embedded dataset with a small trained
checkpoint: the files they write, and three independent paths to the same numbers (the training run's
own evaluation, `evaluate CKPT`, and `predict` followed by `evaluate --predictions`); --tta on a panoptic
checkpoint (PQ single-scale beside test-time-augmented semantic metrics), `all` over a `predict --task
panoptic` directory (PQ and mIoU together), and option validation."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import tiny_recipe
from PIL import Image
from typer.testing import CliRunner

from maskformer_cli.cli import app
from maskformer_cli.config import load_recipe
from maskformer_cli.errors import UserError
from maskformer_cli.trainer import train

runner = CliRunner()

TINY = [
    *tiny_recipe.TINY, "data.synthetic_num_classes=12", "data.task=panoptic", "solver.lr=1e-3",
    "solver.max_iters=80", "solver.eval_every=80",
    # a short-trained model is unsure of everything: keep all its segments so PQ has something to count
    "inference.object_mask_threshold=0.0",
    # 80 steps learn something for some seeds and nothing for others (seeds 1, 2 give PQ 0 either way);
    # this run, recorded with uniform scale sampling, is one that gives real numbers to compare
    "data.scale_sampling=uniform",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    recipe = load_recipe(None, [*TINY, f"data.root={root}"])
    res = train(recipe, run_dir=tmp_path_factory.mktemp("runs") / "tiny", quiet=True)
    # the equalities below must compare real numbers, not zeros (80 steps give PQ ~ 10, mIoU ~ 10)
    assert res.metrics["PQ"] > 1 and res.metrics["PQ_st"] > 1 and res.metrics["mIoU"] > 1, res.metrics
    return {"root": root, "ckpt": res.run_dir / "checkpoints" / "last.pt", "metrics": res.metrics,
            "val_images": root / "synthetic_k12" / "images" / "validation"}


def invoke(args: list[str], root: Path):
    # MASKFORMER_DATASETS tells --dataset synthetic where the ground truth lives
    result = runner.invoke(app, [str(a) for a in args], env={**os.environ, "MASKFORMER_DATASETS": str(root)})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


def test_evaluate_writes_metrics_equal_to_the_training_runs_evaluation(trained, tmp_path):
    out = tmp_path / "eval"
    invoke(["evaluate", trained["ckpt"], "--out", out, "--per-class"], trained["root"])
    m = json.loads((out / "metrics.json").read_text())
    for key in ("mIoU", "pAcc", "PQ", "PQ_th", "PQ_st", "SQ_st", "RQ_st"):
        assert m[key] == pytest.approx(trained["metrics"][key], abs=1e-9), key
    # 'all' on a panoptic dataset: PQ-stuff of the semantic map sits beside panoptic PQ without clobbering it
    assert 0 <= m["PQ_stuff"] <= 100 and m["PQ_stuff"] != m["PQ_st"]
    assert m["num_images"] == 4 and len(m["checkpoint_sha256"]) == 64
    assert m["params_M"] > 0 and m["gflops"] > 0 and m["images_per_s"] > 0
    rows = list(csv.DictReader((out / "per_class.csv").open()))
    assert len(rows) == 12 and "IoU" in rows[0]


@pytest.mark.parametrize("args", [["--inference", "general"], ["--inference", "iterative"], ["--tta"],
                                  ["--metric", "pq-stuff", "--batch-size", "3"]])
def test_evaluate_options(trained, tmp_path, args):
    out = tmp_path / "eval"
    invoke(["evaluate", trained["ckpt"], "--out", out, "--metric", "miou", *args]
           if "--metric" not in args else ["evaluate", trained["ckpt"], "--out", out, *args], trained["root"])
    m = json.loads((out / "metrics.json").read_text())
    value = m["PQ_stuff"] if "pq-stuff" in args else m["mIoU"]
    assert 0.0 <= value <= 100.0
    if "--batch-size" in args:  # batching does not change the numbers, and PQ-stuff keeps its own name
        assert "PQ_st" not in m and "PQ" not in m
        plain = tmp_path / "plain"
        invoke(["evaluate", trained["ckpt"], "--out", plain, "--metric", "pq-stuff"], trained["root"])
        assert m["PQ_stuff"] == pytest.approx(json.loads((plain / "metrics.json").read_text())["PQ_stuff"],
                                              abs=1e-9)


def test_predict_semantic_then_evaluate_saved_predictions(trained, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for f in sorted(trained["val_images"].iterdir()):
        (images / f.name).write_bytes(f.read_bytes())
    (images / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "pred"
    invoke(["predict", images, "--weights", trained["ckpt"], "--out", out, "--rle"], trained["root"])
    stems = sorted(f.stem for f in trained["val_images"].iterdir())
    assert sorted(f.stem for f in (out / "labels").glob("*.png")) == stems
    assert sorted(f.stem for f in (out / "overlays").glob("*.png")) == stems
    manifest = json.loads((out / "manifest.json").read_text())
    assert [Path(s["file"]).name for s in manifest["skipped"]] == ["broken.jpg"]
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in manifest["images"])
    rle = json.loads((out / "semantic_rle.json").read_text())
    assert {r["file_name"] for r in rle} == {f.name for f in trained["val_images"].iterdir()}
    label = np.array(Image.open(out / "labels" / f"{stems[0]}.png"))
    assert label.dtype == np.uint8 and label.max() < 12
    # the saved label maps give exactly the checkpoint's mIoU
    ev = tmp_path / "ev"
    invoke(["evaluate", "--predictions", out, "--dataset", "synthetic", "--metric", "miou", "--out", ev],
           trained["root"])
    assert json.loads((ev / "metrics.json").read_text())["mIoU"] == pytest.approx(trained["metrics"]["mIoU"],
                                                                                 abs=1e-9)


def test_predict_panoptic_then_pq_from_saved_predictions(trained, tmp_path):
    out = tmp_path / "pred"
    invoke(["predict", trained["val_images"], "--weights", trained["ckpt"], "--task", "panoptic",
            "--out", out, "--rle"], trained["root"])
    pan = json.loads((out / "panoptic.json").read_text())
    assert len(pan["annotations"]) == 4 and len(pan["categories"]) == 12
    for ann in pan["annotations"]:
        ids = np.array(Image.open(out / "panoptic" / ann["file_name"]), np.int64)
        ids = ids[..., 0] + 256 * ids[..., 1] + 65536 * ids[..., 2]
        assert set(np.unique(ids)) - {0} == {s["id"] for s in ann["segments_info"]}
        assert all(1 <= s["category_id"] <= 12 for s in ann["segments_info"])  # dataset ids, not contiguous
    assert isinstance(json.loads((out / "instances.json").read_text()), list)
    ev = tmp_path / "ev"
    invoke(["evaluate", "--predictions", out, "--dataset", "synthetic", "--metric", "pq", "--out", ev],
           trained["root"])
    m = json.loads((ev / "metrics.json").read_text())
    for key in ("PQ", "PQ_th", "PQ_st"):
        assert m[key] == pytest.approx(trained["metrics"][key], abs=1e-9), key
    # as panopticapi: predictions are matched by image_id, each PNG named by the prediction's file_name
    # (here renamed and listed in reverse order, as another tool might write them)
    gt = json.loads((trained["root"] / "synthetic_k12" / "panoptic_val.json").read_text())
    gt_id = {Path(a["file_name"]).stem: a["image_id"] for a in gt["annotations"]}
    for ann in pan["annotations"]:
        new = f"pred_{ann['file_name']}"
        (out / "panoptic" / ann["file_name"]).rename(out / "panoptic" / new)
        ann["image_id"], ann["file_name"] = gt_id[Path(ann["file_name"]).stem], new
    pan["annotations"].reverse()
    (out / "panoptic.json").write_text(json.dumps(pan))
    invoke(["evaluate", "--predictions", out, "--dataset", "synthetic", "--metric", "pq", "--out", ev],
           trained["root"])
    again = json.loads((ev / "metrics.json").read_text())
    assert {k: again[k] for k in ("PQ", "SQ", "RQ")} == {k: m[k] for k in ("PQ", "SQ", "RQ")}


def test_query_stats_plot(trained, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "eval"
    invoke(["evaluate", trained["ckpt"], "--out", out, "--metric", "miou", "--query-stats"], trained["root"])
    report = json.loads((out / "query_categories.json").read_text())
    assert len(report["unique_per_query_sorted"]) == 8
    assert (out / "query_categories.png").stat().st_size > 1000


def test_label_pngs_are_uint16_beyond_255_classes(tmp_path):
    from maskformer_cli.commands.predict import _save_label_png

    labels = np.array([[0, 299], [256, 65535]], np.int64)
    _save_label_png(labels, 300, tmp_path / "a.png")
    back = np.array(Image.open(tmp_path / "a.png"))
    np.testing.assert_array_equal(back, labels)
    _save_label_png(labels % 200, 200, tmp_path / "b.png")
    assert np.array(Image.open(tmp_path / "b.png")).dtype == np.uint8


def test_bad_inputs_are_clear_errors(trained, tmp_path):
    from maskformer_cli.errors import UserError

    with pytest.raises(UserError, match="no such file"):
        invoke(["predict", tmp_path / "nothing_here", "--weights", trained["ckpt"]], trained["root"])
    with pytest.raises(UserError, match="--task"):
        invoke(["predict", trained["val_images"], "--weights", trained["ckpt"], "--task", "depth"],
               trained["root"])
    with pytest.raises(UserError, match="--predictions needs --dataset"):
        invoke(["evaluate", "--predictions", tmp_path], trained["root"])
    with pytest.raises(UserError, match="not both"):
        invoke(["evaluate", trained["ckpt"], "--predictions", tmp_path, "--dataset", "synthetic"], trained["root"])


def test_evaluate_overrides_inference_settings_but_not_the_model(trained, tmp_path):
    from maskformer_cli.errors import UserError

    out = tmp_path / "eval"
    invoke(["evaluate", trained["ckpt"], "inference.object_mask_threshold=1.0", "--out", out], trained["root"])
    m = json.loads((out / "metrics.json").read_text())
    # no class probability exceeds 1.0: every panoptic segment is dropped; the semantic map does not use it
    assert m["PQ"] == 0.0 and m["recipe"]["inference"]["object_mask_threshold"] == 1.0
    assert m["mIoU"] == pytest.approx(trained["metrics"]["mIoU"], abs=1e-9)
    with pytest.raises(UserError, match="only inference"):
        invoke(["evaluate", trained["ckpt"], "model.num_queries=5"], trained["root"])
    with pytest.raises(UserError, match="did you mean 'inference.object_mask_threshold'"):
        invoke(["evaluate", trained["ckpt"], "inference.object_mask_treshold=0.5"], trained["root"])
    # predict takes the same inference overrides through --set
    pred = tmp_path / "pred"
    invoke(["predict", trained["val_images"], "--weights", trained["ckpt"], "--task", "panoptic", "--out", pred,
            "--set", "inference.object_mask_threshold=1.0"], trained["root"])
    anns = json.loads((pred / "panoptic.json").read_text())["annotations"]
    assert len(anns) == 4 and all(a["segments_info"] == [] for a in anns)
    with pytest.raises(UserError, match="only inference"):
        invoke(["predict", trained["val_images"], "--weights", trained["ckpt"], "--set", "model.num_queries=5",
                "--out", tmp_path / "refused"], trained["root"])


@pytest.mark.distributed
def test_evaluate_under_torchrun_equals_one_process(trained, tmp_path):
    """2 gloo ranks shard the 4 validation images without overlap; the merged metrics are the single-process
    ones exactly (a padded duplicate image or a lost shard would move them)."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    env = {**os.environ, "MASKFORMER_DATASETS": str(trained["root"]), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--log-dir", str(tmp_path / "torchrun"),
                        "--nproc-per-node", "2", "--standalone", "-m", "maskformer_cli", "evaluate",
                        str(trained["ckpt"]), "--out", str(out), "--device", "cpu"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_images"] == 4
    for key in ("mIoU", "pAcc", "PQ", "PQ_th", "PQ_st", "PQ_stuff"):
        assert m[key] == pytest.approx(trained["metrics"].get(key, m[key]), abs=1e-9), key
    single = tmp_path / "single"
    invoke(["evaluate", trained["ckpt"], "--out", single], trained["root"])
    s = json.loads((single / "metrics.json").read_text())
    for key in ("mIoU", "fwIoU", "mAcc", "pAcc", "PQ", "SQ", "RQ", "PQ_stuff"):
        assert m[key] == pytest.approx(s[key], abs=1e-9), key


def test_out_of_memory_in_post_processing_falls_back_to_the_cpu(trained, tmp_path, monkeypatch):
    import torch

    import maskformer_cli.postprocess as postprocess

    real, calls = postprocess.PostProcessor.panoptic, []

    def flaky(*args, **kwargs):  # the accelerator runs out of memory on the second image only
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(postprocess.PostProcessor, "panoptic", flaky)
    monkeypatch.setattr(postprocess._with_cpu_fallback, "warned", False)
    out = tmp_path / "eval"
    with pytest.warns(RuntimeWarning, match="continuing on the CPU"):
        invoke(["evaluate", trained["ckpt"], "--out", out, "--metric", "all"], trained["root"])
    m = json.loads((out / "metrics.json").read_text())
    assert len(calls) == 5 and m["num_images"] == 4  # 4 images, one redone; nothing counted twice
    for key in ("mIoU", "PQ", "PQ_st"):
        assert m[key] == pytest.approx(trained["metrics"][key], abs=1e-9), key


@pytest.mark.parametrize("predict_set, evaluate_args", [
    # resized inputs: predict must resize exactly as the evaluation loader does (uint8 after resizing)
    (["data.test_short_side=80"], ["data.test_short_side=80"]),
    # (a short-trained model is unsure: a low threshold keeps general inference from leaving all unlabelled)
    (["inference.mode=general", "inference.general_threshold=0.05", "data.test_short_side=80"],
     ["--inference", "general", "inference.general_threshold=0.05", "data.test_short_side=80"]),
    (["inference.mode=iterative"], ["--inference", "iterative"]),
    (["inference.tta=true"], ["--tta"]),
    (["inference.tta=true"], ["inference.tta=true"]),  # the override works as the flag does
])
def test_saved_predictions_equal_checkpoint_evaluation(trained, tmp_path, predict_set, evaluate_args):
    """`predict` (with inference/data settings) + `evaluate --predictions` == `evaluate CKPT` with the same
    settings: one code path for resizing, inference mode and test-time augmentation."""
    out = tmp_path / "pred"
    sets = [a for s in predict_set for a in ("--set", s)]
    invoke(["predict", trained["val_images"], "--weights", trained["ckpt"], "--out", out, *sets], trained["root"])
    ev, direct = tmp_path / "ev", tmp_path / "direct"
    invoke(["evaluate", "--predictions", out, "--dataset", "synthetic", "--metric", "miou", "--out", ev],
           trained["root"])
    invoke(["evaluate", trained["ckpt"], "--metric", "miou", "--out", direct, *evaluate_args], trained["root"])
    saved = json.loads((ev / "metrics.json").read_text())
    reference = json.loads((direct / "metrics.json").read_text())
    assert reference["mIoU"] > 1
    assert saved["mIoU"] == pytest.approx(reference["mIoU"], abs=1e-9)
    assert saved["pAcc"] == pytest.approx(reference["pAcc"], abs=1e-9)


def test_predict_keeps_inputs_with_the_same_stem_apart(trained, tmp_path):
    src = sorted(trained["val_images"].iterdir())[:2]
    for folder in ("a", "b"):
        (tmp_path / "in" / folder).mkdir(parents=True)
        (tmp_path / "in" / folder / "x.png").write_bytes(src[0 if folder == "a" else 1].read_bytes())
    Image.open(src[0]).convert("RGB").save(tmp_path / "in" / "a" / "x.jpg")
    out = tmp_path / "pred"
    invoke(["predict", str(tmp_path / "in" / "**" / "x.*"), "--weights", trained["ckpt"], "--out", out,
            "--task", "panoptic"], trained["root"])
    manifest = json.loads((out / "manifest.json").read_text())
    names = sorted(r["output"] for r in manifest["images"])
    assert names == ["a__x_jpg.png", "a__x_png.png", "b__x.png"]
    assert sorted(p.name for p in (out / "labels").iterdir()) == names
    assert sorted(p.name for p in (out / "overlays").iterdir()) == names
    pan = json.loads((out / "panoptic.json").read_text())
    assert sorted(a["file_name"] for a in pan["annotations"]) == names
    # the two different images really were written to different files
    a, b = (np.array(Image.open(out / "panoptic" / n)) for n in ("a__x_png.png", "b__x.png"))
    assert not np.array_equal(a, b)


def test_predict_refuses_to_mix_with_an_earlier_run(trained, tmp_path):
    from maskformer_cli.errors import UserError

    out = tmp_path / "pred"
    invoke(["predict", trained["val_images"], "--weights", trained["ckpt"], "--out", out, "--task", "panoptic"],
           trained["root"])
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="--exist-ok"):
        invoke(["predict", trained["val_images"], "--weights", trained["ckpt"], "--out", out], trained["root"])
    invoke(["predict", trained["val_images"], "--weights", trained["ckpt"], "--out", out, "--exist-ok"],
           trained["root"])
    # the panoptic run's files are gone (evaluate --predictions would have read them), the user's file is not
    assert not (out / "panoptic.json").exists() and not (out / "panoptic").exists()
    assert (out / "labels").is_dir() and (out / "notes.txt").read_text() == "mine"
    with pytest.raises(UserError, match="not a directory"):
        invoke(["predict", trained["val_images"], "--weights", trained["ckpt"], "--out", out / "notes.txt"],
               trained["root"])


def test_predict_input_and_weight_errors(trained, tmp_path):
    from maskformer_cli.errors import UserError

    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="none of the 1 inputs could be read"):
        invoke(["predict", tmp_path / "notes.txt", "--weights", trained["ckpt"], "--out", tmp_path / "p1"],
               trained["root"])
    # a 12-class checkpoint with a 150-class dataset's names would label everything wrongly
    with pytest.raises(UserError, match="predicts 12 classes but dataset 'ade20k' has 150"):
        invoke(["predict", trained["val_images"], "--weights", trained["ckpt"], "--dataset", "ade20k",
                "--out", tmp_path / "p2"], trained["root"])
    with pytest.raises(UserError, match="--task semantic"):
        invoke(["predict", trained["val_images"], "--weights", trained["ckpt"], "--task", "panoptic",
                "--set", "inference.tta=true", "--out", tmp_path / "p3"], trained["root"])
    with pytest.raises(UserError, match="--batch-size"):
        invoke(["predict", trained["val_images"], "--weights", trained["ckpt"], "--batch-size", "0",
                "--out", tmp_path / "p4"], trained["root"])


def test_predict_batched_equals_one_by_one(trained, tmp_path):
    one, three = tmp_path / "one", tmp_path / "three"
    invoke(["predict", trained["val_images"], "--weights", trained["ckpt"], "--out", one], trained["root"])
    invoke(["predict", trained["val_images"], "--weights", trained["ckpt"], "--out", three, "--batch-size", "3"],
           trained["root"])
    for f in sorted((one / "labels").iterdir()):
        np.testing.assert_array_equal(np.array(Image.open(f)), np.array(Image.open(three / "labels" / f.name)))


def test_predict_records_keep_the_input_order_when_writers_finish_out_of_order(trained, tmp_path, monkeypatch):
    """Several writer threads encode images at once; the first images are made the slowest to write, and the
    manifest, panoptic.json and instances.json still list the images in input order, as one writer gives."""
    import time

    from maskformer_cli.commands import predict as predict_cmd
    from maskformer_cli.data import prefetch

    monkeypatch.setattr(prefetch, "default_workers", lambda: 4)
    real_write = predict_cmd._Writer.write
    finished = []

    def slow_first(self, pred, meta, path, stem, ms):
        time.sleep(0.4 / (1 + meta["index"]))
        real_write(self, pred, meta, path, stem, ms)
        finished.append(meta["index"])

    monkeypatch.setattr(predict_cmd._Writer, "write", slow_first)
    out = tmp_path / "pred"
    invoke(["predict", trained["val_images"], "--weights", trained["ckpt"], "--task", "panoptic", "--out", out,
            "--rle"], trained["root"])
    assert finished != sorted(finished)  # the writers did finish out of order
    stems = [p.stem for p in sorted(trained["val_images"].iterdir())]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [Path(r["file"]).stem for r in manifest["images"]] == stems
    pan = json.loads((out / "panoptic.json").read_text())
    assert [Path(a["file_name"]).stem for a in pan["annotations"]] == stems
    names = [Path(r["file_name"]).stem for r in json.loads((out / "instances.json").read_text())]
    assert names == sorted(names, key=stems.index) and set(names) <= set(stems)


def test_evaluate_and_predict_with_detr_panoptic_postprocessing(trained, tmp_path):
    """Table 3's "MaskFormer (DETR)": `evaluate CKPT inference.panoptic_postprocessing=detr` computes PQ with
    DETR's post-processing, and `predict --task panoptic` with the same setting saves those very segments."""
    out = tmp_path / "eval"
    invoke(["evaluate", trained["ckpt"], "--metric", "pq", "inference.panoptic_postprocessing=detr", "--out", out],
           trained["root"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["recipe"]["inference"]["panoptic_postprocessing"] == "detr" and 0 <= m["PQ"] <= 100
    # a short-trained model is unsure: a low class threshold keeps segments for PQ to count
    detr = ["inference.panoptic_postprocessing=detr", "inference.detr_threshold=0.0"]
    invoke(["evaluate", trained["ckpt"], "--metric", "pq", *detr, "--out", out], trained["root"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["PQ"] > 1 and m["PQ"] != pytest.approx(trained["metrics"]["PQ"], abs=1e-6)  # not MaskFormer's
    pred, ev = tmp_path / "pred", tmp_path / "ev"
    invoke(["predict", trained["val_images"], "--weights", trained["ckpt"], "--task", "panoptic", "--out", pred,
            *(a for s in detr for a in ("--set", s))], trained["root"])
    invoke(["evaluate", "--predictions", pred, "--dataset", "synthetic", "--metric", "pq", "--out", ev],
           trained["root"])
    saved = json.loads((ev / "metrics.json").read_text())
    for key in ("PQ", "PQ_th", "PQ_st"):
        assert saved[key] == pytest.approx(m[key], abs=1e-9), key


def test_panoptic_predictions_give_the_checkpoints_metrics_all(trained, tmp_path):
    """One predict --task panoptic folder reproduces `evaluate CKPT --metric all`: PQ from panoptic/, mIoU and
    PQ-stuff from labels/ (semantic inference, not the panoptic segments' categories)."""
    out, ev = tmp_path / "pred", tmp_path / "ev"
    invoke(["predict", trained["val_images"], "--weights", trained["ckpt"], "--task", "panoptic", "--out", out],
           trained["root"])
    invoke(["evaluate", "--predictions", out, "--dataset", "synthetic", "--metric", "all", "--out", ev],
           trained["root"])
    invoke(["evaluate", trained["ckpt"], "--metric", "all", "--out", tmp_path / "direct"], trained["root"])
    saved = json.loads((ev / "metrics.json").read_text())
    direct = json.loads((tmp_path / "direct" / "metrics.json").read_text())
    for key in ("mIoU", "pAcc", "PQ_stuff", "PQ", "PQ_th", "PQ_st"):
        assert saved[key] == pytest.approx(direct[key], abs=1e-9), key


def test_output_names_are_unique_even_against_numbered_names():
    from maskformer_cli.commands.predict import output_names

    files = [Path(p) for p in ("/c/x.jpg", "/c/x.png", "/c/x_jpg.png", "/c/x_jpg_1.jpg", "/a/y.JPG", "/a/y.jpg",
                               "/a/z.png")]
    names = output_names(files)
    assert len(set(names)) == len(files) and names[-1] == "z"
    assert output_names([Path("/a/p.png"), Path("/b/q.png")]) == ["p", "q"]  # plain stems when unique


def test_predict_names_what_a_folder_search_skips(tmp_path, capsys):
    """Sub-folders and broken symbolic links in an input folder are named, not silently dropped."""
    from maskformer_cli.commands.predict import collect_inputs
    from maskformer_cli.reporting import console

    folder = tmp_path / "imgs"
    (folder / "nested").mkdir(parents=True)
    (folder / "a.png").write_bytes(b"x")
    (folder / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    with console.capture() as cap:
        files = collect_inputs([str(folder)])
    text = " ".join(cap.get().split())
    assert [f.name for f in files] == ["a.png"]
    assert "sub-folder(s) not searched: nested" in text and "broken symbolic link(s): gone.jpg" in text


# ------------------------------------------------------------ panoptic checkpoints, TTA, option checks


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
