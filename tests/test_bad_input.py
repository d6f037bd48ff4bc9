"""The bad-input matrix: every input a user can get wrong, tried through the real CLIs, each answered
with exit status 2, exactly one `error:` line naming the field, file or value, and nothing written.

Each case builds its inputs in its own folder (`tmp_path`) and the check compares that folder's files
before and after the run: no file may appear, change or vanish. Stores and runs the cases read are
made once per module, outside that folder."""
from __future__ import annotations

import importlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from tests.conftest import TOKENIZER_FILES, write_task


def cli(module, args, stdin=None):
    main = importlib.import_module(f"stages.{module}").main
    return CliRunner().invoke(main, args, input=stdin)  # a traceback shows as exit code 1, not 2


def cpu(*args):
    return ["--params", "none", "--device", "cpu", *args]


# ---------------------------------------------------------------- shared stores, runs and backbones

def _variant_of(tiny_bert: str, folder: Path, change) -> str:
    """A copy of the tiny BERT with `change(model)` applied to its weights (same tokenizer files)."""
    from transformers import BertModel

    model = BertModel.from_pretrained(tiny_bert)
    with torch.no_grad():
        change(model)
    model.save_pretrained(folder)
    for f in TOKENIZER_FILES:
        if (Path(tiny_bert) / f).exists():
            shutil.copy(Path(tiny_bert) / f, folder / f)
    return str(folder)


