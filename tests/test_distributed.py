"""Past one process: stage one on dask.distributed workers writes the in-process store bit for bit (every file),
through a killed worker and a killed client; stage two under torchrun (DDP, gloo) follows the one-process curve."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cache_cluster import (
    CLIENT_KILL_ENV,
    WORKER_KILL_ENV,
    connect,
    plan_ranges,
)
from pipeline.config import CacheConfig
from pipeline.errors import StoreError
from pipeline.ladder_store import LadderStore

ROOT = Path(__file__).resolve().parents[1]
# a real task's text and lengths (rt snippets, ~28 tokens each); shards of 256 tokens, so that 240 examples make
# 26 shards (7 ranges of 4 on 2 workers), and batches of 16, so that most ranges start a batch before their rows
SLICE = ["--task", "rt-sentiment", "--splits", "train", "--limit", "240", "--shard-tokens", "256", "--chunk-tokens",
         "64", "--batch-size", "16", "--device", "cpu", "--threads", "1"]


def stage_one(backbone, data_dir, out, *extra):
    from stages.cache_activations import main

    args = ["--params", "none", "--backbone", backbone, "--data-dir", str(data_dir), "--out", str(out), *SLICE, *extra]
    return CliRunner().invoke(main, args, catch_exceptions=False)


def differing_files(a: Path, b: Path) -> list[str]:
    """Files of two folders that are missing from one or differ in a single byte."""
    fa = {p.relative_to(a).as_posix(): p for p in a.rglob("*") if p.is_file()}
    fb = {p.relative_to(b).as_posix(): p for p in b.rglob("*") if p.is_file()}
    return sorted(k for k in fa.keys() | fb.keys() if k not in fa or k not in fb or fa[k].read_bytes() != fb[k].read_bytes())


@pytest.fixture(scope="module")
def rt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("rt_raw")


@pytest.fixture(scope="module")
def reference(tiny_t5, tiny_bert, rt_dir, tmp_path_factory):
    """The in-process stores, one per family."""
    refs = {}
    for family, bb in (("t5", tiny_t5), ("bert", tiny_bert)):
        out = tmp_path_factory.mktemp(f"ref_{family}")
        res = stage_one(bb, rt_dir, out)
        assert res.exit_code == 0, res.output
        refs[family] = out
    return refs


@pytest.fixture(scope="module")
def cluster():
    """The LocalCluster `--scheduler local:2` starts (two worker processes, one torch thread each), shared by
    the tests below through its address: each worker process costs a torch import and a backbone load."""
    logs, environ = [], dict(os.environ)
    with connect(CacheConfig(scheduler="local:2", threads=1), logs.append) as client:
        yield client.scheduler.address, client, logs
    # distributed's nannies set OMP_NUM_THREADS=1 (and more) in this process's environment; connect() puts
    # it back, else every later subprocess (other tests' CLI runs) would run torch on one thread
    assert dict(os.environ) == environ


def test_ranges_write_every_shard_once_and_start_on_forward_batch_boundaries():
    """Each shard has one writer; a range's batches start at a multiple of batch_size and cover its rows; its
    neighbours repeat at most one batch; the handed-over examples (T5's tgt rows) partition the split."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 200))
        lengths = rng.integers(1, 40, n)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        shard, bs, want = int(rng.choice([8, 16, 64, 256])), int(rng.integers(1, 20)), int(rng.integers(1, 12))
        ranges = plan_ranges(offsets, shard, bs, want)
        n_shards = -(-int(offsets[-1]) // shard)
        assert [j for r in ranges for j in range(*r.shards)] == list(range(n_shards)), trial
        assert len(ranges) <= want
        for k, r in enumerate(ranges):
            e0, e1 = r.examples
            assert e0 % bs == 0 and (e1 % bs == 0 or e1 == n)
            assert offsets[e0] <= r.shards[0] * shard and offsets[e1] >= min(r.shards[1] * shard, offsets[-1])
            assert r.examples[0] <= r.handover[0] <= r.handover[1] <= r.examples[1]
            if k:
                assert ranges[k - 1].examples[1] - e0 <= bs  # the one batch both neighbours run
        assert [e for r in ranges for e in range(*r.handover)] == list(range(n))


def test_a_local_cluster_of_2_workers_writes_the_in_process_store_bit_for_bit(tiny_bert, rt_dir, reference, cluster,
                                                                            tmp_path):
    address, _, logs = cluster
    assert "dask: 2 workers" in logs[0] and "dashboard http://" in logs[0]
    res = stage_one(tiny_bert, rt_dir, tmp_path / "cluster", "--scheduler", address)
    assert res.exit_code == 0, res.output
    ranges = re.search(r"(\d+) ranges of \1 to run \(0 already recorded\)", res.output)
    assert "loaded on 2 workers" in res.output and ranges and int(ranges[1]) >= 4  # several per worker
    assert differing_files(reference["bert"], tmp_path / "cluster") == []
    again = stage_one(tiny_bert, rt_dir, tmp_path / "cluster", "--scheduler", address)
    assert again.exit_code == 0 and "nothing to do" in again.output


def test_a_cluster_writes_the_in_process_train_mode_dropout_pass_bit_for_bit(dropout_bert, rt_dir, cluster, tmp_path):
    # each window's masks come from (seed, pass, window start), whichever process runs it
    one = stage_one(dropout_bert, rt_dir, tmp_path / "one", "--dropout-passes", "1")
    two = stage_one(dropout_bert, rt_dir, tmp_path / "two", "--dropout-passes", "1", "--scheduler", cluster[0])
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    assert differing_files(tmp_path / "one" / "train.dropout0.zarr", tmp_path / "two" / "train.dropout0.zarr") == []
    assert differing_files(tmp_path / "one" / "train.dropout0.zarr", tmp_path / "one" / "train.zarr") != []


def test_a_worker_killed_mid_run_still_gives_the_same_store(tiny_t5, rt_dir, reference, cluster, tmp_path):
    """The first worker to write a shard dies (SIGKILL) right after the write: dask runs its range again, and
    any finished range whose handed-over T5 rows died with it, on the live or restarted worker."""
    address, client, _ = cluster
    marker = tmp_path / "killed"
    client.run(lambda k, v: os.environ.__setitem__(k, v), WORKER_KILL_ENV, str(marker))
    try:
        res = stage_one(tiny_t5, rt_dir, tmp_path / "out", "--scheduler", address)
    finally:
        client.run(lambda k: os.environ.pop(k, None), WORKER_KILL_ENV)
    assert res.exit_code == 0, res.output
    assert marker.exists()  # a worker really died
    assert differing_files(reference["t5"], tmp_path / "out") == []


def test_the_client_killed_then_resumed_gives_the_same_store(tiny_t5, rt_dir, reference, cluster, tmp_path):
    """The stage's own process SIGKILLed after recording 3 tasks: the store is incomplete (never read); a rerun
    with --resume, on the cluster or in one process, runs only what the record lacks and ends identical."""
    address, _, _ = cluster
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "stages.cache_activations", "--params", "none", "--backbone", tiny_t5, "--data-dir",
           str(rt_dir), "--out", str(out), *SLICE, "--scheduler", address]
    died = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **{CLIENT_KILL_ENV: "3"}), capture_output=True, text=True)
    assert died.returncode == -9, died.stderr[-2000:]
    with pytest.raises(StoreError, match="incomplete"):
        LadderStore(out / "train.zarr")
    record = json.loads((out / "train.zarr" / "_progress.json").read_text())
    assert not record["complete"] and any(k.startswith("layers/") for k in record["files"])
    shutil.copytree(out, tmp_path / "copy")  # the same partial store, finished in one process below
    res = stage_one(tiny_t5, rt_dir, out, "--scheduler", address, "--resume")
    assert res.exit_code == 0, res.output
    assert "already recorded" in res.output
    assert differing_files(reference["t5"], out) == []
    res = stage_one(tiny_t5, rt_dir, tmp_path / "copy", "--resume")  # from the record's leading run of shards
    assert res.exit_code == 0, res.output
    assert differing_files(reference["t5"], tmp_path / "copy") == []


