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

from pipeline.cache_cluster import CLIENT_KILL_ENV, WORKER_KILL_ENV, connect, plan_ranges
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
    logs = []
    with connect(CacheConfig(scheduler="local:2", threads=1), logs.append) as client:
        yield client.scheduler.address, client, logs


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
