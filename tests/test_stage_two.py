"""Stage two and the pipeline: real CLIs end to end at toy size, resume, feeds, artifacts, bad input."""
from __future__ import annotations

import ast
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
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
    for key in ("trainable_params", "peak_memory_mb", "train_tokens_per_s", "best_epoch", "val_accuracy"):
        assert key in m
    ev = json.loads((run / "eval" / "metrics.json").read_text())
    assert {"accuracy", "baseline_accuracy", "matthews_correlation", "f1"} <= set(ev)

    # predict (backbone + side net on raw text) agrees with the cached evaluation of the same examples
    test = LadderStore(cache / "test.zarr")
    from pipeline import evaluate as E
    from pipeline.predict import LSTModel
    from pipeline.run_folder import load_side
    from pipeline.tasks import get_task

    net, _ = load_side(run)
    cached_scores = E.score_store(net, test, 64, "cpu")
    exs = get_task(toy_task).load("unused", 0)["test"]
    model = LSTModel(str(run), "cpu")
    live_scores = model.scores([(e.text_a, e.text_b) for e in exs])
    assert np.allclose(cached_scores, live_scores, atol=1e-4), np.abs(cached_scores - live_scores).max()
    lines = [json.loads(x) for x in model.predict([(e.text_a, None) for e in exs[:3]])]
    names = get_task(toy_task).label_names
    assert [x["label"] for x in lines] == [names[i] for i in cached_scores[:3].argmax(1)]
    for x, s in zip(lines, cached_scores[:3]):  # probabilities: softmax of the scores, named by label
        p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        assert list(x["probabilities"]) == names and np.allclose(list(x["probabilities"].values()), p, atol=1e-4)
        assert "scores" not in x
    raw = json.loads(next(model.predict([(exs[0].text_a, None)], raw_scores=True)))
    assert np.allclose(raw["scores"], cached_scores[0], atol=1e-4)


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
    assert not (tmp / "resumed" / "metrics.json").exists()  # a killed run never reports metrics
    again = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "resuming after epoch 1" in again.stdout
    full, resumed = read_curves(tmp / "full" / "plots" / "curves.csv"), read_curves(tmp / "resumed" / "plots" / "curves.csv")
    key = lambda rows: [(r["epoch"], r["train_loss"], r["val_accuracy"]) for r in rows]  # noqa: E731
    assert key(full) == key(resumed)
    # optimizer moments, scheduler, dropout RNG and the best-epoch record all survive the kill: same weights
    from safetensors.torch import load_file

    a, b = load_file(str(tmp / "full" / "side.safetensors")), load_file(str(tmp / "resumed" / "side.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((tmp / d / "metrics.json").read_text()) for d in ("full", "resumed"))
    assert ma["best_epoch"] == mb["best_epoch"]


def test_best_validation_epoch_is_the_saved_side_net_and_is_recorded(cached):
    bb, task, tmp = cached
    ok(cli("train_side", train_args(bb, task, tmp, "run", "--epochs", "4", "--lr", "0.01")))
    m = json.loads((tmp / "run" / "metrics.json").read_text())
    curves = read_curves(tmp / "run" / "plots" / "curves.csv")
    vals = [float(r["val_accuracy"]) for r in curves]
    assert m["best_epoch"] == 1 + vals.index(max(vals))  # first epoch reaching the maximum
    assert m["val_accuracy"] == pytest.approx(max(vals)) and m["last_epoch_val_accuracy"] == pytest.approx(vals[-1])
    # the saved weights are that epoch's: scoring validation with them gives its accuracy again
    from pipeline import evaluate as E
    from pipeline.run_folder import load_side
    from pipeline.tasks import get_task

    net, _ = load_side(tmp / "run")
    val = LadderStore(tmp / "cache" / "validation.zarr")
    from pipeline.metrics import predictions, task_metrics

    pred = predictions(E.score_store(net, val, 64, "cpu"), "classification", [])
    assert task_metrics("classification", pred, val.labels)["accuracy"] == pytest.approx(max(vals))
    assert get_task(task).metric == "accuracy"


def test_resume_never_unpickles_a_planted_checkpoint(cached):
    import pickle

    bb, task, tmp = cached
    marker = tmp / "pwned"

    class Exploit:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    run = tmp / "run"
    run.mkdir()
    for name in ("checkpoint.safetensors", "checkpoint.pt"):
        (run / name).write_bytes(pickle.dumps(Exploit()))
    res = cli("train_side", train_args(bb, task, tmp, "run", "--resume"))
    assert res.exit_code == 2 and "checkpoint.safetensors is not a checkpoint" in res.output, res.output
    assert not marker.exists()


def test_cache_feed_and_backbone_feed_reach_the_same_result(cached):
    bb, task, tmp = cached
    ok(cli("train_side", train_args(bb, task, tmp, "cache_feed")))
    ok(cli("train_side", train_args(bb, task, tmp, "live_feed", "--feed", "backbone")))
    a = read_curves(tmp / "cache_feed" / "plots" / "curves.csv")
    b = read_curves(tmp / "live_feed" / "plots" / "curves.csv")
    for x, y in zip(a, b):
        assert abs(float(x["train_loss"]) - float(y["train_loss"])) < 1e-4
        assert x["val_accuracy"] == y["val_accuracy"]


@pytest.mark.parametrize("params", ["params.yaml", "params_smollm2.yaml"])
def test_params_yaml_sections_build_every_stage_config(params):
    for cls, section in ((C.CacheConfig, "cache_activations"), (C.PruneConfig, "prune_init"),
                         (C.TrainConfig, "train_side"), (C.EvalConfig, "evaluate")):
        cfg = C.build(cls, ROOT / params, section)
        assert cfg is not None
    if params == "params_smollm2.yaml":  # the three stages that need the backbone agree on it and on the layers
        cfgs = [C.build(cls, ROOT / params, sec) for cls, sec in ((C.CacheConfig, "cache_activations"),
                                                                  (C.PruneConfig, "prune_init"),
                                                                  (C.TrainConfig, "train_side"))]
        assert {c.backbone for c in cfgs} == {"smollm2-135m-instruct"} and len({c.layers for c in cfgs}) == 1
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
def test_dvc_stage_deps_are_exactly_the_modules_the_stage_imports(stage):
    st = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    deps = {d for d in st["deps"] if d.endswith(".py")}
    imported = {str(p.relative_to(ROOT)) for p in _pipeline_imports(ROOT / "stages" / f"{stage}.py", set())}
    imported.add(f"stages/{stage}.py")
    assert imported - {"pipeline/__init__.py", "stages/__init__.py"} == deps


def test_dvc_accepts_dvc_yaml_and_plots_validation_beside_train_loss():
    """dvc's own schema check (a stage plot with a list of y fields once broke `make demo` before any stage ran)."""
    import shutil
    import subprocess
    import sys

    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    res = subprocess.run([dvc, "stage", "list"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert {"cache_activations", "prune_init", "train_side", "evaluate"} <= {ln.split()[0] for ln in res.stdout.splitlines()}
    top = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    curves = next(p["runs/side/plots/curves.csv"] for p in top if "runs/side/plots/curves.csv" in p)
    assert curves["y"] == ["train_loss", "val_accuracy"]


def test_editing_the_side_network_reruns_only_train_side_and_evaluate():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert sorted(name for name, st in stages.items() if "pipeline/side.py" in st["deps"]) == ["evaluate", "train_side"]
    assert sorted(name for name, st in stages.items() if "pipeline/batches.py" in st["deps"]) == ["evaluate", "train_side"]


def test_imports_point_one_way_store_to_batches_to_side():
    """The store knows no model; batch assembly knows the store but not the network; the network knows
    neither (it reads whatever batch it is given); stage modules sit on top."""
    def deps(module):
        return {str(p.relative_to(ROOT)) for p in _pipeline_imports(ROOT / "pipeline" / f"{module}.py", set())}

    assert not deps("ladder_store") & {"pipeline/backbone.py", "pipeline/side.py", "pipeline/batches.py",
                                         "pipeline/padding.py"}
    assert "pipeline/ladder_store.py" in deps("batches") and "pipeline/side.py" not in deps("batches")
    assert not deps("side") & {"pipeline/ladder_store.py", "pipeline/batches.py", "pipeline/backbone.py"}
    assert not deps("prune") & {"pipeline/side.py"}  # the init stage never needs the network's code
    for stage_logic in ("cache_activations", "prune_init", "train_side", "evaluate"):
        assert (ROOT / "pipeline" / f"{stage_logic}.py").exists()  # stage X's logic lives in pipeline/X.py


def test_packed_training_follows_the_padded_curve(cached):
    bb, task, tmp = cached
    no_dropout = ["--dropout", "0", "--attn-dropout", "0", "--ff-dropout", "0", "--emb-dropout", "0",
                  "--final-dropout", "0"]
    ok(cli("train_side", train_args(bb, task, tmp, "padded", *no_dropout)))
    ok(cli("train_side", train_args(bb, task, tmp, "packed", "--pack", *no_dropout)))
    a = read_curves(tmp / "padded" / "plots" / "curves.csv")
    b = read_curves(tmp / "packed" / "plots" / "curves.csv")
    for x, y in zip(a, b):
        assert abs(float(x["train_loss"]) - float(y["train_loss"])) < 1e-4
        assert x["val_accuracy"] == y["val_accuracy"]


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "side.safetensors"))


def test_a_cpu_sweep_trains_every_config_bit_for_bit_as_alone(cached):
    """One read of each batch for 4 configs (2 lrs x 2 seeds); on CPU the default (--sweep-stack auto) steps
    each in turn, so each ends bit for bit where it ends alone with the same seed and data_seed (own RNG
    stream, own optimizer), and the best on validation is at --out."""
    bb, task, tmp = cached
    (tmp / "sweep.yaml").write_text("lr: [0.003, 0.01]\nseed: [0, 1]\n")
    res = ok(cli("train_side", train_args(bb, task, tmp, "sw", "--sweep", str(tmp / "sweep.yaml"), "--seed", "7")))
    summary = json.loads((tmp / "sw" / "sweep.json").read_text())
    assert [c["name"] for c in summary["configs"]] == ["lr0.003-seed0", "lr0.003-seed1", "lr0.01-seed0",
                                                       "lr0.01-seed1"]
    for name, lr, seed in (("lr0.003-seed1", "0.003", "1"), ("lr0.01-seed0", "0.01", "0")):
        ok(cli("train_side", train_args(bb, task, tmp, f"alone-{name}", "--lr", lr, "--seed", seed,
                                        "--data-seed", "7")))
        a, b = _weights(tmp / "sw" / name), _weights(tmp / f"alone-{name}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert read_curves(tmp / "sw" / name / "plots" / "curves.csv")[-1]["train_loss"] == \
            read_curves(tmp / f"alone-{name}" / "plots" / "curves.csv")[-1]["train_loss"]
    best = summary["best"]
    vals = {c["name"]: c["val_accuracy"] for c in summary["configs"]}
    assert vals[best] == max(vals.values())
    top = _weights(tmp / "sw")
    assert all(torch.equal(top[k], v) for k, v in _weights(tmp / "sw" / best).items())
    declared = {Path(p).name for p in declared_outputs("train_side")}  # dvc repro with a sweep finds every out
    assert declared <= {p.name for p in (tmp / "sw").rglob("*") if p.parent in (tmp / "sw", tmp / "sw" / "plots")}
    rows = read_curves(tmp / "sw" / "sweep.csv")
    assert len(rows) == 4 and {"name", "lr", "seed", "best_epoch", "val_accuracy"} <= set(rows[0])
    assert "sweep: 4 configs" in res.output
    ok(cli("evaluate", ["--run", str(tmp / "sw"), "--cache", str(tmp / "cache"), "--out", str(tmp / "sw" / "eval"),
                        "--device", "cpu"]))


def test_a_sweep_mixes_shapes_and_lengths_and_resumes_after_kill_9(cached):
    import os
    import subprocess
    import sys

    bb, task, tmp = cached
    (tmp / "sweep.yaml").write_text("configs:\n  - {r: 2, epochs: 3}\n  - {r: 4, epochs: 2, init: random}\n")
    args = train_args(bb, task, tmp, "full", "--sweep", str(tmp / "sweep.yaml"))
    ok(cli("train_side", args))
    cmd = [sys.executable, "-m", "stages.train_side", "--params", "none"] + train_args(
        bb, task, tmp, "killed", "--sweep", str(tmp / "sweep.yaml"))
    died = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, LADDER_CACHE_KILL_AFTER_EPOCH="1"),
                          capture_output=True, text=True)
    assert died.returncode == -9, died.stderr
    again = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    for name in ("r2-epochs3", "r4-epochs2-initrandom"):
        a, b = _weights(tmp / "full" / name), _weights(tmp / "killed" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
        epochs = len(read_curves(tmp / "full" / name / "plots" / "curves.csv"))
        assert epochs == (3 if name.startswith("r2") else 2)


def test_a_sweep_refuses_keys_its_configs_cannot_vary(cached):
    bb, task, tmp = cached
    (tmp / "bad.yaml").write_text("batch_size: [8, 16]\n")
    res = cli("train_side", train_args(bb, task, tmp, "bad", "--sweep", str(tmp / "bad.yaml")))
    assert res.exit_code == 2 and "batch_size" in res.output and "cannot vary" in res.output


def test_a_stacked_sweep_equals_each_config_alone_to_float_tolerance_without_dropout(cached):
    """Same-shape configs (lr, seed, weight decay, init differ) stepped as one vmapped computation with a
    vectorized AdamW: each ends where torch.optim.AdamW takes it alone (dropout off: no shared RNG)."""
    bb, task, tmp = cached
    off = ["--dropout", "0", "--attn-dropout", "0", "--ff-dropout", "0", "--emb-dropout", "0", "--final-dropout", "0"]
    (tmp / "sweep.yaml").write_text("configs:\n  - {lr: 0.003, seed: 0}\n  - {lr: 0.01, seed: 1, weight_decay: 0.1}\n"
                                    "  - {lr: 0.005, seed: 2, init: random, grad_clip: 0.05}\n")
    ok(cli("train_side", train_args(bb, task, tmp, "sw", "--sweep", str(tmp / "sweep.yaml"), "--sweep-stack", "always",
                                    *off)))
    for name, extra in (("lr0.003-seed0", ["--lr", "0.003", "--seed", "0"]),
                        ("lr0.01-seed1-weight_decay0.1", ["--lr", "0.01", "--seed", "1", "--weight-decay", "0.1"]),
                        ("lr0.005-seed2-initrandom-grad_clip0.05", ["--lr", "0.005", "--seed", "2", "--init", "random",
                                                                    "--grad-clip", "0.05"])):
        ok(cli("train_side", train_args(bb, task, tmp, f"alone-{name}", *extra, "--data-seed", "0", *off)))
        a, b = _weights(tmp / "sw" / name), _weights(tmp / f"alone-{name}")
        for k in a:
            # fused vs plain attention kernels round differently, and Adam amplifies that in tiny gradients
            assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3), (name, k, (a[k] - b[k]).abs().max())


def test_one_task_flag_is_enough_for_the_stages_to_find_each_other(tiny_bert, toy_task, tmp_path, monkeypatch):
    """cache_activations, prune_init, train_side and evaluate given only --task (and the backbone) read and
    write that task's folders; the side init records the task and its data hash, and another task's init is
    refused naming those fields."""
    from tests.conftest import write_task

    monkeypatch.chdir(tmp_path)
    common = ["--task", toy_task, "--device", "cpu"]
    ok(cli("cache_activations", ["--backbone", tiny_bert, "--dtype", "fp32", *common]))
    assert (tmp_path / "data" / "toy" / "cache" / "train.zarr").is_dir()
    ok(cli("prune_init", ["--backbone", tiny_bert, "--r", "4", "--fisher-samples", "8", *common]))
    assert (tmp_path / "data" / "toy" / "side_init.safetensors").is_file()
    ok(cli("train_side", ["--backbone", tiny_bert, "--r", "4", "--epochs", "1", "--batch-size", "16", *common]))
    assert (tmp_path / "runs" / "toy" / "side" / "side.safetensors").is_file()
    ok(cli("evaluate", common))
    assert json.loads((tmp_path / "runs" / "toy" / "side" / "eval" / "metrics.json").read_text())["examples"] > 0
    other = write_task(tmp_path / "other", seed=1).replace("toy/task.yaml", "task.yaml")
    (tmp_path / "other" / "task.yaml").write_text((tmp_path / "other" / "task.yaml").read_text().replace("name: toy",
                                                                                                      "name: other"))
    ok(cli("cache_activations", ["--backbone", tiny_bert, "--dtype", "fp32", "--task", other, "--device", "cpu"]))
    res = cli("train_side", ["--backbone", tiny_bert, "--r", "4", "--epochs", "1", "--task", other, "--device", "cpu",
                             "--side-init", str(tmp_path / "data" / "toy" / "side_init.safetensors")])
    assert res.exit_code == 2 and "task" in res.output and "train_hash" in res.output, res.output


def test_help_shows_the_value_a_run_will_use_and_where_it_comes_from(tmp_path):
    import subprocess
    import sys

    import click

    out = subprocess.run([sys.executable, "-m", "stages.train_side", "--help"], cwd=ROOT, capture_output=True,
                         text=True).stdout  # help reads ./params.yaml when the stage is imported
    assert "[default: 5 from params.yaml]" in " ".join(out.split())  # params.yaml's train_side.epochs
    (tmp_path / "p.yaml").write_text("train_side: {lr: 0.02}\n")

    @click.command()
    @C.click_options(C.TrainConfig, "train_side", str(tmp_path / "p.yaml"))
    def f(**kw):
        pass

    text = " ".join(CliRunner().invoke(f, ["--help"]).output.split())
    assert "[default: 0.02 from" in text and "[default: 10, built in]" in text  # lr from the file, epochs built in


def test_stage_help_needs_neither_torch_nor_transformers():
    import subprocess
    import sys

    for stage in ("cache_activations", "prune_init", "train_side", "evaluate", "predict", "inspect_cache", "tasks"):
        code = (f"import sys, stages.{stage}; heavy = [m for m in ('torch', 'transformers', 'zarr', 'pandas') "
                "if m in sys.modules]; print(heavy)")
        res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        assert res.stdout.strip() == "[]", (stage, res.stdout, res.stderr)


def test_the_package_docstring_lists_every_module():
    import pipeline

    listed = {line.split()[0] for line in pipeline.__doc__.splitlines() if line.startswith("  ") and line.strip()}
    files = {p.stem for p in (ROOT / "pipeline").glob("*.py") if p.stem != "__init__"}
    assert listed == files


def test_each_module_imports_only_modules_listed_above_it():
    import pipeline

    order = [line.split()[0] for line in pipeline.__doc__.splitlines() if line.startswith("  ") and line.strip()]
    for i, mod in enumerate(order):
        tree = ast.parse((ROOT / "pipeline" / f"{mod}.py").read_text())
        used = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
                used |= ({node.module.split(".")[1]} if "." in node.module else {a.name for a in node.names})
        assert used <= set(order[:i]), (mod, used - set(order[:i]))


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_a_stacked_sweep_runs_t5_and_decoder_side_nets_as_alone(family, tiny_t5, tiny_llama, toy_task, tmp_path):
    bb = tiny_t5 if family == "t5" else tiny_llama
    ok(cli("cache_activations", ["--backbone", bb, "--task", toy_task, "--out", str(tmp_path / "cache"),
                                 "--dtype", "fp32", "--device", "cpu"]))
    off = ["--dropout", "0", "--attn-dropout", "0", "--ff-dropout", "0", "--emb-dropout", "0", "--final-dropout", "0"]
    args = ["--epochs", "1", "--side-init", "", *off]
    (tmp_path / "sweep.yaml").write_text("lr: [0.003, 0.01]\n")
    ok(cli("train_side", train_args(bb, toy_task, tmp_path, "sw", "--sweep", str(tmp_path / "sweep.yaml"),
                                    "--sweep-stack", "always", *args)))
    ok(cli("train_side", train_args(bb, toy_task, tmp_path, "alone", "--lr", "0.01", "--data-seed", "0", *args)))
    a, b = _weights(tmp_path / "sw" / "lr0.01"), _weights(tmp_path / "alone")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3), (k, (a[k] - b[k]).abs().max())
