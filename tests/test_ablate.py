"""`maskformer ablate`: expansion, seeds, median ± std, skip/resume, dry-run commands, tables; the query analysis.

Training is replaced by an injected fake whose metrics are a known function of the run, so every number in
the tables is checked against numpy computed here.
"""

from __future__ import annotations

import csv
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from maskformer_cli.ablation_file import apply_overrides, load_ablation, slugify
from maskformer_cli.commands.ablate import run_ablate
from maskformer_cli.config import ConfigError, load_recipe, to_dict
from maskformer_cli.errors import UserError

BASE = {
    "name": "tiny",
    "model": {"backbone": "timm:resnet18", "hidden_dim": 32, "num_queries": 10, "dec_layers": 2},
    "data": {"dataset": "synthetic", "synthetic_num_classes": 6},
    "solver": {"max_iters": 4, "batch_size": 2, "seed": 7, "eval_every": 4, "checkpoint_every": 2},
}


def write_ablation(tmp_path: Path, variants: dict, name: str = "abl.yaml", **extra) -> Path:
    data = {"metrics": ["mIoU", "PQ_stuff"], "base": BASE, "variants": variants, **extra}
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def score(recipe) -> dict:
    """The fake's metrics: a known function of the run's queries, matcher and seed."""
    q, seed = recipe.model.num_queries, recipe.solver.seed
    bonus = 5.0 if recipe.loss.matcher == "fixed" else 0.0
    return {"mIoU": 10.0 + q + bonus + 1.5 * (seed - 7) ** 2, "PQ_stuff": 3.0 * q - seed, "per_class": [1, 2]}


@dataclass
class FakeTrainResult:
    run_dir: Path
    step: int
    metrics: dict
    interrupted: bool
    stop_signal: int | None = None


@dataclass
class FakeTrain:
    """Records calls; writes what train() writes (config.yaml, a checkpoint); may stop early once."""

    interrupt: set = field(default_factory=set)  # run names to interrupt on their first call
    calls: list = field(default_factory=list)
    stop_signal: int | None = None  # what stopped an interrupted run (None: stop_after)

    def __call__(self, recipe, *, run_dir, resume, exist_ok, device, quiet):
        self.calls.append({"name": recipe.name, "resume": resume, "exist_ok": exist_ok, "run_dir": run_dir,
                           "seed": recipe.solver.seed})
        run_dir = Path(run_dir)
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        from maskformer_cli.config import dump_recipe

        (run_dir / "config.yaml").write_text(dump_recipe(recipe))
        if recipe.name in self.interrupt:
            self.interrupt.discard(recipe.name)
            (run_dir / "checkpoints" / "step_00000002.pt").write_bytes(b"x")
            return FakeTrainResult(run_dir, 2, {}, True, self.stop_signal)
        (run_dir / "checkpoints" / "last.pt").write_bytes(b"x")
        return FakeTrainResult(run_dir, recipe.solver.max_iters, score(recipe), False)


class Quiet:
    def __init__(self):
        self.lines = []

    def print(self, *args, **kwargs):
        self.lines.append(" ".join(str(a) for a in args))


# ------------------------------------------------------------------------------------------------ expansion


def test_apply_overrides_is_a_deep_copy_with_dotted_and_nested_keys():
    base = {"model": {"num_queries": 10, "backbone": "x"}, "solver": {"lr": 1.0}}
    out = apply_overrides(base, {"model.num_queries": 50, "solver": {"lr": 2.0}, "loss.matcher": "fixed"})
    assert out == {"model": {"num_queries": 50, "backbone": "x"}, "solver": {"lr": 2.0}, "loss": {"matcher": "fixed"}}
    assert base == {"model": {"num_queries": 10, "backbone": "x"}, "solver": {"lr": 1.0}}