@pytest.fixture(scope="module")
def shared(tiny_bert, tiny_t5, tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    s = {"root": root, "bb": tiny_bert, "t5": tiny_t5, "llama": tiny_llama}
    chat = root / "chat_llama"  # the tiny Llama with a chat template (its tokenizer has none)
    shutil.copytree(tiny_llama, chat)
    tc = json.loads((chat / "tokenizer_config.json").read_text())
    tc["chat_template"] = ("{% for m in messages %}[ {{ m['role'] }} ] {{ m['content'] }} [ end ] {% endfor %}"
                           "{% if add_generation_prompt %}[ assistant ]{% endif %}")
    (chat / "tokenizer_config.json").write_text(json.dumps(tc))
    s["chat_llama"] = str(chat)
    s["multi_task"] = str(root / "toy" / "multi.yaml")
    s["task"] = write_task(root / "toy")
    Path(s["multi_task"]).write_text(Path(s["task"]).read_text().replace(
        "verbalizers: [negative, positive]", "verbalizers: [very bad, rather good]"))  # two WordPiece tokens each
    s["pair_task"] = write_task(root / "pair", pair=True)
    s["reg_task"] = write_task(root / "reg", kind="regression")
    s["other_task"] = str(root / "toy" / "other.yaml")
    Path(s["other_task"]).write_text(Path(s["task"]).read_text().replace("name: toy", "name: other"))
    s["reg_nobins"] = str(root / "reg" / "nobins.yaml")
    Path(s["reg_nobins"]).write_text(Path(s["reg_task"]).read_text().replace("regression_bins: [-3, -2, -1, 0, 1, 2, 3]\n", ""))
    s["other_bb"] = _variant_of(tiny_bert, root / "other_bert", lambda m: m.encoder.layer[0].output.dense.weight.mul_(1.5))
    s["nan_bb"] = _variant_of(tiny_bert, root / "nan_bert",
                              lambda m: m.encoder.layer[1].output.dense.bias.fill_(float("inf")))
    damaged = root / "damaged_bert"
    shutil.copytree(tiny_bert, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    s["damaged_bb"] = str(damaged)

    def cache(out, backbone=tiny_bert, task=s["task"], *extra):
        res = cli("cache_activations", cpu("--backbone", backbone, "--task", task, "--out", str(root / out),
                                           "--dtype", "fp32", *extra))
        assert res.exit_code == 0, res.output
        return str(root / out)

    def train(out, cache_dir, task=s["task"], backbone=tiny_bert):
        res = cli("train_side", cpu("--backbone", backbone, "--task", task, "--cache", cache_dir, "--out",
                                    str(root / out), "--r", "4", "--epochs", "1", "--batch-size", "16",
                                    "--init", "magnitude"))
        assert res.exit_code == 0, res.output
        return str(root / out)

    s["cache"] = cache("cache")
    s["cache_l01"] = cache("cache_l01", tiny_bert, s["task"], "--layers", "0,1")
    s["cache_other_bb"] = cache("cache_other_bb", s["other_bb"])
    s["cache_len32"] = cache("cache_len32", tiny_bert, s["task"], "--max-length", "32")
    s["run"] = train("run", s["cache"])
    s["pair_run"] = train("pair_run", cache("cache_pair", tiny_bert, s["pair_task"]), s["pair_task"])
    return s


@contextmanager
def file_size_limit(nbytes: int):
    """The kernel refuses to grow any file past `nbytes` (EFBIG), as a full disk refuses (ENOSPC): a real
    write failure, inside this process, for root too. SIGXFSZ is ignored so the write fails instead of
    killing the process. 16 KiB lets the small JSON files through and stops weights and checkpoints."""
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


FULL = 16 << 10


@contextmanager
def read_only(folder: Path):
    """`folder` on a read-only file system: permission bits for a normal user; root ignores those, so
    there a read-only tmpfs is mounted over it (skipped where root cannot mount)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("running as root where tmpfs cannot be mounted: no read-only folder to try")
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


# ---------------------------------------------------------------- the cases

@dataclass
class Case:
    stage: str
    args: list
    match: str  # regex the error line must match: the field, file or value, and what is wrong
    ctx: object = None  # a context manager around the run (full disk, read-only folder)
    stdin: str | None = None
    leaves: frozenset = frozenset()  # whole files a case may leave (each named where the case is defined)


def csv_task(p: Path, rows, text_col="sentence1", pair_col=None, raw: bytes | None = None) -> str:
    """A one-split local task; `raw` replaces the CSV bytes."""
    if raw is not None:
        (p / "train.csv").write_bytes(raw)
    else:
        pd.DataFrame(rows).to_csv(p / "train.csv", index=False)
    cols = f"[{text_col}, {pair_col}]" if pair_col else f"[{text_col}]"
    (p / "t.yaml").write_text(f"kind: classification\ntext_columns: {cols}\nlabel_column: label\n"
                              "label_names: [a, b]\nfiles: {train: train.csv}\n")
    return str(p / "t.yaml")


def params(p: Path, text: str) -> str:
    (p / "params.yaml").write_text(text)
    return str(p / "params.yaml")


def ok_task(p):
    return csv_task(p, [{"sentence1": "fine", "label": 0}, {"sentence1": "bad", "label": 1}])


def cache_case(p, s, *args, match):
    return Case("cache_activations", cpu("--backbone", s["bb"], "--splits", "train", "--out", str(p / "out"),
                                         *args), match)


def train_case(p, s, *args, match, cache=None, ctx=None, bb=None, leaves=frozenset()):
    return Case("train_side", cpu("--backbone", bb or s["bb"], "--task", s["task"], "--cache", cache or s["cache"],
                                  "--out", str(p / "run"), "--r", "4", "--epochs", "1", "--batch-size", "16",
                                  "--init", "magnitude", *args), match, ctx, leaves=leaves)


def eval_case(p, s, *args, match, cache=None, run=None):
    return Case("evaluate", cpu("--run", run or s["run"], "--cache", cache or s["cache"], "--out", str(p / "eval"),
                                *args), match)


def predict_case(p, s, text, *args, match, run=None, ctx=None, raw: bytes | None = None):
    (p / "in.txt").write_bytes(raw if raw is not None else text.encode())
    return Case("predict", [str(p / "in.txt"), "--run", run or s["run"], "--out", str(p / "pred.jsonl"),
                            "--device", "cpu", *args], match, ctx)


def params_case(p, s, line, match):
    """train_side with one bad line in its params.yaml section (no flag overrides the field)."""
    body = "\n  ".join([line, f"backbone: {s['bb']}", f"task: {s['task']}", f"cache: {s['cache']}", f"out: {p / 'run'}",
                        "device: cpu"])
    return Case("train_side", ["--params", params(p, f"train_side:\n  {body}\n")], match)


def run_copy_with_backbone(p, s, backbone):
    """The trained run, pointed at another backbone folder (as if that folder changed after training)."""
    run = p / "run_copy"
    shutil.copytree(s["run"], run)
    meta = json.loads((run / "side_config.json").read_text())
    meta["backbone"] = backbone
    (run / "side_config.json").write_text(json.dumps(meta))
    return str(run)


def lock_held_by_a_live_process(p, s):
    import psutil

    (p / "out").mkdir()
    owner = psutil.Process(os.getppid())  # alive for the whole test: pytest's parent
    (p / "out" / "train.zarr.lock").write_text(json.dumps({"pid": owner.pid, "host": os.uname().nodename,
                                                           "started": owner.create_time()}))
    return cache_case(p, s, "--task", ok_task(p), match=rf"in use by pid {owner.pid} .*train\.zarr\.lock")


CASES = {
    # -- stage one: data files
    "unknown task": lambda p, s: cache_case(p, s, "--task", "nope", match="unknown task 'nope'"),
    "task yaml missing": lambda p, s: cache_case(p, s, "--task", str(p / "none.yaml"), match=r"none\.yaml does not exist"),
    "task yaml syntax error": lambda p, s: cache_case(
        p, s, "--task", (p / "t.yaml").write_text("kind: [classification\n") and str(p / "t.yaml"),
        match=r"t\.yaml: not valid YAML at line \d+"),
    "missing column": lambda p, s: cache_case(p, s, "--task", csv_task(p, [{"sentence1": "x", "label": 0}], "text"),
                                              match="missing column 'text'"),
    "empty text": lambda p, s: cache_case(
        p, s, "--task", csv_task(p, [{"sentence1": "ok", "label": 0}, {"sentence1": " ", "label": 1}]),
        match="row 1 has empty text"),
    "label outside the label set": lambda p, s: cache_case(
        p, s, "--task", csv_task(p, [{"sentence1": "ok", "label": 5}]), match="outside the label set"),
    "label not a name or number": lambda p, s: cache_case(
        p, s, "--task", csv_task(p, [{"sentence1": "ok", "label": "maybe"}]), match="label 'maybe' is not in"),
    "non-finite regression target": lambda p, s: Case("cache_activations", cpu(
        "--backbone", s["bb"], "--task", _nan_target(p, s), "--out", str(p / "out")), "non-finite regression target"),
    "empty split (header only)": lambda p, s: cache_case(
        p, s, "--task", csv_task(p, None, raw=b"sentence1,label\n"), match="split 'train' is empty"),
    "empty csv (0 bytes)": lambda p, s: cache_case(p, s, "--task", csv_task(p, None, raw=b""),
                                                   match=r"train\.csv: the file is empty"),
    "non-UTF-8 csv": lambda p, s: cache_case(
        p, s, "--task", csv_task(p, None, raw=b"sentence1,label\nfine,0\nna\xefve caf\xe9,1\n"),
        match=r"train\.csv: line 3 is not UTF-8 \(byte 0xef"),
    "malformed csv": lambda p, s: cache_case(
        p, s, "--task", csv_task(p, None, raw=b'sentence1,label\n"unclosed,0\n'), match=r"train\.csv: cannot be read"),
    "pair task with an empty second text": lambda p, s: cache_case(
        p, s, "--task", csv_task(p, [{"sentence1": "a", "sentence2": "b", "label": 0},
                                     {"sentence1": "a", "sentence2": None, "label": 1}], pair_col="sentence2"),
        match=r"row 1 has an empty second text \(sentence2\)"),
    "split not in the task": lambda p, s: Case("cache_activations", cpu(
        "--backbone", s["bb"], "--task", ok_task(p), "--splits", "dev", "--out", str(p / "out")), r"\['dev'\] not in task"),
    # -- stage one: config and backbone
    "layer out of range": lambda p, s: cache_case(p, s, "--task", ok_task(p), "--layers", "0,7",
                                                  match=r"layers: \[7\] out of range"),
    "max_length 0": lambda p, s: cache_case(p, s, "--max-length", "0", match="max_length: must be a positive"),
    "max_length above the position limit": lambda p, s: cache_case(
        p, s, "--task", ok_task(p), "--max-length", "200", match=r"max_length: 200 is above the position limit .*128"),
    "batch_size 0 (stage one)": lambda p, s: cache_case(p, s, "--batch-size", "0", match="batch_size: must be positive"),
    "limit -5 (stage one)": lambda p, s: cache_case(p, s, "--limit", "-5", match="limit: must be >= 0"),
    "dtype not a choice": lambda p, s: cache_case(p, s, "--dtype", "fp8", match="dtype: 'fp8' is not one of"),
    "shard not a multiple of chunk": lambda p, s: cache_case(p, s, "--shard-tokens", "100", match="shard_tokens: 100"),
    "scheduler local:0": lambda p, s: cache_case(p, s, "--scheduler", "local:0", match=r"scheduler: 'local:0': write local:N"),
    "scheduler neither local nor an address": lambda p, s: cache_case(
        p, s, "--scheduler", "cluster", match=r"scheduler: 'cluster' is not '', 'local', 'local:N' or a scheduler address"),
    "threads -1": lambda p, s: cache_case(p, s, "--threads", "-1", match="threads: must be >= 0"),
    "out is an object-store URL": lambda p, s: cache_case(
        p, s, "--task", ok_task(p), "--out", "s3://bucket/cache", match=r"out: s3://bucket/cache is a URL"),
    "backbone folder missing": lambda p, s: Case("cache_activations", cpu(
        "--backbone", str(p / "no_model"), "--task", ok_task(p), "--out", str(p / "out")), "cannot load config"),
    "backbone weights damaged": lambda p, s: Case("cache_activations", cpu(
        "--backbone", s["damaged_bb"], "--task", ok_task(p), "--splits", "train", "--out", str(p / "out")),
        r"weight file .*damaged_bert/model\.safetensors is damaged"),
    "backbone gives inf/NaN": lambda p, s: Case("cache_activations", cpu(
        "--backbone", s["nan_bb"], "--task", ok_task(p), "--splits", "train", "--out", str(p / "out")),
        r"nan_bert/model\.safetensors\) gave inf/NaN in state src_01 for examples 0\.\.1"),
    "T5 regression task without regression_bins": lambda p, s: Case("cache_activations", cpu(
        "--backbone", s["t5"], "--task", s["reg_nobins"], "--out", str(p / "out")), "regression_bins is empty"),
    "output under a file": lambda p, s: Case("cache_activations", cpu(
        "--backbone", s["bb"], "--task", ok_task(p), "--splits", "train",
        "--out", str((p / "f").write_text("x") and p / "f" / "cache")), r"(Not a directory|File exists).*f"),
    "second stage-one writer on the same --out": lock_held_by_a_live_process,
    # -- params.yaml
    "params: YAML syntax error": lambda p, s: Case("cache_activations", [
        "--params", params(p, "cache_activations:\n  batch_size: [1\n"), "--device", "cpu"],
        r"params\.yaml: not valid YAML at line \d+, column \d+"),
    "params: unknown key": lambda p, s: Case("train_side", [
        "--params", params(p, "train_side:\n  learning_rate: 0.1\n")], "unknown key.*learning_rate"),
    "params: epochs 1.9": lambda p, s: params_case(p, s, "epochs: 1.9", r"\[train_side\] epochs: 1\.9 is not a whole number"),
    "params: epochs true": lambda p, s: params_case(p, s, "epochs: true", r"\[train_side\] epochs: True is not a whole number"),
    "params: layers 3": lambda p, s: params_case(p, s, "layers: 3", r"\[train_side\] layers: 3 is not text"),
    "params: lr .inf": lambda p, s: params_case(p, s, "lr: .inf", r"\[train_side\] lr: inf is not a finite number"),
    "params: resume yes-string": lambda p, s: params_case(p, s, "resume: 'yes'", r"\[train_side\] resume: 'yes' is not true or false"),
    "params: section not a mapping": lambda p, s: Case("evaluate", [
        "--params", params(p, "evaluate: 5\n")], "section 'evaluate' must be a mapping"),
    # -- train_side
    "lr inf": lambda p, s: train_case(p, s, "--lr", "inf", match="--lr: inf is not a finite number"),
    "lr 0": lambda p, s: train_case(p, s, "--lr", "0", match="lr: must be a finite number > 0"),
    "limit -5": lambda p, s: train_case(p, s, "--limit", "-5", match="limit: must be >= 0"),
    "epochs 0": lambda p, s: train_case(p, s, "--epochs", "0", match="epochs: must be >= 1"),
    "dropout 1.5": lambda p, s: train_case(p, s, "--dropout", "1.5", match=r"dropout: must be in \[0, 1\)"),
    "fisher init without side init": lambda p, s: train_case(p, s, "--init", "fisher", match="fisher needs --side-init"),
    "side init missing": lambda p, s: train_case(p, s, "--side-init", str(p / "none.safetensors"),
                                                 match=r"side_init: .*none\.safetensors does not exist"),
    "side init made for another r": lambda p, s: train_case(p, s, "--side-init", _side_init(p, s, "2"),
                                                            match="differing fields: r"),
    "cache missing": lambda p, s: train_case(p, s, cache=str(p / "nocache"), match="no ladder store here"),
    "cache of another task": lambda p, s: Case("train_side", cpu(
        "--backbone", s["bb"], "--task", s["other_task"], "--cache", s["cache"], "--out", str(p / "run"), "--r", "4",
        "--init", "magnitude"), "differing fields: task"),
    "cache of another backbone": lambda p, s: train_case(p, s, bb=s["other_bb"],
                                                         match="differing fields: backbone_sha256"),
    "cache of another backbone and max_length": lambda p, s: train_case(
        p, s, "--max-length", "32", bb=s["other_bb"], match="differing fields: backbone_sha256, max_length"),
    "--backbone forgotten (default MiniLM)": lambda p, s: Case("train_side", cpu(
        "--task", s["task"], "--cache", s["cache"], "--out", str(p / "run"), "--init", "magnitude"),
        "differing fields: backbone_sha256"),
    "cache lacks the layers": lambda p, s: train_case(p, s, cache=s["cache_l01"], match=r"lacks states \['src_02'\]"),
    # the epoch-1 curve row is written whole before the checkpoint fails; the final artifacts are not
    "train_side onto a full disk": lambda p, s: train_case(p, s, ctx=file_size_limit(FULL), leaves={"run/plots/curves.csv"},
                                                           match=r"run/\S+: cannot write it \("),
    "train_side onto a read-only folder": lambda p, s: train_case(
        p, s, "--out", str(p / "ro" / "run"), ctx=read_only(p / "ro"), match=r"Read-only file system.*ro/run|ro/run.*not writable"),
    # -- prune_init
    "prune_init fisher, T5 regression without bins": lambda p, s: Case("prune_init", cpu(
        "--backbone", s["t5"], "--task", s["reg_nobins"], "--init", "fisher", "--fisher-samples", "4", "--r", "4",
        "--out", str(p / "init.safetensors")), "regression_bins is empty"),
    "prune_init init not a choice": lambda p, s: Case("prune_init", cpu(
        "--backbone", s["bb"], "--task", s["task"], "--init", "best", "--out", str(p / "i.safetensors")),
        "init: 'best' is not one of"),
    "prune_init max_length above the position limit": lambda p, s: Case("prune_init", cpu(
        "--backbone", s["bb"], "--task", s["task"], "--max-length", "4096", "--out", str(p / "i.safetensors")),
        "max_length: 4096 is above the position limit"),
    "prune_init onto a full disk": lambda p, s: Case("prune_init", cpu(
        "--backbone", s["bb"], "--task", s["task"], "--r", "2", "--init", "magnitude", "--out",
        str(p / "init.safetensors")), r"init\.safetensors: cannot write it \(.*File too large", file_size_limit(FULL)),
    "prune_init onto a read-only folder": lambda p, s: Case("prune_init", cpu(
        "--backbone", s["bb"], "--task", s["task"], "--r", "4", "--init", "magnitude", "--out",
        str(p / "ro" / "init.safetensors")), r"ro/init\.safetensors: cannot write it, .*not writable", read_only(p / "ro")),
    # -- evaluate
    "evaluate batch size 0": lambda p, s: eval_case(p, s, "--batch-size", "0", match="batch_size: must be >= 1"),
    "evaluate without a run": lambda p, s: eval_case(p, s, run=str(p / "norun"), match="has no side_config.json"),
    "evaluate a cache of another backbone": lambda p, s: eval_case(p, s, cache=s["cache_other_bb"],
                                                                   match="differing fields: backbone_sha256"),
    "evaluate a cache of another max_length": lambda p, s: eval_case(p, s, cache=s["cache_len32"],
                                                                     match="differing fields: max_length"),
    "evaluate a cache lacking the layers": lambda p, s: eval_case(p, s, cache=s["cache_l01"],
                                                                  match=r"lacks states \['src_02'\]"),
    "evaluate without the train split": lambda p, s: eval_case(p, s, cache=_only_test(p, s),
                                                               match="baseline needs the train split"),
    # -- predict
    "predict batch size 0": lambda p, s: predict_case(p, s, "good\n", "--batch-size", "0",
                                                      match="--batch-size: must be >= 1"),
    "predict blank line inside the input": lambda p, s: predict_case(p, s, "good film\n\nbad film\n",
                                                                     match=r"in\.txt: line 2 is blank"),
    "predict non-UTF-8 input": lambda p, s: predict_case(p, s, "", raw=b"good\ncaf\xe9\n",
                                                         match=r"in\.txt: line 2 is not UTF-8 \(byte 0xe9"),
    "predict empty input": lambda p, s: predict_case(p, s, "\n\n", match="no input lines"),
    "predict input file missing": lambda p, s: Case("predict", [str(p / "none.txt"), "--run", s["run"]],
                                                    r"none\.txt: input file does not exist"),
    "predict pair task, line without its second text": lambda p, s: predict_case(
        p, s, "good\tfine\nbad film\n", run=s["pair_run"], match=r"line 2 lacks its second text \(sentence2\)"),
    "predict pair task, empty second text": lambda p, s: predict_case(
        p, s, "good\t \n", run=s["pair_run"], match=r"line 1 lacks its second text"),
    "predict single-text task, line with a tab": lambda p, s: predict_case(p, s, "good\tfilm\n",
                                                                           match="line 1 has a tab"),
    "predict with a backbone changed since training": lambda p, s: predict_case(
        p, s, "good\n", run=run_copy_with_backbone(p, s, s["other_bb"]), match="differing fields: backbone_sha256"),
    "predict with a damaged backbone": lambda p, s: predict_case(
        p, s, "good\n", run=run_copy_with_backbone(p, s, s["damaged_bb"]), match=r"damaged_bert/model\.safetensors is damaged"),
    "predict onto a full disk": lambda p, s: predict_case(
        p, s, "a good film with a fine plot\n" * 300, ctx=file_size_limit(FULL),
        match=r"pred\.jsonl: cannot write it \(.*File too large"),
    "predict onto a read-only folder": lambda p, s: Case("predict", [
        (p / "in.txt").write_text("good\n") and str(p / "in.txt"), "--run", s["run"], "--out", str(p / "ro" / "p.jsonl")],
        r"ro/p\.jsonl: cannot write it, .*not writable", read_only(p / "ro")),
    # -- inspect_cache
    "inspect a folder that is not a store": lambda p, s: Case("inspect_cache", [str(p)], "no ladder store here"),
    "inspect an interrupted store": lambda p, s: Case("inspect_cache", [_interrupted(p, s)], "store is incomplete"),
    # -- decoder-only prompts, GGUF backbones, generation targets, QST options (issue 12)
    "prompt_format not a choice": lambda p, s: cache_case(p, s, "--prompt-format", "xml",
                                                          match="prompt_format: 'xml' is not one of plain, chat"),
    "chat prompts for an encoder backbone": lambda p, s: cache_case(
        p, s, "--task", ok_task(p), "--prompt-format", "chat", match="prompt_format: chat formats decoder-only prompts"),
    "chat prompts, tokenizer without a chat template": lambda p, s: Case("cache_activations", cpu(
        "--backbone", s["llama"], "--task", ok_task(p), "--splits", "train", "--prompt-format", "chat", "--out",
        str(p / "out")),
        "prompt_format: chat needs a tokenizer with a chat template"),
    "chat template longer than max_length": lambda p, s: Case("cache_activations", cpu(
        "--backbone", s["chat_llama"], "--task", ok_task(p), "--splits", "train", "--prompt-format", "chat",
        "--max-length", "12",
        "--out", str(p / "out")), r"max_length: 12 tokens leave no room for the text: the chat template takes \d+"),
    "GGUF folder with two files": lambda p, s: Case("cache_activations", cpu(
        "--backbone", _two_ggufs(p), "--task", ok_task(p), "--out", str(p / "out")), r"holds several GGUF files"),
    "GGUF file that is not GGUF": lambda p, s: Case("cache_activations", cpu(
        "--backbone", (p / "m.gguf").write_bytes(b"not a model" * 10) and str(p / "m.gguf"), "--task", ok_task(p),
        "--out", str(p / "out")), r"m\.gguf is damaged \(it does not start with the GGUF magic bytes\)"),
    "generation task on an encoder backbone": lambda p, s: cache_case(
        p, s, "--task", _gen_task(p, "an answer"), match="a generation task .* needs a decoder-only backbone"),
    "generation task with an empty target": lambda p, s: Case("cache_activations", cpu(
        "--backbone", s["llama"], "--task", _gen_task(p, None), "--out", str(p / "out")), "row 1 has an empty target text"),
    "downsampler not a choice": lambda p, s: train_case(p, s, "--downsampler", "conv",
                                                        match="downsampler: 'conv' is not one of linear, lowrank"),
    "downsampler_rank 0": lambda p, s: train_case(p, s, "--downsampler-rank", "0", match="downsampler_rank: must be >= 1"),
    "gate not a choice": lambda p, s: train_case(p, s, "--gate", "scalar", match="gate: .scalar. is not one of lst, qst"),
    "r leaving odd rotary side heads": lambda p, s: Case("prune_init", cpu(
        "--backbone", s["llama"], "--task", s["task"], "--r", "8", "--init", "random", "--out", str(p / "i.safetensors")),
        r"r: 8 leaves side heads of 1 dims .* rotary"),
    "cross_attention with multi-token verbalizers": lambda p, s: Case("prune_init", cpu(
        "--backbone", s["llama"], "--task", s["multi_task"], "--r", "2", "--variant", "cross_attention", "--init",
        "random", "--out", str(p / "i.safetensors")), "variant: cross_attention .* cannot continue a prompt"),
    "predict --max-new-tokens 0": lambda p, s: predict_case(p, s, "good\n", "--max-new-tokens", "0",
                                                            match="--max-new-tokens: must be >= 1"),
}


def _two_ggufs(p):
    from pipeline.backbone import SMOLLM2, resolve

    (p / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (p / "two" / name).symlink_to(resolve(SMOLLM2))
    return str(p / "two")


def _gen_task(p, answer):
    pd.DataFrame([{"sentence1": "fine", "answer": "yes"}, {"sentence1": "bad", "answer": answer}]).to_csv(
        p / "gen.csv", index=False)
    (p / "g.yaml").write_text("kind: generation\ntext_columns: [sentence1]\nlabel_column: answer\n"
                              "files: {train: gen.csv, validation: gen.csv, test: gen.csv}\n")
    return str(p / "g.yaml")


def _nan_target(p, s):
    task = write_task(p / "reg", kind="regression", n_train=6, n_eval=3)
    train = p / "reg" / "train.csv"
    lines = train.read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",nan"
    train.write_text("\n".join(lines) + "\n")
    return task


def _side_init(p, s, r):
    res = cli("prune_init", cpu("--backbone", s["bb"], "--task", s["task"], "--r", r, "--init", "magnitude",
                                "--out", str(p / "init.safetensors")))
    assert res.exit_code == 0, res.output
    return str(p / "init.safetensors")


def _only_test(p, s):
    shutil.copytree(Path(s["cache"]) / "test.zarr", p / "c" / "test.zarr")
    return str(p / "c")


def _interrupted(p, s):
    store = p / "c" / "train.zarr"
    shutil.copytree(Path(s["cache"]) / "train.zarr", store)
    from pipeline import ladder_store as ls

    rec = json.loads((store / ls.PROGRESS).read_text())
    ls.write_record(store, rec["fingerprint"], rec["shards"], rec["files"], False)
    return str(store)


def files_under(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(f.relative_to(folder)): (f.stat().st_size, f.stat().st_mtime_ns)
            for f in folder.rglob("*") if f.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error_and_leaves_nothing(case, shared, tmp_path):
    c = CASES[case](tmp_path, shared)
    before = files_under(tmp_path)
    with c.ctx or nullcontext():
        res = cli(c.stage, c.args, c.stdin)
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1, (res.exit_code, res.output[-3000:], res.exception)
    assert re.search(c.match, errors[0]), errors[0]
    after = files_under(tmp_path)
    assert {k: v for k, v in after.items() if k not in c.leaves} == before  # nothing written, changed or removed
    assert not [k for k in after if k.endswith(".tmp")]  # and nothing half-written


def test_prune_init_fisher_on_an_encoder_regression_task_without_bins_works(shared, tmp_path):
    """Encoders regress with a head: the empirical Fisher needs no verbalizer bins there."""
    res = cli("prune_init", cpu("--backbone", shared["bb"], "--task", shared["reg_nobins"], "--init", "fisher",
                                "--fisher-samples", "8", "--r", "4", "--out", str(tmp_path / "init.safetensors")))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "init.safetensors").exists()


def test_a_stale_lock_from_a_dead_process_is_taken_over(shared, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its pid names no process now
    out = tmp_path / "out"
    out.mkdir()
    lock = out / "train.zarr.lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": 0.0}))
    res = cli("cache_activations", cpu("--backbone", shared["bb"], "--task", shared["task"], "--splits", "train",
                                       "--out", str(out)))
    assert res.exit_code == 0, res.output
    assert not lock.exists() and (out / "train.zarr" / "_progress.json").exists()


def test_a_lock_whose_pid_was_reused_by_another_process_is_stale(shared, tmp_path):
    """The pid is alive but started at another time than the lock records: not the owner."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.zarr.lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                                     "started": 12345.0}))
    res = cli("cache_activations", cpu("--backbone", shared["bb"], "--task", shared["task"], "--splits", "train",
                                       "--out", str(out)))
    assert res.exit_code == 0, res.output


def test_predict_keeps_one_record_per_input_line(shared, tmp_path):
    (tmp_path / "in.txt").write_text("good film\nbad plot\n\n")  # trailing blank lines are not examples
    res = cli("predict", [str(tmp_path / "in.txt"), "--run", shared["run"], "--out", str(tmp_path / "p.jsonl"),
                          "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["good film", "bad plot"]


@pytest.mark.parametrize("name,file", [("sentence-transformers/all-MiniLM-L6-v2", r"model\.safetensors"),
                                       ("smollm2-135m-instruct", r"SmolLM2-135M-Instruct\.Q4_1\.gguf")])
def test_an_offline_embedded_copy_is_checked_against_its_recorded_sha256(name, file, monkeypatch):
    """A damaged copy of a packaged backbone (same file names, other bytes) fails at load naming the file."""
    import dataclasses

    from pipeline import backbone as bbm
    from pipeline.errors import BackboneError

    # as if the file's bytes had changed: the recorded hash no longer matches them
    monkeypatch.setitem(bbm.EMBEDDED, name, dataclasses.replace(bbm.EMBEDDED[name], weights_sha256="0" * 64))
    bbm._FILE_SHA.clear()
    with pytest.raises(BackboneError, match=rf"{file} \(the offline copy of {name}\) has sha256"):
        bbm.weights_sha256(name)