# ---------------------------------------------------------------- stage two: DDP under torchrun

NO_DROPOUT = ["--dropout", "0", "--attn-dropout", "0", "--ff-dropout", "0", "--emb-dropout", "0", "--final-dropout", "0"]


@pytest.fixture
def one_thread():
    """torch in this process on one thread, as torchrun starts each rank (OMP_NUM_THREADS=1): the same CPU
    kernels as the ranks (the last bits of a matmul can depend on the thread count), and no two-thread
    spinning on a busy 2-core machine (tiny T5 steps took 10x longer)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy_stores(tiny_bert, tiny_t5, tmp_path_factory):
    from stages.cache_activations import main
    from tests.conftest import write_task

    folder = tmp_path_factory.mktemp("ddp")
    task = write_task(folder / "toy")
    stores = {}
    for family, bb in (("bert", tiny_bert), ("t5", tiny_t5)):
        out = folder / f"cache_{family}"
        res = CliRunner().invoke(main, ["--params", "none", "--backbone", bb, "--task", task, "--out", str(out),
                                        "--dtype", "fp32", "--device", "cpu"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        stores[family] = (bb, task, out)
    return stores


@pytest.mark.parametrize("family,layout", [("bert", "padded"), ("bert", "packed"), ("t5", "padded"),
                                           ("t5", "token_budget")])
def test_the_ranks_weighted_gradients_average_to_the_one_process_gradient(family, layout, toy_stores, one_thread):
    """What DDP computes, without processes: each rank's part of a global batch (rank_part, placeholders
    included), its loss weighted by its share of the batch's terms (examples; T5: target tokens), gradients
    averaged over W ranks: the gradient of the global batch's mean loss, to float tolerance."""
    import torch

    from pipeline import ddp
    from pipeline.batches import reader
    from pipeline.config import TrainConfig
    from pipeline.train_side import setup

    bb, task, cache = toy_stores[family]
    cfg = TrainConfig(backbone=bb, task=task, cache=str(cache), r=4, init="random", side_init="", device="cpu", dropout=0,
                      attn_dropout=0, ff_dropout=0, emb_dropout=0, final_dropout=0, pack=layout == "packed")
    s = setup(cfg, log=lambda *a: None)
    params = [p for p in s.net.parameters() if p.requires_grad]
    # 43 examples in batches of 7: the last global batch has one example, so ranks 1.. run placeholders
    kw = dict(shuffle=True, seed=3, limit=43, pack_len=s.train.longest if layout == "packed" else 0,
              batch_tokens=120 if layout == "token_budget" else 0)

    def grads(batch, weight=None):
        out = s.net(batch)
        loss = out.loss if weight is None else weight(out)
        return torch.autograd.grad(loss, params, allow_unused=True), out

    checked, placeholders = 0, 0
    for world in (2, 3):
        whole = list(reader(s.train).batches(s.names, 7, **kw))
        parts = [list(reader(s.train).batches(s.names, 7, part=(r, world), **kw)) for r in range(world)]
        assert all(len(p) == len(whole) for p in parts)  # one step per global batch on every rank
        for step in sorted({0, 1, len(whole) - 1}):  # the last batch is the smallest
            want, _ = grads(whole[step])
            rank_batches = [p[step] for p in parts]
            placeholders += sum(b.placeholder for b in rank_batches)
            outs = [s.net(b) for b in rank_batches]
            terms = [0 if b.placeholder else o.terms for b, o in zip(rank_batches, outs)]
            all_terms = sum(float(t) for t in terms)
            got = None
            for b, t in zip(rank_batches, terms):
                g, _ = grads(b, lambda out: ddp.rank_loss(out.loss, t, all_terms, world)[0])
                got = g if got is None else [x + y for x, y in zip(got, g)]
            for w, g in zip(want, got):
                # float32 sums over T5's 30k-token vocabulary round differently once the loss is scaled by W:
                # 2e-6 on entries of 0.26 (measured), so the tolerance follows each tensor's largest entry, with a
                # floor for gradients that are rounding noise around 0 (1e-10: a bias feeding a norm)
                atol = max(1e-5 * float(w.abs().max()), 1e-7)
                assert torch.allclose(w, g / world, atol=atol, rtol=1e-4), (world, step, (w - g / world).abs().max())
            checked += 1
    assert checked == 6 and (placeholders > 0 or layout == "token_budget")


