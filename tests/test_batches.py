"""Batch assembly (pipeline/batches.py): padded batches equal a plain numpy reference reader, the
device-resident RowSet equals the streamed one, and a packed batch gives the side network the same loss
as the same examples padded, for T5, encoder-only and decoder-only side nets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import backbone as bbm
from pipeline import cache_activations
from pipeline.batches import RowSet, layout, reader, token_budget_batches
from pipeline.config import CacheConfig
from pipeline.ladder_store import LadderStore, decode_rows
from pipeline.side import build_side
from pipeline.side_spec import spec_from_config
from pipeline.tasks import get_task

FIELDS = ("src_ids", "src_mask", "labels", "tgt_ids", "tgt_mask", "tgt_labels", "tgt_row", "tgt_cand", "seg", "pos")


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


def reference_padded(store, idx, names, all_candidates):
    """A padded batch built the plain way, example by example in numpy (the project's first reader)."""
    from pipeline.batches import LadderBatch
    from pipeline.padding import decoder_inputs, pad

    off = store.offsets
    ids, mask = pad([store.src_ids[off[i]:off[i + 1]] for i in idx])
    B, T = ids.shape
    states = {}
    for n in names:
        if n.startswith("tgt"):
            continue
        x = np.zeros((B, T, store.width), np.float32)
        for j, i in enumerate(idx):
            x[j, : off[i + 1] - off[i]] = store.rows(n, int(off[i]), int(off[i + 1]))
        states[n] = torch.from_numpy(x)
    batch = LadderBatch(ids, mask, states, torch.from_numpy(store.labels[idx].copy()))
    if store.fingerprint["family"] != "t5":
        return batch
    C = len(store.cand)
    dec_in, dec_labels, dec_mask = decoder_inputs(store.cand, int(store.fingerprint["decoder_start_token_id"]))
    pairs = [(j, c) for j in range(B) for c in range(C)] if all_candidates else \
        [(j, store.fingerprint_target(store.labels[i])) for j, i in enumerate(idx)]
    cs = [c for _, c in pairs]
    for n in names:
        if n.startswith("tgt"):
            x = np.zeros((len(pairs), dec_in.shape[1], store.width), np.float32)
            for r, (j, c) in enumerate(pairs):
                s = idx[j] * store.K + store.cand_offsets[c]
                x[r, : len(store.cand[c])] = store.rows(n, int(s), int(s + len(store.cand[c])))
            states[n] = torch.from_numpy(x)
    batch.tgt_ids, batch.tgt_labels, batch.tgt_mask = dec_in[cs], dec_labels[cs], dec_mask[cs]
    batch.tgt_row, batch.tgt_cand = torch.tensor([j for j, _ in pairs]), torch.tensor(cs)
    batch.n_candidates = C if all_candidates else 0
    return batch


def _store(backbone, task, tmp_path, **kw):
    cfg = CacheConfig(backbone=backbone, task=task, out=str(tmp_path), splits=["train"], device="cpu", **kw)
    return LadderStore(cache_activations.run(cfg, log=lambda *a: None)[0])


@pytest.mark.parametrize("family,codec,dtype", [("bert", "zstd", "fp16"), ("bert", "int8", "fp16"),
                                                ("t5", "zstd", "bf16"), ("t5", "int8", "fp16")])
@pytest.mark.parametrize("all_candidates", [False, True])
def test_padded_batches_equal_a_plain_reference_and_the_device_resident_rowset(family, codec, dtype, all_candidates,
                                                                                tiny_bert, tiny_t5, toy_task, tmp_path):
    store = _store(tiny_bert if family == "bert" else tiny_t5, toy_task, tmp_path, codec=codec, dtype=dtype)
    names = store.names
    resident = RowSet.of_store(store, names, store.n, "cpu")
    for epoch in (0, 1):
        host = list(reader(store).batches(names, 10, shuffle=True, seed=4, epoch=epoch, all_candidates=all_candidates,
                                  prefetch=False))
        plan = [idx for _, idx in reader(store).epoch_plan(store.n, names, 10, True, 4, epoch, n_groups=1)]
        assert len(host) == len(plan) == -(-store.n // 10)
        for a, idx in zip(host, plan):
            _same(a, resident.batch(idx, all_candidates))
            _same(a, reference_padded(store, idx, names, all_candidates))


def test_packed_layout_fills_rows_first_fit_longest_first_and_restarts_positions():
    seg, pos = layout(np.array([3, 4, 2, 5]), pack_len=8)  # first fit, longest first: 5+3, 4+2
    assert seg.tolist() == [[3, 3, 3, 3, 3, 0, 0, 0], [1, 1, 1, 1, 2, 2, -1, -1]]
    assert pos.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 0, 0]]
    seg, pos = layout(np.array([3, 1]))
    assert seg.tolist() == [[0, 0, 0], [1, -1, -1]] and pos.tolist() == [[0, 1, 2], [0, 1, 2]]
    with pytest.raises(ValueError, match="does not fit"):
        layout(np.array([9]), pack_len=8)


