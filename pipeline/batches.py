"""Batches: what lies between the ladder store and the side network. The store hands out rows and knows no
model; the side network reads a `LadderBatch` and knows no store. This module reads rows (`Reader`: which
examples, in which order, from RAM or the GPU), lays them out (padded or packed) and decodes them.

The store hands out rows (ragged: example i's source tokens are rows offsets[i]:offsets[i+1] of every state);
this module turns the rows of a mini-batch's examples into what the side network reads. A `RowSet` holds rows
in their stored dtype (fp16, bf16 as uint16 bits, or int8 + per-token scales) on some device, with its own
offsets; a batch is one index computation, one gather and one decode per state, on that device:

    seg, pos = layout(lengths)          # (R, P): which example each slot holds (-1: empty), its position
    src = start[seg] + pos              # (R, P) row of every slot
    state = decode(rows[src]) * (seg >= 0)

Layouts. Padded (pack_len = 0): one example per row, rows as long as the batch's longest example (the side
net then masks padding keys). Packed (pack_len = P): examples laid end to end in rows of P slots, a new row
when the next example does not fit; attention is confined to each example by the segment ids and positions
restart per example (pipeline/side.py). rt-snippets average 27 tokens with a longest of 64, so a padded
batch is about half padding; packed rows waste a few slots at each row end.

Where the rows live. On CUDA, a split whose states fit a budget is held on the GPU once (`RowSet.of_store`,
the "device-resident cache"); otherwise, and on the CPU, the reader's background thread gathers each batch's
rows from the RAM-held group into a small RowSet (pinned memory when the device is CUDA) that is copied with
non_blocking transfers and assembled on the device (`RowSet.of_examples`). Same code, same batches.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.ladder_store import LadderStore, bytes_per_value
from pipeline.layout import SRC, TGT
from pipeline.padding import candidate_inputs


@dataclass
class LadderBatch:
    """One mini-batch for the side network, from the store or from a live backbone.

    src_ids/src_mask: (B, T); states: name -> (B, T, d) (src) or (N, U, d) (tgt); labels (B,).
    Packed layout (pipeline/batches.py): the same fields are (R, P) rows of several examples each, `seg` says
    which example (0..B-1) a slot holds and `pos` its position there; labels stay (B,), one per example.
    T5 and decoder-only classification: tgt_ids/tgt_mask (N, U) candidate inputs (T5: decoder inputs; decoder-only:
    each candidate without its last token, U may be 0) and tgt_labels (N, U) (decoder-only: (N, U + 1), label 0
    scored from the prompt's last position), -100 = ignore; tgt_row (N,) example of each target row; n_candidates:
    C when every row's C candidates are present in order (scores come back as (B, C)), 0 for teacher forcing on the
    gold target only. Decoder-only generation: lm_labels (B, T) / (R, P) next answer token at each slot, -100 where
    the next token is not an answer token of the same example.
    """

    src_ids: torch.Tensor
    src_mask: torch.Tensor
    states: dict
    labels: torch.Tensor | None = None
    tgt_ids: torch.Tensor | None = None
    tgt_mask: torch.Tensor | None = None
    tgt_labels: torch.Tensor | None = None
    tgt_row: torch.Tensor | None = None
    tgt_cand: torch.Tensor | None = None  # (N,) candidate index of each target row
    n_candidates: int = 0
    seg: torch.Tensor | None = None  # packed layout: (R, P) example of each slot (-1 empty); None = padded
    pos: torch.Tensor | None = None  # packed layout: (R, P) position of each slot in its example
    # DDP (pipeline/ddp.py): this rank's part of the global batch is empty; the batch holds one example of it
    # only so that the rank joins the step's gradient all-reduce, and its loss counts zero times
    placeholder: bool = False
    lm_labels: torch.Tensor | None = None  # generation: next-token labels of the answer slots (-100 elsewhere)

    def to(self, device, dtype=None):
        # non_blocking only towards a GPU: a non-blocking copy back to the host returns before the data lands
        nb = torch.device(device).type == "cuda"

        def mv(t):
            if t is None:
                return None
            if dtype is not None and t.is_floating_point() and t.dim() == 3:
                return t.to(device, dtype, non_blocking=nb)
            return t.to(device, non_blocking=nb)

        return dataclasses.replace(
            self, src_ids=mv(self.src_ids), src_mask=mv(self.src_mask),
            states={k: mv(v) for k, v in self.states.items()}, labels=mv(self.labels), tgt_ids=mv(self.tgt_ids),
            tgt_mask=mv(self.tgt_mask), tgt_labels=mv(self.tgt_labels), tgt_row=mv(self.tgt_row),
            tgt_cand=mv(self.tgt_cand), seg=mv(self.seg), pos=mv(self.pos), lm_labels=mv(self.lm_labels))

    @property
    def n_tokens(self) -> int:
        if self.placeholder:
            return 0
        n = int(self.src_mask.sum())
        return n + (int(self.tgt_mask.sum()) if self.tgt_mask is not None else 0)


def layout(lengths: np.ndarray, pack_len: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(R, P) segment ids (example index in the batch, -1 for an empty slot) and positions in the example.
    pack_len 0: padded, one example per row. Else first-fit decreasing into rows of pack_len slots: longest
    example first, each into the first row with room (on rt-snippets lengths, rows of 64 end up ~95% full;
    in order, a row closes as soon as the next example does not fit and ~27% of slots stay empty)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if not pack_len:
        P = int(lengths.max())
        pos = np.broadcast_to(np.arange(P), (len(lengths), P)).copy()
        seg = np.where(pos < lengths[:, None], np.arange(len(lengths))[:, None], -1)
        return seg, pos
    if lengths.max() > pack_len:
        raise ValueError(f"an example of {lengths.max()} tokens does not fit a packed row of {pack_len}")
    row_of, start_of, fill = np.zeros(len(lengths), np.int64), np.zeros(len(lengths), np.int64), []
    for i in np.argsort(-lengths, kind="stable"):
        n = lengths[i]
        r = next((r for r, f in enumerate(fill) if f + n <= pack_len), None)
        if r is None:
            r = len(fill)
            fill.append(0)
        row_of[i], start_of[i] = r, fill[r]
        fill[r] += n
    seg = np.full((len(fill), pack_len), -1, np.int64)
    pos = np.zeros((len(fill), pack_len), np.int64)
    for i, n in enumerate(lengths):
        seg[row_of[i], start_of[i]:start_of[i] + n] = i
        pos[row_of[i], start_of[i]:start_of[i] + n] = np.arange(n)
    return seg, pos


def _tensor(a: np.ndarray, device, pin: bool = False) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a.view(np.int16) if a.dtype == np.uint16 else a))
    if a.dtype == np.uint16:  # bf16 bits (zarr 3.1 has no bfloat16): reinterpret, no copy of values
        t = t.view(torch.bfloat16)
    if pin:
        t = t.pin_memory()
    return t.to(device, non_blocking=pin)


@dataclass
class StoreMeta:
    """What assembly needs to know about a store besides its rows."""

    cands: bool  # T5 / decoder-only classification: batches carry candidate targets
    K: int  # target rows per example (layout.tgt_lengths of all candidates)
    tgt_offsets: np.ndarray  # (C + 1,) first target row of each candidate within an example's K
    dec: tuple  # padding.candidate_inputs: (C, U) inputs, labels (-100 = ignore), (C, U) mask


class RowSet:
    """Rows of some examples in their stored dtype, on one device. Example j's source rows are
    off[j]:off[j+1] of each src state; its target rows (T5) are j*K : (j+1)*K of each tgt state."""

    def __init__(self, meta: StoreMeta, off: np.ndarray, ids: np.ndarray, labels: np.ndarray, gold: np.ndarray,
                 arrays: dict[str, tuple], device, pin: bool = False, answer_start: np.ndarray | None = None):
        self.meta, self.device, self.off = meta, torch.device(device), np.asarray(off, np.int64)
        self.names = list(arrays)
        self.ids = _tensor(ids.astype(np.int64), self.device, pin)
        self.labels = _tensor(labels.astype(np.float32), self.device, pin)
        self.gold = _tensor(gold.astype(np.int64), self.device, pin)
        self.arrays = {n: (_tensor(r, self.device, pin), None if s is None else _tensor(s, self.device, pin))
                       for n, (r, s) in arrays.items()}
        self.off_t = _tensor(self.off, self.device, pin)
        self.answer_start = None if answer_start is None else _tensor(answer_start.astype(np.int64), self.device, pin)
        if meta.cands:
            self.dec = tuple(t.to(self.device) for t in meta.dec)
            self.cand_off = torch.from_numpy(meta.tgt_offsets[:-1].astype(np.int64)).to(self.device)

    @classmethod
    def of_store(cls, store, names: list[str], n: int, device) -> "RowSet":
        """The first n examples of a store (the device-resident cache)."""
        return cls(store_meta(store), store.offsets[: n + 1], store.src_ids[: store.offsets[n]], store.labels[:n],
                   gold_targets(store, store.labels[:n]), store.load_group(0, n, names), device,
                   answer_start=None if store.answer_start is None else store.answer_start[:n])

    @classmethod
    def of_examples(cls, store, group: dict, e0: int, idx: np.ndarray, device, meta: StoreMeta | None = None):
        """The examples idx (store indices) out of a RAM-held group that starts at example e0: their rows
        gathered into one contiguous block (pinned for a CUDA device)."""
        off = store.offsets
        lengths = off[idx + 1] - off[idx]
        local_off = np.concatenate([[0], np.cumsum(lengths)])
        src = np.concatenate([np.arange(off[i], off[i + 1]) for i in idx])  # store rows of every token
        arrays = {}
        for name, (rows, scale) in group.items():
            if name.startswith(TGT):
                K = store.K
                r = ((idx - e0)[:, None] * K + np.arange(K)[None, :]).reshape(-1)
            else:
                r = src - off[e0]
            arrays[name] = (rows[r], None if scale is None else scale[r])
        labels = store.labels[idx]
        pin = torch.device(device).type == "cuda"
        return cls(meta or store_meta(store), local_off, store.src_ids[src], labels, gold_targets(store, labels),
                   arrays, device, pin, None if store.answer_start is None else store.answer_start[idx])

    def _decode(self, name: str, src: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        rows, scale = self.arrays[name]
        x = rows[src].float()  # (..., d): fp16 / bf16 widen exactly, int8 needs its scale
        if scale is not None:
            x = x * scale[src]
        return x * valid[..., None]

    def batch(self, idx: np.ndarray, all_candidates: bool = False, pack_len: int = 0) -> LadderBatch:
        """LadderBatch of the examples idx (indices into this RowSet), padded or packed."""
        dev = self.device
        idx = np.asarray(idx, np.int64)
        seg_np, pos_np = layout(self.off[idx + 1] - self.off[idx], pack_len)
        start = self.off[idx]
        src_np = np.where(seg_np >= 0, start[np.maximum(seg_np, 0)] + pos_np, 0)
        seg, pos, src = (torch.from_numpy(a).to(dev, non_blocking=dev.type == "cuda") for a in (seg_np, pos_np, src_np))
        valid = seg >= 0  # (R, P)
        ids = torch.where(valid, self.ids[src], 0)
        states = {n: self._decode(n, src, valid) for n in self.names if not n.startswith(TGT)}  # (R, P, d)
        i = torch.from_numpy(idx).to(dev)
        batch = LadderBatch(ids, valid, states, self.labels[i])
        if pack_len:
            batch.seg, batch.pos = seg, pos
        if self.answer_start is not None:
            batch.lm_labels = answer_labels(ids, seg, pos, self.answer_start[i])
        if not self.meta.cands:
            return batch
        dec_in, dec_labels, dec_mask = self.dec
        C, U = dec_in.shape
        B = len(idx)
        if all_candidates:
            rows = torch.arange(B, device=dev).repeat_interleave(C)
            cand = torch.arange(C, device=dev).repeat(B)
        else:
            rows, cand = torch.arange(B, device=dev), self.gold[i]
        tpos = (i[rows] * self.meta.K + self.cand_off[cand])[:, None] + torch.arange(U, device=dev)[None, :]  # (N, U)
        tmask = dec_mask[cand]
        tpos = torch.where(tmask, tpos, 0)
        for n in self.names:
            if n.startswith(TGT):
                states[n] = self._decode(n, tpos, tmask)  # (N, U, d)
        batch.tgt_ids, batch.tgt_labels, batch.tgt_mask = dec_in[cand], dec_labels[cand], tmask
        batch.tgt_row, batch.tgt_cand = rows, cand
        batch.n_candidates = C if all_candidates else 0
        return batch


def answer_labels(ids: torch.Tensor, seg: torch.Tensor, pos: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """(R, P) causal-LM labels of a generation batch: at each slot, the next slot's token when that token is an
    answer token of the same example (position >= its answer start), else -100. Padded or packed alike."""
    nxt = torch.full_like(ids, -100)
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] >= 0)
    is_answer = (pos[:, 1:] >= start[seg[:, :-1].clamp(min=0)])
    nxt[:, :-1] = torch.where(same & is_answer, ids[:, 1:], -100)
    return nxt


def store_meta(store) -> StoreMeta:
    family = store.fingerprint.get("family")
    cands = family in ("t5", "decoder") and bool(store.cand)
    dec = candidate_inputs(family, store.cand, int(store.fingerprint.get("decoder_start_token_id", 0))) if cands else ()
    return StoreMeta(cands, store.K, store.tgt_offsets, dec)


def gold_targets(store, labels: np.ndarray) -> np.ndarray:
    """Index of the gold candidate of each label (teacher forcing: T5, decoder-only); zeros otherwise."""
    if not store.cand:
        return np.zeros(len(labels), np.int64)
    return np.array([store.fingerprint_target(y) for y in labels], np.int64)


def rank_part(idx: np.ndarray, lengths: np.ndarray, rank: int, world: int) -> tuple[np.ndarray, bool]:
    """Rank `rank`'s examples of the global batch idx: longest first, each to the rank with the fewest tokens
    so far (ties: the lower rank), so the ranks' steps take about the same time; within a part, the global
    batch's order. Every rank computes every part the same way. (examples, placeholder): a rank left without
    an example gets the batch's first, to be counted zero times."""
    idx = np.asarray(idx)
    load, owner = np.zeros(world, np.int64), np.empty(len(idx), np.int64)
    for i in np.argsort(-lengths[idx], kind="stable"):
        owner[i] = int(np.argmin(load))
        load[owner[i]] += lengths[idx[i]]
    mine = idx[owner == rank]
    return (mine, False) if len(mine) else (idx[:1], True)


def token_budget_batches(order: np.ndarray, lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Consecutive examples of `order` in batches of at most batch_tokens tokens (at least one example)."""
    out, cur, n = [], [], 0
    for i in order:
        L = int(lengths[i])
        if cur and n + L > batch_tokens:
            out.append(np.array(cur))
            cur, n = [], 0
        cur.append(i)
        n += L
    if cur:
        out.append(np.array(cur))
    return out


# ---------------------------------------------------------------- reading a store in batches

class Reader:
    """Mini-batches of one store's examples. Shuffling is per epoch from (seed, epoch): the order of RAM-sized
    groups, then of the examples within a group. A split that fits `ram_budget_mb` is read and decompressed
    once and kept for later epochs; else the next group is read in a background thread. With a CUDA device
    and a split whose states fit `device_budget_mb` in their stored dtype, the split is held on the GPU and
    every batch is gathered and decoded there, in the same order."""

    def __init__(self, store: LadderStore):
        self.store = store
        self._resident: tuple | None = None  # ((n, names), rows) of a split that fits in RAM
        self._on_device: tuple | None = None  # ((n, names, device), RowSet on the GPU)

    def n(self, limit: int = 0) -> int:
        return min(self.store.n, limit) if limit else self.store.n

    def groups(self, n_examples: int, names: list[str], ram_budget_mb: int) -> list[tuple[int, int]]:
        """Contiguous example ranges small enough to hold in RAM (one range if the split fits)."""
        st = self.store
        item = bytes_per_value(st.dtype, st.codec)
        per_token = item * st.width * len([n for n in names if n.startswith(SRC)])
        tgt = len([n for n in names if n.startswith(TGT)])
        per_example = (st.offsets[n_examples] / max(n_examples, 1)) * per_token + st.K * item * st.width * tgt
        cap = max(1, int(ram_budget_mb * 2**20 / max(per_example, 1)))
        return [(s, min(s + cap, n_examples)) for s in range(0, n_examples, cap)]

    def stored_bytes(self, n: int, names: list[str]) -> int:
        """Bytes the requested states of the first n examples take in their stored dtype (+ int8 scales)."""
        st = self.store
        item = bytes_per_value(st.dtype, st.codec) * st.width + (4 if st.codec == "int8" else 0)
        rows = sum((n * st.K if nm.startswith(TGT) else int(st.offsets[n])) for nm in names)
        return rows * item

    def epoch_plan(self, n: int, names: list[str], batch_size: int, shuffle: bool, seed: int, epoch: int,
                   ram_budget_mb: int = 4096, n_groups: int | None = None, batch_tokens: int = 0):
        """The epoch's batches as ((e0, e1) group, example indices) pairs: a pure function of (seed, epoch)
        and the grouping, so every reader (host or device) visits examples in the same order."""
        rng = np.random.default_rng([seed, epoch])
        groups = [(0, n)] if n_groups == 1 else self.groups(n, names, ram_budget_mb)
        if shuffle:
            groups = [groups[i] for i in rng.permutation(len(groups))]
        lengths = np.diff(self.store.offsets)
        for e0, e1 in groups:
            order = np.arange(e0, e1)
            if shuffle:
                order = rng.permutation(order)
            if batch_tokens:
                for idx in token_budget_batches(order, lengths, batch_tokens):
                    yield (e0, e1), idx
            else:
                for b in range(0, len(order), batch_size):
                    yield (e0, e1), order[b:b + batch_size]

    def steps(self, names: list[str], batch_size: int, seed: int, epoch: int = 0, limit: int = 0,
              ram_budget_mb: int = 4096, batch_tokens: int = 0) -> int:
        return len(list(self.epoch_plan(self.n(limit), names, batch_size, True, seed, epoch, ram_budget_mb,
                                        batch_tokens=batch_tokens)))

    def batches(self, names: list[str], batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                limit: int = 0, all_candidates: bool = False, ram_budget_mb: int = 4096, prefetch: bool = True,
                device="cpu", device_budget_mb: int = 0, pack_len: int = 0, batch_tokens: int = 0,
                part: tuple[int, int] | None = None):
        """LadderBatches (on `device`) of whole examples, padded (pack_len 0) or packed into rows of pack_len
        slots. A batch is batch_size examples, or with batch_tokens > 0 as many consecutive examples as fit
        that many tokens. part=(rank, world): this rank's part of each of those batches (DDP, rank_part)."""
        n = self.n(limit)
        dev = torch.device(device)
        lengths = np.diff(self.store.offsets)

        def parts(plan):
            for g, idx in plan:
                yield (g, *(rank_part(idx, lengths, *part) if part else (idx, False)))

        if dev.type == "cuda" and device_budget_mb > 0 and self.stored_bytes(n, names) <= device_budget_mb * 2**20:
            key = (n, tuple(names), str(dev))
            if self._on_device is None or self._on_device[0] != key:
                self._on_device = (key, RowSet.of_store(self.store, names, n, dev))
            rows = self._on_device[1]
            plan = self.epoch_plan(n, names, batch_size, shuffle, seed, epoch, n_groups=1, batch_tokens=batch_tokens)
            return (dataclasses.replace(rows.batch(idx, all_candidates, pack_len), placeholder=ph)
                    for _, idx, ph in parts(plan))
        meta = store_meta(self.store)

        def assemble(data, e0, idx, placeholder):
            batch = RowSet.of_examples(self.store, data, e0, idx, dev, meta).batch(np.arange(len(idx)),
                                                                                   all_candidates, pack_len)
            batch.placeholder = placeholder
            return batch

        plan = list(parts(self.epoch_plan(n, names, batch_size, shuffle, seed, epoch, ram_budget_mb,
                                          batch_tokens=batch_tokens)))
        it = self._host_batches(plan, n, names, prefetch, assemble)
        return _background(it, depth=4) if prefetch else it

    def _host_batches(self, plan, n, names, prefetch, assemble):
        groups = list(dict.fromkeys(g for g, *_ in plan))  # in visiting order
        resident = len(groups) == 1  # the split fits: read and decompress it once, keep it for later epochs
        pool = ThreadPoolExecutor(1) if prefetch and not resident else None
        load = (lambda g: pool.submit(self.store.load_group, g[0], g[1], names)) if pool else None
        try:
            pending = load(groups[0]) if pool else None
            data, current = None, None
            for g, idx, placeholder in plan:
                if g != current:
                    if resident:
                        data = self._resident_group(n, names)
                    else:
                        data = pending.result() if pool else self.store.load_group(g[0], g[1], names)
                        gi = groups.index(g)
                        if pool and gi + 1 < len(groups):
                            pending = load(groups[gi + 1])
                    current = g
                yield assemble(data, g[0], idx, placeholder)
        finally:
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)

    def _resident_group(self, n: int, names: list[str]) -> dict[str, tuple]:
        key = (n, tuple(names))
        if self._resident is None or self._resident[0] != key:
            self._resident = (key, self.store.load_group(0, n, names))
        return self._resident[1]


_READERS: "weakref.WeakKeyDictionary[LadderStore, Reader]" = weakref.WeakKeyDictionary()


def reader(store: LadderStore) -> Reader:
    """The store's Reader, one per store object, so what it holds (RAM- or GPU-resident rows) is read once."""
    if store not in _READERS:
        _READERS[store] = Reader(store)
    return _READERS[store]


def _background(it, depth: int):
    """Run a generator in a thread, `depth` items ahead: batch assembly (numpy gathers, decode)
    overlaps the training step."""
    q: queue.Queue = queue.Queue(depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in it:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)