def test_variants_build_recipes_from_base_plus_overrides(tmp_path):
    p = write_ablation(tmp_path, {"N=5": {"model.num_queries": 5}, "fixed": {"loss.matcher": "fixed",
                                                                           "model.num_queries": 6},
                                  "base": {}})
    abl = load_ablation(p)
    assert abl.name == "abl" and [v.name for v in abl.variants] == ["N=5", "fixed", "base"]
    r5, rf, rb = (v.recipe for v in abl.variants)
    assert (r5.model.num_queries, r5.loss.matcher) == (5, "hungarian")
    assert (rf.model.num_queries, rf.loss.matcher) == (6, "fixed")
    # everything not overridden is the base recipe, and the base equals a plain recipe of the base mapping
    plain = to_dict(load_recipe(write_recipe(tmp_path, BASE)))
    assert to_dict(rb) == plain
    d5 = to_dict(r5)
    d5["model"]["num_queries"] = 10
    assert d5 == plain


def write_recipe(tmp_path, data):
    p = tmp_path / "plain.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize(
    "variants, extra, match",
    [
        ({"a": {"model.num_querys": 5}}, {}, r"variant 'a'.*unknown key 'model.num_querys'.*num_queries"),
        ({"a": {"model.num_queries": "many"}}, {}, r"variant 'a'.*model.num_queries: expected an integer"),
        ({"a": {}}, {"paper": {"b": {"mIoU": 1.0}}}, r"paper: 'b' is not a variant"),
        ({"a": {}}, {"metrix": [1]}, r"unknown key 'metrix'.*did you mean 'metrics'"),
        ({"a b": {}, "a_b": {}}, {}, r"same directory"),
        ({"a": {"model.dec_layers": 1}}, {"evaluate_only": True}, r"only inference.\* keys may differ"),
        ({}, {}, r"variants: must map"),
    ],
)
def test_bad_ablation_files_name_the_problem(tmp_path, variants, extra, match):
    with pytest.raises(ConfigError, match=match):
        load_ablation(write_ablation(tmp_path, variants, **extra))


def test_a_plain_recipe_is_a_one_variant_ablation_over_seeds(tmp_path):
    """`ablate RECIPE --seeds 5` (the paper's median of 5 Cityscapes runs): one variant, the recipe as is."""
    path = write_recipe(tmp_path, BASE)
    abl = load_ablation(path)
    assert [v.name for v in abl.variants] == ["tiny"] and to_dict(abl.variants[0].recipe) == to_dict(load_recipe(path))
    fake, out = FakeTrain(), tmp_path / "out"
    res = run_ablate(path, seeds=3, out=out, train_fn=fake, console=Quiet(), device="cpu")
    assert res.complete and sorted(c["seed"] for c in fake.calls) == [7, 8, 9]
    miou = [10.0 + 10 + 1.5 * s**2 for s in (0, 1, 2)]
    assert float(read_csv(out / "table.csv")["tiny"]["mIoU_median"]) == pytest.approx(np.median(miou))
    # a file that is neither a recipe nor a complete ablation file still says what is missing
    bad = tmp_path / "half.yaml"
    bad.write_text(yaml.safe_dump({"base": BASE}))
    with pytest.raises(ConfigError, match="needs variants"):
        load_ablation(bad)


def test_slugify_keeps_names_readable():
    assert slugify("PerPixelBaseline+ (focal+dice)") == "PerPixelBaseline+_focal+dice"
    assert slugify("N=20") == "N=20" and slugify("semantic L=6 no self-attn") == "semantic_L=6_no_self-attn"
    assert slugify("../../etc") == "etc"


# ----------------------------------------------------------------------------------------- running, tables


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as f:
        return {r["variant"]: r for r in csv.DictReader(f)}