def torchrun(*args, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "stages.train_side", "--params", "none", *args]
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **(env or {})), capture_output=True, text=True)


def curves(run: Path) -> list[dict]:
    import csv

    with open(run / "plots" / "curves.csv") as fh:
        return list(csv.DictReader(fh))


def test_torchrun_2_ranks_killed_and_resumed_follow_the_one_process_curve(toy_stores, tmp_path, one_thread):
    """gloo, 2 ranks, the same global batch of 16 (33 examples: the last batch has one, so one rank runs a
    placeholder); killed (kill -9, both ranks) after epoch 1, then rerun with --resume: the curve and the
    saved side net are the one process's to float tolerance."""
    import torch
    from safetensors.torch import load_file

    from stages.train_side import main

    bb, task, cache = toy_stores["bert"]
    args = ["--backbone", bb, "--task", task, "--cache", str(cache), "--reduction-factor", "4", "--epochs", "3",
            "--batch-size", "16", "--limit", "33", "--warmup-steps", "2", "--device", "cpu", "--init", "magnitude", "--side-init", "",
            *NO_DROPOUT]
    one = CliRunner().invoke(main, ["--params", "none", *args, "--out", str(tmp_path / "one")], catch_exceptions=False)
    assert one.exit_code == 0, one.output
    died = torchrun(*args, "--out", str(tmp_path / "two"), env={"LADDER_CACHE_KILL_AFTER_EPOCH": "1"})
    assert died.returncode != 0 and not (tmp_path / "two" / "metrics.json").exists(), died.stderr[-2000:]
    again = torchrun(*args, "--out", str(tmp_path / "two"), "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("resuming after epoch 1") == 1  # rank 0 speaks for both
    a, b = curves(tmp_path / "one"), curves(tmp_path / "two")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert float(x["train_loss"]) == pytest.approx(float(y["train_loss"]), rel=1e-5, abs=1e-6)
        assert x["val_accuracy"] == y["val_accuracy"]
    wa, wb = load_file(str(tmp_path / "one" / "side.safetensors")), load_file(str(tmp_path / "two" / "side.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["ranks"] == 2


def test_a_sweep_under_torchrun_deals_its_configs_to_the_ranks(toy_stores, tmp_path, one_thread):
    """3 configs over 2 ranks (rank 1 trains lr0.01): each config ends bit for bit where it ends alone, and
    rank 0 writes the table of all three."""
    import torch
    from safetensors.torch import load_file

    from stages.train_side import main

    bb, task, cache = toy_stores["bert"]
    (tmp_path / "sweep.yaml").write_text("lr: [0.003, 0.01, 0.03]\n")
    args = ["--backbone", bb, "--task", task, "--cache", str(cache), "--reduction-factor", "4", "--epochs", "2",
            "--batch-size", "16", "--warmup-steps", "2", "--device", "cpu", "--init", "magnitude", "--side-init", ""]
    res = torchrun(*args, "--out", str(tmp_path / "sw"), "--sweep", str(tmp_path / "sweep.yaml"), "--sweep-stack", "never")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [c["name"] for c in summary["configs"]] == ["lr0.003", "lr0.01", "lr0.03"]
    alone = CliRunner().invoke(main, ["--params", "none", *args, "--lr", "0.01", "--out", str(tmp_path / "alone")],
                               catch_exceptions=False)
    assert alone.exit_code == 0, alone.output
    a, b = load_file(str(tmp_path / "sw" / "lr0.01" / "side.safetensors")), load_file(str(tmp_path / "alone" / "side.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