def test_token_budget_batches_keep_order_and_never_exceed_the_budget():
    lengths = np.array([5, 9, 3, 7, 2, 8, 20])
    order = np.array([6, 0, 1, 2, 3, 4, 5])
    out = token_budget_batches(order, lengths, 12)
    assert np.concatenate(out).tolist() == order.tolist()
    assert [b.tolist() for b in out] == [[6], [0], [1, 2], [3, 4], [5]]  # an example over budget stands alone


@pytest.mark.parametrize("family", ["bert", "t5", "llama"])
def test_a_packed_batch_gives_the_same_loss_and_gradients_as_the_same_examples_padded(family, tiny_bert, tiny_t5,
                                                                                     tiny_llama, toy_task, tmp_path):
    backbone = {"bert": tiny_bert, "t5": tiny_t5, "llama": tiny_llama}[family]
    store = _store(backbone, toy_task, tmp_path, dtype="fp32")
    hf = bbm.load_config(backbone)
    t = get_task(toy_task)
    verb = [int(c[0]) for c in store.cand] if family == "llama" else []
    spec = spec_from_config(hf, 4, None, "ladder", t.kind, t.num_labels, verb, dropout=0.0, mix_final=True)
    net = build_side(spec, bbm.load_frozen_tensors(backbone, spec.family, True), "magnitude", 0,
                           bbm.state_dict_from_files(backbone))
    names = sorted({n for st in spec.stacks for n in spec.state_names(st)})
    rows = RowSet.of_store(store, names, store.n, "cpu")
    idx = np.random.default_rng(0).permutation(store.n)[:13]
    P = int(np.diff(store.offsets).max()) + 3
    out = {}
    for name, b in (("padded", rows.batch(idx)), ("packed", rows.batch(idx, pack_len=P))):
        net.zero_grad()
        loss = net(b).loss
        loss.backward()
        out[name] = (loss.detach(), {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None})
    packed = rows.batch(idx, pack_len=P)
    assert packed.src_ids.shape[0] < len(idx)  # several examples share a row
    assert int(packed.src_mask.sum()) == int(np.diff(store.offsets)[idx].sum())  # no padding inside a row's examples
    (l1, g1), (l2, g2) = out["padded"], out["packed"]
    assert torch.allclose(l1, l2, atol=1e-5, rtol=1e-5), (l1, l2)
    assert g1.keys() == g2.keys()
    for k in g1:
        assert torch.allclose(g1[k], g2[k], atol=1e-5, rtol=1e-4), k
    with torch.no_grad():  # scores of every candidate / class, example by example
        a = net.eval()(rows.batch(idx, all_candidates=True)).scores
        b = net(rows.batch(idx, all_candidates=True, pack_len=P)).scores
    assert torch.allclose(a, b, atol=1e-5)


def test_decode_of_stored_rows_is_exact_for_every_stored_dtype(tiny_bert, toy_task, tmp_path):
    for codec, dtype in (("zstd", "fp16"), ("zstd", "bf16"), ("int8", "fp16")):
        store = _store(tiny_bert, toy_task, tmp_path / f"{codec}{dtype}", codec=codec, dtype=dtype)
        rs = RowSet.of_store(store, store.names, store.n, "cpu")
        name = store.names[1]
        rows, scale = store.load_group(0, store.n, [name])[name]
        want = decode_rows(rows, scale, store.dtype, store.codec)
        n = rows.shape[0]
        got = rs._decode(name, torch.arange(n), torch.ones(n, dtype=torch.bool)).numpy()
        assert np.array_equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_come_from_the_device_resident_split_and_equal_host_batches(tiny_t5, toy_task, tmp_path):
    store = _store(tiny_t5, toy_task, tmp_path)
    host = list(reader(store).batches(store.names, 10, shuffle=True, seed=1, epoch=2, prefetch=False))
    dev = list(reader(store).batches(store.names, 10, shuffle=True, seed=1, epoch=2, device="cuda", device_budget_mb=64))
    assert reader(store)._on_device is not None and dev[0].src_ids.is_cuda
    for a, b in zip(host, dev):
        _same(a, b.to("cpu"))