def test_seeds_median_std_tables_and_paper_column(tmp_path):
    p = write_ablation(tmp_path, {"N=5": {"model.num_queries": 5},
                                  "fixed": {"loss.matcher": "fixed", "model.num_queries": 6}},
                       paper={"fixed": {"mIoU": 43.7}})
    fake, out = FakeTrain(), tmp_path / "out"
    res = run_ablate(p, seeds=3, out=out, train_fn=fake, console=Quiet(), device="cpu")
    assert res.complete and len(fake.calls) == 6
    # seeds: solver.seed = base seed (7) + k, one run dir per variant and seed
    assert sorted(c["seed"] for c in fake.calls) == [7, 7, 8, 8, 9, 9]
    assert {Path(c["run_dir"]).relative_to(out).as_posix() for c in fake.calls} == {
        f"{v}/seed{k}" for v in ("N=5", "fixed") for k in range(3)}
    rows = read_csv(out / "table.csv")
    for name, q, bonus in (("N=5", 5, 0.0), ("fixed", 6, 5.0)):
        miou = np.array([10.0 + q + bonus + 1.5 * s**2 for s in (0, 1, 2)])
        pq = np.array([3.0 * q - (7 + s) for s in (0, 1, 2)])
        assert float(rows[name]["mIoU_median"]) == pytest.approx(np.median(miou))
        assert float(rows[name]["mIoU_std"]) == pytest.approx(np.std(miou, ddof=1), abs=1e-4)
        assert float(rows[name]["PQ_stuff_median"]) == pytest.approx(np.median(pq))
        assert rows[name]["runs"] == "3"
    assert rows["fixed"]["mIoU_paper"] == "43.7" and rows["N=5"]["mIoU_paper"] == ""
    md = (out / "table.md").read_text()
    assert "| variant | runs | mIoU | mIoU (paper) | PQ_stuff |" in md
    med, std = np.median([21.0, 22.5, 27.0]), np.std([21.0, 22.5, 27.0], ddof=1)
    assert f"| fixed | 3/3 | {med:.1f} ± {std:.1f} | 43.7 |" in md
    result = json.loads((out / "fixed" / "seed1" / "result.json").read_text())
    assert result["seed"] == 8 and "per_class" not in result["metrics"]
    # the materialised recipe of each run loads as a recipe and is exactly the run's recipe
    r = load_recipe(out / "recipes" / "fixed-seed1.yaml")
    assert r.loss.matcher == "fixed" and r.solver.seed == 8


def test_single_seed_shows_no_std(tmp_path):
    p = write_ablation(tmp_path, {"a": {}})
    out = tmp_path / "out"
    run_ablate(p, seeds=1, out=out, train_fn=FakeTrain(), console=Quiet(), device="cpu")
    assert read_csv(out / "table.csv")["a"]["mIoU_std"] == ""
    assert "| a | 1/1 | 20.0 | 23.0 |" in (out / "table.md").read_text()


def test_finished_runs_are_skipped_and_interrupted_ones_resume(tmp_path):
    p = write_ablation(tmp_path, {"a": {}, "b": {"model.num_queries": 4}})
    out = tmp_path / "out"
    fake = FakeTrain(interrupt={"abl-b-seed0"})
    res = run_ablate(p, seeds=1, out=out, train_fn=fake, console=Quiet(), device="cpu")
    assert not res.complete and [c["name"] for c in fake.calls] == ["abl-a-seed0", "abl-b-seed0"]
    assert not (out / "b" / "seed0" / "result.json").exists()

    fake2 = FakeTrain()
    res = run_ablate(p, seeds=1, out=out, train_fn=fake2, console=Quiet(), device="cpu")
    assert res.complete
    assert [(c["name"], c["resume"]) for c in fake2.calls] == [("abl-b-seed0", True)]  # a skipped, b resumed

    fake3 = FakeTrain()
    run_ablate(p, seeds=2, out=out, train_fn=fake3, console=Quiet(), device="cpu")
    assert [c["name"] for c in fake3.calls] == ["abl-a-seed1", "abl-b-seed1"]  # only the new seed runs


def test_changed_variant_is_not_silently_reused(tmp_path):
    out = tmp_path / "out"
    run_ablate(write_ablation(tmp_path, {"a": {"model.num_queries": 4}}), out=out, train_fn=FakeTrain(),
               console=Quiet(), device="cpu")
    changed = write_ablation(tmp_path, {"a": {"model.num_queries": 5}})
    with pytest.raises(UserError, match=r"different recipe.*model.num_queries"):
        run_ablate(changed, out=out, train_fn=FakeTrain(), console=Quiet(), device="cpu")


