"""Device-resident batches (pipeline/batches.py) equal the host reader's, field by field, in the same order."""
from __future__ import annotations

import pytest
import torch

from pipeline import cache
from pipeline.batches import DeviceSplit
from pipeline.config import CacheConfig
from pipeline.ladder_store import LadderStore

FIELDS = ("src_ids", "src_mask", "labels", "tgt_ids", "tgt_mask", "tgt_labels", "tgt_row", "tgt_cand")


def _same(a, b):
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            assert torch.equal(x, y), f
    assert a.n_candidates == b.n_candidates
    assert a.states.keys() == b.states.keys()
    for k in a.states:
        assert a.states[k].dtype == b.states[k].dtype == torch.float32
        assert torch.equal(a.states[k], b.states[k]), k


@pytest.mark.parametrize("family,codec,dtype", [("bert", "zstd", "fp16"), ("bert", "int8", "fp16"),
                                                ("t5", "zstd", "bf16"), ("t5", "int8", "fp16")])
@pytest.mark.parametrize("all_candidates", [False, True])
def test_device_split_batches_equal_host_batches(family, codec, dtype, all_candidates, tiny_bert, tiny_t5,
                                                 toy_task, tmp_path):
    backbone = tiny_bert if family == "bert" else tiny_t5
    cfg = CacheConfig(backbone=backbone, task=toy_task, out=str(tmp_path), splits=["train"], device="cpu",
                      codec=codec, dtype=dtype)
    store = LadderStore(cache.run(cfg, log=lambda *a: None)[0])
    names = store.names
    split = DeviceSplit(store, names, store.n, "cpu")
    for epoch in (0, 1):
        host = list(store.batches(names, 10, shuffle=True, seed=4, epoch=epoch, all_candidates=all_candidates,
                                  prefetch=False))
        plan = store.epoch_plan(store.n, names, 10, True, 4, epoch, n_groups=1)
        dev = [split.batch(idx, all_candidates) for _, idx in plan]
        assert len(host) == len(dev) == -(-store.n // 10)
        for a, b in zip(host, dev):
            _same(a, b)


def test_device_budget_decides_between_device_and_host_reader(tiny_bert, toy_task, tmp_path):
    cfg = CacheConfig(backbone=tiny_bert, task=toy_task, out=str(tmp_path), splits=["train"], device="cpu")
    store = LadderStore(cache.run(cfg, log=lambda *a: None)[0])
    need = store.stored_bytes(store.n, store.names)
    assert need == int(store.offsets[-1]) * len(store.names) * store.width * 2  # fp16 rows, every stored state
    # CPU training never takes the device path: the host reader overlaps assembly with compute there
    next(iter(store.batches(store.names, 8, shuffle=False, device="cpu", device_budget_mb=1 << 20)))
    assert store._on_device is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_batches_come_from_the_device_split_and_equal_host_batches(tiny_t5, toy_task, tmp_path):
    cfg = CacheConfig(backbone=tiny_t5, task=toy_task, out=str(tmp_path), splits=["train"], device="cpu")
    store = LadderStore(cache.run(cfg, log=lambda *a: None)[0])
    host = list(store.batches(store.names, 10, shuffle=True, seed=1, epoch=2, prefetch=False))
    dev = list(store.batches(store.names, 10, shuffle=True, seed=1, epoch=2, device="cuda", device_budget_mb=64))
    assert store._on_device is not None and dev[0].src_ids.is_cuda
    for a, b in zip(host, dev):
        _same(a, b.to("cpu"))
