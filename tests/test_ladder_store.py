"""The ladder store: exact contents, raggedness, resume after kill -9, integrity, fingerprints, dask view."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline import backbone as bbm
from pipeline import cache_activations, state_rows
from pipeline.batches import reader
from pipeline.config import CacheConfig
from pipeline.errors import FingerprintMismatch, StoreError
from pipeline.inspect_cache import open_ladders, summarize
from pipeline.ladder_store import LadderStore
from pipeline.padding import decoder_inputs, pad
from pipeline.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]


def make_store(backbone, task, out, **kw):
    cfg = CacheConfig(backbone=backbone, task=task, out=str(out), device="cpu", batch_size=kw.pop("batch_size", 7),
                      shard_tokens=kw.pop("shard_tokens", 64), chunk_tokens=kw.pop("chunk_tokens", 16), **kw)
    return cfg, cache_activations.run(cfg, log=lambda *a: None)


def live_states(backbone, task_path, split, names, limit=0):
    bb = bbm.load_backbone(backbone, "cpu")
    task = get_task(task_path)
    exs = task.load("unused", 0)[split]
    exs = exs[:limit] if limit else exs
    enc = bbm.encode(task, exs, bb.tokenizer, bb.family, 64)
    cand = decoder_inputs(enc.cand_ids, 0) if bb.family == "t5" else None
    # same batches as stage one (batch_size 7, length-sorted windows): padding changes matmul shapes, and so the
    # last float bits; states are put back in example order here
    from pipeline.state_rows import forward_windows

    per = {n: {} for n in names}
    lengths = np.array([len(x) for x in enc.src_ids])
    for _, batches in forward_windows(lengths, 7):
        for idx in batches:
            ids, mask = pad([enc.src_ids[i] for i in idx])
            st = bbm.forward_states(bb, ids, mask, names, cand)
            C = len(enc.cand_ids)
            for n in names:
                for j, i in enumerate(idx):
                    per[n][int(i)] = st[n][j, : lengths[i]] if n.startswith("src") else st[n][j * C:(j + 1) * C]
    return {n: torch.cat([v[i] for i in range(len(exs))]) for n, v in per.items()}, enc


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_fp32_store_equals_live_backbone_exactly(family, tiny_bert, tiny_t5, toy_task, tmp_path):
    backbone = tiny_bert if family == "bert" else tiny_t5
    _, paths = make_store(backbone, toy_task, tmp_path / "c", dtype="fp32", splits=["train"])
    store = LadderStore(paths[0])
    live, enc = live_states(backbone, toy_task, "train", store.names)
    for name in store.names:
        stored = store.rows(name, 0, store.layers[name].shape[0])
        if name.startswith("tgt"):
            C = len(enc.cand_ids)
            h = live[name].view(store.n, C, -1, store.width)
            want = torch.cat([h[i, c, : len(enc.cand_ids[c])] for i in range(store.n) for c in range(C)])
        else:
            want = live[name]  # (tokens, d): padding dropped
        assert np.array_equal(stored, want.numpy()), name


def test_total_tokens_equal_sum_of_lengths_and_no_padding(tiny_bert, toy_task, tmp_path):
    _, paths = make_store(tiny_bert, toy_task, tmp_path / "c", splits=["train"])
    store = LadderStore(paths[0])
    _, enc = live_states(tiny_bert, toy_task, "train", [])
    lengths = [len(s) for s in enc.src_ids]
    assert store.offsets[-1] == sum(lengths)
    assert np.array_equal(np.diff(store.offsets), lengths)
    for name in store.names:
        assert store.layers[name].shape[0] == sum(lengths)
    assert np.array_equal(store.src_ids, np.concatenate(enc.src_ids))


def test_real_minilm_fp16_store_is_live_states_rounded_to_fp16(tmp_path):
    cfg, paths = make_store(bbm.MINILM, "rt-sentiment", tmp_path / "c", splits=["validation"], limit=24,
                            data_dir=str(tmp_path / "raw"), shard_tokens=256, chunk_tokens=64)
    store = LadderStore(paths[0])
    assert store.fingerprint["dtype"] == "fp16"
    assert store.fingerprint["backbone_sha256"] == bbm.EMBEDDED[bbm.MINILM].weights_sha256
    bb = bbm.load_backbone(bbm.MINILM, "cpu")
    task = get_task("rt-sentiment")
    exs = task.load(tmp_path / "raw", 0)["validation"][:24]
    enc = bbm.encode(task, exs, bb.tokenizer, bb.family, 64)
    ids, mask = pad(enc.src_ids)
    live = bbm.forward_states(bb, ids, mask, store.names)
    for name in store.names:
        stored = store.rows(name, 0, int(store.offsets[-1]))
        want = live[name][mask].numpy()
        # fp16 keeps 11 significant bits: relative rounding error <= 2^-11 (plus fp32 noise from batching)
        assert np.allclose(stored, want, rtol=2**-10, atol=1e-4), name
        assert not np.array_equal(stored, want)  # it really was rounded


def test_kill_9_of_the_cli_then_resume_gives_bit_identical_store(tiny_t5, toy_task, tmp_path):
    """The real CLI process killed as `kill -9` would, then rerun: same arrays as a clean run."""
    # batch 1: windows of 8 examples (state_rows.SORT_WINDOW), so each append fills about one 64-row shard
    args = ["--params", "none", "--backbone", tiny_t5, "--task", toy_task, "--splits", "train", "--shard-tokens",
            "64", "--chunk-tokens", "16", "--batch-size", "1", "--device", "cpu"]
    from stages.cache_activations import main

    ref = CliRunner().invoke(main, args + ["--out", str(tmp_path / "ref")])
    assert ref.exit_code == 0, ref.output
    env = dict(os.environ, LADDER_CACHE_KILL_AFTER_WRITES="4")
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "stages.cache_activations"] + args + ["--out", str(out)]
    died = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert died.returncode == -9
    with pytest.raises(StoreError, match="incomplete"):
        LadderStore(out / "train.zarr")  # a half-written store is never read as valid
    recorded = json.loads((out / "train.zarr" / "_progress.json").read_text())["shards"]
    assert sum(recorded.values()) == 3  # the shard written as it died was never recorded
    again = CliRunner().invoke(main, args + ["--out", str(out), "--resume"])
    assert again.exit_code == 0, again.output
    assert_same_store(tmp_path / "ref" / "train.zarr", out / "train.zarr")


def differing_arrays(a_path, b_path) -> list[str]:
    """Arrays of two stores that are not equal bit for bit (stored values, not decoded floats), and files
    whose recorded sha256 differ (identical records: every file of the two stores is byte-identical)."""
    a, b = LadderStore(a_path), LadderStore(b_path)
    assert a.names == b.names
    bad = [name for name in a.names if not np.array_equal(a.rows(name, 0, a.layers[name].shape[0]),
                                                          b.rows(name, 0, b.layers[name].shape[0]))]
    bad += [k for k in ("offsets", "src_ids", "labels") if not np.array_equal(getattr(a, k), getattr(b, k))]
    return bad + sorted(k for k in a.files.keys() | b.files.keys() if a.files.get(k) != b.files.get(k))


def assert_same_store(a_path, b_path):
    assert differing_arrays(a_path, b_path) == []


def _killed_child(run, kill_after: int) -> int:
    """Run `run()` in a forked child that SIGKILLs itself after `kill_after` shard writes (the writer's
    own hook, a real SIGKILL); returns the child's wait status. Forking keeps the loaded backbone, so
    a kill point costs a fraction of a second instead of a fresh interpreter (~6 s on 2 cores)."""
    import signal

    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            signal.alarm(120)  # a hung child ends the test with SIGALRM instead of hanging it
            os.environ["LADDER_CACHE_KILL_AFTER_WRITES"] = str(kill_after)
            run()
            code = 0
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


@pytest.mark.parametrize("family,step", [("bert", 1), ("t5", 2)])
def test_kill_9_at_every_shard_write_then_resume_gives_bit_identical_store(family, step, tiny_bert, tiny_t5,
                                                                          toy_task, tmp_path):
    """Kill points every `step` shard writes over the whole split: inside forward batches, between the
    shards of different arrays, before and after the final partial shards. fp32, so that a last-bit
    difference of a re-batched forward (what fp16 rounding might hide) fails the test."""
    import signal

    backbone = tiny_bert if family == "bert" else tiny_t5
    # batch 1: forward windows of 8 examples (state_rows.SORT_WINDOW), so a split holds many shard writes
    cfg = lambda out: CacheConfig(backbone=backbone, task=toy_task, out=str(out), device="cpu",  # noqa: E731
                                  batch_size=1, shard_tokens=16, chunk_tokens=16, dtype="fp32", splits=["train"])
    bb = bbm.load_backbone(backbone, "cpu")
    task = get_task(toy_task)
    examples = task.load("unused", 0)["train"]
    threads = torch.get_num_threads()
    # libgomp is not fork-safe: a child entering the parent's OpenMP pool hung (measured); one thread keeps
    # the child out of it, and the clean run, the killed runs and the resumes then all use the same kernels
    torch.set_num_threads(1)
    try:
        quiet = lambda *a: None  # noqa: E731
        ref = cache_activations.cache_split(cfg(tmp_path / "ref"), bb, task, "train", examples, quiet)
        tried, different, inside_batch, uneven = 0, {}, 0, 0
        for k in range(1, 10_000, step):
            out = tmp_path / f"kill{k}"
            status = _killed_child(lambda: cache_activations.cache_split(cfg(out), bb, task, "train", examples, quiet), k)
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                break  # fewer than k shard writes: the run finished, every kill point was tried
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (k, status)
            recorded = json.loads((out / "train.zarr" / "_progress.json").read_text())["shards"]
            uneven += len(set(recorded.values())) > 1  # arrays stopped at different shard counts
            logs = []
            cache_activations.cache_split(cfg(out), bb, task, "train", examples, logs.append)
            resumed = [m for m in logs if "resuming at example" in m]
            inside_batch += bool(resumed) and int(resumed[0].split("example ")[1].split()[0]) % state_rows.SORT_WINDOW != 0
            tried += 1
            bad = differing_arrays(ref, out / "train.zarr")
            if bad:
                different[k] = bad
    finally:
        torch.set_num_threads(threads)
    print(f"{family}: kill points identical {tried - len(different)} / tried {tried}; resumed inside a window "
          f"{inside_batch}; arrays at different shard counts {uneven}")
    assert different == {}, f"kill point -> arrays that differ from the clean run: {different}"
    # the hard cases were reached (measured: bert 16 of 29 resumes inside a forward window, t5 8 of 20)
    assert tried >= 20 and inside_batch >= tried // 3 and uneven >= tried // 2


def test_fingerprint_mismatch_is_refused_naming_the_field(tiny_bert, toy_task, tmp_path):
    cfg, paths = make_store(tiny_bert, toy_task, tmp_path / "c", splits=["train"])
    with pytest.raises(FingerprintMismatch, match="max_length"):
        LadderStore(paths[0], expect={"max_length": 32})
    with pytest.raises(FingerprintMismatch, match="max_length") as e:
        make_store(tiny_bert, toy_task, tmp_path / "c", splits=["train"], max_length=32)
    assert "task" not in e.value.diffs
    # with --overwrite the store is rebuilt for the new config
    make_store(tiny_bert, toy_task, tmp_path / "c", splits=["train"], max_length=32, overwrite=True)
    assert LadderStore(paths[0]).fingerprint["max_length"] == 32


@pytest.mark.parametrize("codec", ["zstd", "int8", "bitround"])
def test_dask_view_equals_direct_reads(codec, tiny_bert, toy_task, tmp_path):
    _, paths = make_store(tiny_bert, toy_task, tmp_path / codec, splits=["train"], codec=codec)
    store, lad = LadderStore(paths[0]), open_ladders(paths[0])
    assert np.array_equal(lad["offsets"], store.offsets)
    for name in store.names:
        assert np.array_equal(lad[name].compute(), store.rows(name, 0, store.layers[name].shape[0])), name


def test_lossy_codecs_error_is_small_and_reported(tiny_bert, toy_task, tmp_path):
    _, ref = make_store(tiny_bert, toy_task, tmp_path / "fp32", splits=["train"], dtype="fp32")
    for codec, bound in (("int8", 0.02), ("bitround", 0.01)):
        _, p = make_store(tiny_bert, toy_task, tmp_path / codec, splits=["train"], codec=codec)
        s = summarize(p[0], reference=ref[0])
        errs = [r["relative_error_vs_reference"] for r in s["layers"].values()]
        assert 0 < max(errs) < bound, (codec, errs)


def test_reader_batches_are_whole_examples_shuffled_per_epoch(tiny_bert, toy_task, tmp_path):
    _, paths = make_store(tiny_bert, toy_task, tmp_path / "c", splits=["train"], dtype="fp32")
    store = LadderStore(paths[0])
    seen = []
    for epoch in (0, 1):
        order = []
        for b in reader(store).batches(["src_01"], 10, shuffle=True, seed=3, epoch=epoch):
            lens = b.src_mask.sum(1).numpy()
            for j in range(len(lens)):
                row = b.src_ids[j, : lens[j]].numpy()
                i = next(i for i in range(store.n) if np.array_equal(store.src_ids[store.offsets[i]:store.offsets[i + 1]], row))
                assert np.array_equal(b.states["src_01"][j, : lens[j]].numpy(),
                                      store.rows("src_01", store.offsets[i], store.offsets[i + 1]))
                assert not b.states["src_01"][j, lens[j]:].any()  # padding is zeros, masked
                order.append(i)
        assert sorted(order) == list(range(store.n))
        seen.append(order)
    assert seen[0] != seen[1]
    n_batches = sum(1 for _ in reader(store).batches(["src_01"], 10, shuffle=True, seed=3, epoch=0))
    assert n_batches == len(range(0, store.n, 10))


def test_a_split_that_fits_in_ram_is_read_once_and_streamed_groups_give_the_same_examples(tiny_bert, toy_task,
                                                                                          tmp_path, monkeypatch):
    _, paths = make_store(tiny_bert, toy_task, tmp_path / "c", splits=["train"], dtype="fp32")
    store = LadderStore(paths[0])
    calls = []
    real = store.load_group
    monkeypatch.setattr(store, "load_group", lambda *a: calls.append(a) or real(*a))

    def epoch_rows(budget_mb, epoch):
        rows = {}
        for b in reader(store).batches(["src_01"], 7, shuffle=True, seed=1, epoch=epoch, ram_budget_mb=budget_mb):
            for j, n in enumerate(b.src_mask.sum(1).tolist()):
                rows[tuple(b.src_ids[j, :n].tolist())] = b.states["src_01"][j, :n].clone()
        return rows

    resident = [epoch_rows(4096, e) for e in range(3)]
    assert len(calls) == 1  # three epochs, one read from disk
    tiny_budget = 1e-6  # one example per group: streamed from disk every epoch
    streamed = epoch_rows(tiny_budget, 0)
    assert len(calls) > 1 + store.n // 2
    assert resident[0].keys() == streamed.keys() == resident[2].keys()
    for k, v in streamed.items():
        assert torch.equal(v, resident[0][k])


def test_bbc_topics_from_the_registry_wheel_have_every_topic_as_a_label(tmp_path):
    task = get_task("bbc-topics")
    splits = task.load(tmp_path / "raw", 0)
    labels = {int(ex.label) for split in splits.values() for ex in split}
    assert labels == set(range(len(task.label_names))) and sum(map(len, splits.values())) == 2225