def test_command_line_overrides_win_and_are_part_of_the_run_state(tmp_path):
    p = write_ablation(tmp_path, {"a": {"model.num_queries": 5, "solver.max_iters": 8}, "b": {"loss.dice_weight": 2.0}})
    abl = load_ablation(p, ["model.num_queries=3", "solver.max_iters=2", "solver.eval_every=2"])
    # the command line wins over the variant's own keys; the variant's other keys stay; the base gets them too
    assert [(v.recipe.model.num_queries, v.recipe.solver.max_iters) for v in abl.variants] == [(3, 2), (3, 2)]
    assert abl.variants[1].recipe.loss.dice_weight == 2.0 and abl.base.model.num_queries == 3
    # a bad key is the error `maskformer train FILE key=value` gives, naming the file
    recipe = write_recipe(tmp_path, BASE)
    with pytest.raises(ConfigError) as from_train:
        load_recipe(recipe, ["solver.max_iter=3"])
    with pytest.raises(ConfigError) as from_ablate:
        load_ablation(p, ["solver.max_iter=3"])
    assert str(from_ablate.value) == str(from_train.value).replace(str(recipe), str(p))
    assert "did you mean 'solver.max_iters'" in str(from_ablate.value)

    out, fake = tmp_path / "out", FakeTrain()
    run_ablate(p, ["model.num_queries=3"], out=out, train_fn=fake, console=Quiet(), device="cpu")
    assert [c["name"] for c in fake.calls] == ["abl-a-seed0", "abl-b-seed0"]
    materialised = (out / "recipes" / "a-seed0.yaml").read_text()
    assert load_recipe(out / "recipes" / "a-seed0.yaml").model.num_queries == 3
    assert "overrides: model.num_queries=3" in materialised
    # other overrides on the same --out are refused before anything there changes, ...
    with pytest.raises(UserError, match=r"different recipe.*model.num_queries"):
        run_ablate(p, ["model.num_queries=4"], out=out, train_fn=FakeTrain(), console=Quiet(), device="cpu")
    with pytest.raises(UserError, match=r"different recipe.*model.num_queries"):
        run_ablate(p, out=out, dry_run=True, console=Quiet())
    assert (out / "recipes" / "a-seed0.yaml").read_text() == materialised
    # ... and the same ones find the finished runs
    again = FakeTrain()
    res = run_ablate(p, ["model.num_queries=3"], out=out, train_fn=again, console=Quiet(), device="cpu")
    assert again.calls == [] and res.complete


