"""Batch assembly between the ladder store and the side network: padded or packed LadderBatches.

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

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.layout import TGT


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

    t5: bool
    K: int  # T5: target rows per example (all candidates' tokens)
    cand_offsets: np.ndarray  # (C + 1,)
    dec: tuple  # T5: (C, U) decoder inputs, labels (-100 = ignore), mask


class RowSet:
    """Rows of some examples in their stored dtype, on one device. Example j's source rows are
    off[j]:off[j+1] of each src state; its target rows (T5) are j*K : (j+1)*K of each tgt state."""

    def __init__(self, meta: StoreMeta, off: np.ndarray, ids: np.ndarray, labels: np.ndarray, gold: np.ndarray,
                 arrays: dict[str, tuple], device, pin: bool = False):
        self.meta, self.device, self.off = meta, torch.device(device), np.asarray(off, np.int64)
        self.names = list(arrays)
        self.ids = _tensor(ids.astype(np.int64), self.device, pin)
        self.labels = _tensor(labels.astype(np.float32), self.device, pin)
        self.gold = _tensor(gold.astype(np.int64), self.device, pin)
        self.arrays = {n: (_tensor(r, self.device, pin), None if s is None else _tensor(s, self.device, pin))
                       for n, (r, s) in arrays.items()}
        self.off_t = _tensor(self.off, self.device, pin)
        if meta.t5:
            self.dec = tuple(t.to(self.device) for t in meta.dec)
            self.cand_off = torch.from_numpy(meta.cand_offsets[:-1].astype(np.int64)).to(self.device)

    @classmethod
    def of_store(cls, store, names: list[str], n: int, device) -> "RowSet":
        """The first n examples of a store (the device-resident cache)."""
        return cls(store_meta(store), store.offsets[: n + 1], store.src_ids[: store.offsets[n]], store.labels[:n],
                   gold_targets(store, store.labels[:n]), store.load_group(0, n, names), device)

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
                   arrays, device, pin)

    def _decode(self, name: str, src: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        rows, scale = self.arrays[name]
        x = rows[src].float()  # (..., d): fp16 / bf16 widen exactly, int8 needs its scale
        if scale is not None:
            x = x * scale[src]
        return x * valid[..., None]

    def batch(self, idx: np.ndarray, all_candidates: bool = False, pack_len: int = 0):
        """LadderBatch of the examples idx (indices into this RowSet), padded or packed."""
        from pipeline.side import LadderBatch

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
        if not self.meta.t5:
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


def store_meta(store) -> StoreMeta:
    from pipeline.backbone import decoder_inputs

    t5 = store.fingerprint.get("family") == "t5"
    dec = decoder_inputs(store.cand, int(store.fingerprint.get("decoder_start_token_id", 0))) if t5 else ()
    return StoreMeta(t5, store.K, store.cand_offsets, dec)


def gold_targets(store, labels: np.ndarray) -> np.ndarray:
    """Index of the gold candidate of each label (T5 teacher forcing); zeros for other families."""
    if store.fingerprint.get("family") != "t5":
        return np.zeros(len(labels), np.int64)
    return np.array([store.fingerprint_target(y) for y in labels], np.int64)


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
