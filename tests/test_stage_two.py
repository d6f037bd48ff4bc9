"""Stage two and the pipeline: real CLIs end to end at toy size, resume, feeds, artifacts, bad input."""
from __future__ import annotations

import ast
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from pipeline import config as C
from pipeline.ladder_store import LadderStore

ROOT = Path(__file__).resolve().parents[1]


def cli(module, args):
    import importlib

    main = importlib.import_module(f"stages.{module}").main
    return CliRunner().invoke(main, ["--params", "none"] + args, catch_exceptions=False)


def ok(res):
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture
def cached(tiny_bert, toy_task, tmp_path):
    ok(cli("cache_activations", ["--backbone", tiny_bert, "--task", toy_task, "--out", str(tmp_path / "cache"),
                                 "--dtype", "fp32", "--device", "cpu"]))
    return tiny_bert, toy_task, tmp_path


def train_args(bb, task, tmp, out="run", *extra):
    return ["--backbone", bb, "--task", task, "--cache", str(tmp / "cache"), "--out", str(tmp / out), "--r", "4",
            "--epochs", "2", "--batch-size", "16", "--warmup-steps", "2", "--device", "cpu", "--init", "magnitude",
            *extra]


def declared_outputs(stage: str) -> set[str]:
    st = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    out = set()
    for key in ("outs", "metrics", "plots"):
        for item in st.get(key, []):
            out.add(item if isinstance(item, str) else next(iter(item)))
    return out


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_end_to_end_clis_write_exactly_the_declared_artifacts(family, tiny_bert, tiny_t5, toy_task, tmp_path):
    bb = tiny_bert if family == "bert" else tiny_t5
    cache = tmp_path / "cache"
    ok(cli("cache_activations", ["--backbone", bb, "--task", toy_task, "--out", str(cache), "--dtype", "fp32",
                                 "--device", "cpu"]))
    init = tmp_path / "side_init.safetensors"
    ok(cli("prune_init", ["--backbone", bb, "--task", toy_task, "--r", "4", "--init", "fisher", "--fisher-samples",
                          "8", "--out", str(init), "--device", "cpu"]))
    run = tmp_path / "runs" / "side"
    ok(cli("train_side", ["--backbone", bb, "--task", toy_task, "--cache", str(cache), "--out", str(run), "--r", "4",
                          "--init", "fisher", "--side-init", str(init), "--epochs", "2", "--batch-size", "16",
                          "--device", "cpu"]))
    ok(cli("evaluate", ["--run", str(run), "--cache", str(cache), "--out", str(run / "eval"), "--device", "cpu"]))
    made = {str(p.relative_to(tmp_path)) for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    declared = declared_outputs("train_side") | declared_outputs("evaluate")
    assert made == declared
    m = json.loads((run / "metrics.json").read_text())
    for key in ("trainable_params", "peak_memory_mb", "train_tokens_per_s", "epochs", "seed", "val_accuracy"):
        assert key in m
    ev = json.loads((run / "eval" / "metrics.json").read_text())
    assert {"accuracy", "baseline_accuracy", "matthews_correlation", "f1"} <= set(ev)

    # predict (backbone + side net on raw text) agrees with the cached evaluation of the same examples
    test = LadderStore(cache / "test.zarr")
    from pipeline import evaluate as E
    from pipeline.predict import LSTModel
    from pipeline.tasks import get_task
    from pipeline.train import load_side

    net, _ = load_side(run)
    cached_scores = E.score_store(net, test, 64, "cpu")
    exs = get_task(toy_task).load("unused", 0)["test"]
    model = LSTModel(str(run), "cpu")
    live_scores = model.scores([(e.text_a, e.text_b) for e in exs])
    assert np.allclose(cached_scores, live_scores, atol=1e-4), np.abs(cached_scores - live_scores).max()
    lines = [json.loads(x) for x in model.predict([(e.text_a, None) for e in exs[:3]])]
    assert [x["label"] for x in lines] == list(cached_scores[:3].argmax(1))


def read_curves(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_resume_after_kill_9_continues_to_the_same_curve(cached):
    import os
    import subprocess
    import sys

    bb, task, tmp = cached
    ok(cli("train_side", train_args(bb, task, tmp, "full")))
    cmd = [sys.executable, "-m", "stages.train_side", "--params", "none"] + train_args(bb, task, tmp, "resumed")
    died = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, LADDER_CACHE_KILL_AFTER_EPOCH="1"),
                          capture_output=True, text=True)
    assert died.returncode == -9, died.stderr
    assert not (tmp / "resumed" / "side.safetensors").exists()  # no final artifacts from a killed run
    again = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "resuming after epoch 1" in again.stdout
    full, resumed = read_curves(tmp / "full" / "plots" / "curves.csv"), read_curves(tmp / "resumed" / "plots" / "curves.csv")
    key = lambda rows: [(r["epoch"], r["train_loss"], r["val_accuracy"]) for r in rows]  # noqa: E731
    assert key(full) == key(resumed)


def test_cache_feed_and_backbone_feed_reach_the_same_result(cached):
    bb, task, tmp = cached
    ok(cli("train_side", train_args(bb, task, tmp, "cache_feed")))
    ok(cli("train_side", train_args(bb, task, tmp, "live_feed", "--feed", "backbone")))
    a = read_curves(tmp / "cache_feed" / "plots" / "curves.csv")
    b = read_curves(tmp / "live_feed" / "plots" / "curves.csv")
    for x, y in zip(a, b):
        assert abs(float(x["train_loss"]) - float(y["train_loss"])) < 1e-4
        assert x["val_accuracy"] == y["val_accuracy"]


def test_params_yaml_sections_build_every_stage_config():
    for cls, section in ((C.CacheConfig, "cache_activations"), (C.PruneConfig, "prune_init"),
                         (C.TrainConfig, "train_side"), (C.EvalConfig, "evaluate")):
        cfg = C.build(cls, ROOT / "params.yaml", section)
        assert cfg is not None
    with pytest.raises(C.ConfigError, match="unknown key"):
        C.build(C.TrainConfig, None, None, learning_rate=1.0)


def _pipeline_imports(module_path: Path, seen: set) -> set:
    tree = ast.parse(module_path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for n in names:
            p = ROOT / (n.replace(".", "/") + ".py")
            if n.startswith(("pipeline", "stages")) and p.exists() and p not in seen:
                seen.add(p)
                _pipeline_imports(p, seen)
    return seen


@pytest.mark.parametrize("stage", ["cache_activations", "prune_init", "train_side", "evaluate"])
def test_dvc_stage_deps_list_every_module_the_stage_imports(stage):
    st = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    deps = {d for d in st["deps"] if d.endswith(".py")}
    imported = {str(p.relative_to(ROOT)) for p in _pipeline_imports(ROOT / "stages" / f"{stage}.py", set())}
    imported.add(f"stages/{stage}.py")
    assert imported - {"pipeline/__init__.py", "stages/__init__.py"} <= deps, imported - deps