@pytest.mark.parametrize("signum", [2, 15])
def test_a_signal_stops_the_ablation_and_the_cli_exits_128_plus_it(tmp_path, monkeypatch, signum):
    from typer.testing import CliRunner

    import maskformer_cli.commands.ablate as ablate_mod
    from maskformer_cli.cli import app

    p = write_ablation(tmp_path, {"a": {}, "b": {"model.num_queries": 4}})
    fake = FakeTrain(interrupt={"abl-a-seed0"}, stop_signal=signum)
    res = run_ablate(p, out=tmp_path / "o1", train_fn=fake, console=Quiet(), device="cpu")
    assert (res.complete, res.stop_signal) == (False, signum) and len(fake.calls) == 1  # b never started
    # a `maskformer train` subprocess (--gpus) that exits 128 + signal, or is killed by it, stops it the same way
    for rc in (128 + signum, -signum):
        res = run_ablate(p, gpus=2, out=tmp_path / f"o{rc}", runner=lambda cmd, rc=rc: rc, console=Quiet())
        assert (res.complete, res.stop_signal) == (False, signum)
    monkeypatch.setattr(ablate_mod, "_default_train", FakeTrain(interrupt={"abl-a-seed0"}, stop_signal=signum))
    result = CliRunner().invoke(app, ["ablate", str(p), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 128 + signum, result.output
    assert "interrupted; run the same command again" in result.output
    # finished: exit 0
    monkeypatch.setattr(ablate_mod, "_default_train", FakeTrain())
    assert CliRunner().invoke(app, ["ablate", str(p), "--out", str(tmp_path / "cli")]).exit_code == 0


def test_dry_run_prints_torchrun_commands_and_writes_recipes(tmp_path):
    p = write_ablation(tmp_path, {"N=5": {"model.num_queries": 5}, "plus (x)": {"loss.matcher": "fixed", "model.num_queries": 6}},
                       gpus=8)
    out = tmp_path / "out"
    fake = FakeTrain()
    res = run_ablate(p, seeds=2, dry_run=True, out=out, train_fn=fake, console=Quiet())
    assert fake.calls == [] and not (out / "table.md").exists()
    assert len(res.commands) == 4
    for cmd, (slug, k) in zip(res.commands, [("N=5", 0), ("plus_x", 0), ("N=5", 1), ("plus_x", 1)], strict=True):
        assert shlex.split(cmd) == ["torchrun", "--nproc-per-node", "8", "-m", "maskformer_cli", "train",
                                    str(out / "recipes" / f"{slug}-seed{k}.yaml"), "--run-dir",
                                    str(out / slug / f"seed{k}")]
        assert load_recipe(out / "recipes" / f"{slug}-seed{k}.yaml").solver.seed == 7 + k
    # --gpus overrides the file's GPUs per run
    res = run_ablate(p, seeds=1, dry_run=True, gpus=2, out=out, console=Quiet())
    assert all(shlex.split(c)[2] == "2" for c in res.commands)


def test_dry_run_over_8_gpus_spans_nodes_of_8(tmp_path):
    """64 GPUs (the paper's COCO runs) is 8 nodes x 8, not 64 processes on one node."""
    p = write_ablation(tmp_path, {"a": {}}, gpus=64)
    console = Quiet()
    res = run_ablate(p, dry_run=True, out=tmp_path / "out", console=console)
    args = shlex.split(res.commands[0])
    assert args[:10] == ["torchrun", "--nnodes", "8", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
                         "--rdzv-endpoint", "$MASTER_ADDR:29500", "-m"]
    assert " $MASTER_ADDR:29500 " in res.commands[0]  # unquoted: each node's shell fills it in
    assert any("8 nodes x 8" in line for line in console.lines)
    assert shlex.split(run_ablate(p, dry_run=True, gpus=8, out=tmp_path / "out", console=Quiet()).commands[0])[1:3] \
        == ["--nproc-per-node", "8"]
    with pytest.raises(UserError, match="12 GPUs per run do not fill nodes of 8"):
        run_ablate(p, dry_run=True, gpus=12, out=tmp_path / "out", console=Quiet())


def test_cluster_workflow_dry_run_then_collect(tmp_path):
    """--dry-run, the jobs run elsewhere (they write config.yaml and the final eval), then the table is read."""
    p = write_ablation(tmp_path, {"a": {"model.num_queries": 3}, "b": {"model.num_queries": 4}})
    out = tmp_path / "out"
    res = run_ablate(p, seeds=2, dry_run=True, out=out, console=Quiet())
    for cmd in res.commands:  # what each cluster job leaves behind
        args = shlex.split(cmd)
        recipe, run_dir = load_recipe(args[6]), Path(args[8])
        (run_dir / "eval").mkdir(parents=True)
        (run_dir / "config.yaml").write_text(Path(args[6]).read_text())
        (run_dir / "eval" / "step_00000004.json").write_text(json.dumps({"step": 4, **score(recipe)}))

    def must_not_train(*a, **k):
        raise AssertionError("a finished cluster run was trained again")

    res = run_ablate(p, seeds=2, out=out, train_fn=must_not_train, console=Quiet(), device="cpu")
    assert {r.variant: r.values["mIoU"] for r in res.rows} == {"a": [13.0, 14.5], "b": [14.0, 15.5]}


def test_gpus_run_each_variant_as_a_train_subprocess(tmp_path):
    p = write_ablation(tmp_path, {"a": {"model.num_queries": 3}})
    out = tmp_path / "out"
    seen = []

    def runner(cmd):
        seen.append(cmd)
        run_dir = Path(cmd[cmd.index("--run-dir") + 1])
        recipe = load_recipe(cmd[4])
        (run_dir / "eval").mkdir(parents=True)
        (run_dir / "eval" / "step_00000004.json").write_text(json.dumps({"step": 4, **score(recipe)}))
        return 0

    res = run_ablate(p, seeds=1, gpus=2, out=out, runner=runner, console=Quiet())
    assert len(seen) == 1 and seen[0][2:4] == ["maskformer_cli", "train"] and seen[0][-2:] == ["--gpus", "2"]
    assert res.rows[0].values["mIoU"] == [10.0 + 3]
    # a failing subprocess is a clear error, not a half-written table
    with pytest.raises(UserError, match="exited with code 3"):
        run_ablate(write_ablation(tmp_path, {"b": {}}, name="abl2.yaml"), gpus=2, out=tmp_path / "o2",
                   runner=lambda cmd: 3, console=Quiet())


def test_evaluate_only_trains_once_per_seed_and_evaluates_each_variant(tmp_path):
    variants = {"general": {"inference.mode": "general"}, "semantic": {"inference.mode": "semantic"},
                "iterative": {"inference.mode": "iterative", "inference.iterative_ratio": 0.5}}
    p = write_ablation(tmp_path, variants, evaluate_only=True)
    out = tmp_path / "out"
    fake, evals = FakeTrain(), []

    def evaluate_fn(recipe, checkpoint, device):
        evals.append((recipe.inference.mode, Path(checkpoint)))
        return {"mIoU": {"general": 1.0, "semantic": 2.0, "iterative": 3.0}[recipe.inference.mode]}

    res = run_ablate(p, seeds=2, out=out, train_fn=fake, evaluate_fn=evaluate_fn, console=Quiet(), device="cpu")
    assert [c["run_dir"] for c in fake.calls] == [out / "_train" / "seed0", out / "_train" / "seed1"]
    assert sorted(evals) == sorted((m, out / "_train" / f"seed{k}" / "checkpoints" / "last.pt")
                                   for m in ("general", "semantic", "iterative") for k in (0, 1))
    assert {r.variant: r.median("mIoU") for r in res.rows} == {"general": 1.0, "semantic": 2.0, "iterative": 3.0}
    # a second invocation neither trains nor evaluates again
    evals.clear()
    run_ablate(p, seeds=2, out=out, train_fn=fake, evaluate_fn=evaluate_fn, console=Quiet(), device="cpu")
    assert len(fake.calls) == 2 and evals == []
    # dry run: the training commands, then one evaluate command per variant and seed
    res = run_ablate(p, seeds=1, dry_run=True, out=tmp_path / "dry", console=Quiet())
    assert "train" in res.commands[0] and len(res.commands) == 4
    it = shlex.split(res.commands[3].split("#")[0])
    assert it[:3] == ["maskformer", "evaluate", str(tmp_path / "dry" / "_train" / "seed0" / "checkpoints" / "last.pt")]
    assert it[it.index("--inference") + 1] == "iterative" and "inference.iterative_ratio=0.5" in res.commands[3]


def test_cli_dry_run_on_a_shipped_mini_ablation(tmp_path):
    from typer.testing import CliRunner

    from maskformer_cli.cli import app

    root = Path(__file__).resolve().parents[1]
    result = CliRunner().invoke(app, ["ablate", str(root / "recipes/ablations/mini/queries.yaml"), "--dry-run",
                                      "--out", str(tmp_path), "--seeds", "1"])
    assert result.exit_code == 0, result.output
    assert "torchrun --nproc-per-node 1 -m maskformer_cli train" in result.output.replace("\n", " ")
    assert sorted(p.name for p in (tmp_path / "recipes").iterdir()) == [
        f"N={n}-seed0.yaml" for n in (10, 20, 5, 50)]
    # key=value overrides on the command line reach every materialised recipe
    result = CliRunner().invoke(app, ["ablate", str(root / "recipes/ablations/mini/queries.yaml"), "solver.max_iters=7",
                                      "--dry-run", "--out", str(tmp_path / "o2")])
    assert result.exit_code == 0, result.output
    assert {load_recipe(p).solver.max_iters for p in (tmp_path / "o2" / "recipes").iterdir()} == {7}


def test_cli_dry_run_of_table5_prints_8_node_commands(tmp_path):
    from typer.testing import CliRunner

    from maskformer_cli.cli import app

    root = Path(__file__).resolve().parents[1]
    result = CliRunner().invoke(app, ["ablate", str(root / "recipes/ablations/table5_box_vs_mask_matching.yaml"),
                                      "--dry-run", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    out = result.output.replace("\n", " ")
    assert out.count("torchrun --nnodes 8 --nproc-per-node 8 ") == 2 and "--nproc-per-node 64" not in out


# ------------------------------------------------------------------------------------------- query analysis


def test_query_category_stats_match_a_brute_force_count():
    from maskformer_cli.query_analysis import predicted_categories, query_category_stats
    from maskformer_cli.structures import MaskFormerOutput

    g = torch.Generator().manual_seed(0)
    b, q, k, h = 4, 6, 5, 8
    batches = []
    for _ in range(3):
        logits = torch.randn(b, q, k + 1, generator=g) * 3
        masks = torch.randn(b, q, h, h, generator=g) - 1.0
        masks[:, 0] = -10.0  # query 0 never has a mask: it predicts nothing when masks are used
        batches.append(MaskFormerOutput(pred_logits=logits, pred_masks=masks))
    stats = query_category_stats(batches, score_threshold=0.3, min_mask_area=2)

    seen = [set() for _ in range(q)]
    counts = np.zeros((q, k), dtype=np.int64)
    for out in batches:
        p = out.pred_logits.softmax(-1).numpy()
        area = (torch.sigmoid(out.pred_masks) > 0.5).sum((-1, -2)).numpy()
        for i in range(b):
            for j in range(q):
                c = int(p[i, j].argmax())
                if c != k and p[i, j, c] >= 0.3 and area[i, j] >= 2:
                    seen[j].add(c)
                    counts[j, c] += 1
    assert stats.unique_per_query().tolist() == [len(s) for s in seen]
    assert stats.sorted_unique() == sorted((len(s) for s in seen), reverse=True)
    assert np.array_equal(stats.counts.numpy(), counts) and stats.num_images == 12
    assert stats.unique_per_query()[0] == 0 and stats.sorted_unique()[0] > 0
    report = stats.to_dict([f"c{i}" for i in range(k)])
    assert report["per_query"][1]["num_categories"] == len(seen[1])
    assert {c["category"] for c in report["per_query"][1]["categories"]} == {f"c{i}" for i in seen[1]}
    # without masks only the class decides; "no object" never counts
    lab = predicted_categories(torch.tensor([[[0.0, 5.0, 0.0], [0.0, 0.0, 9.0]]]))
    assert lab.tolist() == [[1, -1]]


def test_query_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    from maskformer_cli.query_analysis import plot_query_stats

    path = plot_query_stats([5, 3, 3, 1, 0], tmp_path / "q.png", title="t")
    assert path is not None and path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_run_config_check_reads_a_relative_custom_spec_as_train_saved_it(tmp_path, monkeypatch):
    """train() saves data.dataset of a custom spec as an absolute path; a rerun of the same ablation from the
    same folder must not see a different recipe."""
    from maskformer_cli.ablation_runs import Run, check_run_config
    from maskformer_cli.config import dump_recipe, with_absolute_dataset_spec

    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(None, ["data.dataset=specs/mine.yaml"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_recipe(with_absolute_dataset_spec(recipe)))
    run = Run(variant=None, seed_index=0, recipe=recipe, run_dir=run_dir, recipe_path=tmp_path / "r.yaml")
    check_run_config(run)  # the same recipe: no error
    other = load_recipe(None, ["data.dataset=specs/other.yaml"])
    with pytest.raises(UserError, match="different recipe"):
        check_run_config(Run(variant=None, seed_index=0, recipe=other, run_dir=run_dir,
                             recipe_path=tmp_path / "r.yaml"))
