"""Batch assembly on the training device: a split held in GPU memory in its stored dtype.

The host reader (LadderStore.make_batch) gathers rows in numpy, decodes them to float32, pads and copies
each batch to the device; for a side network of a few hundred thousand parameters that data path, not the
network, bounds a GPU step (bench/results/sweep_gpu.json: cache-fed MiniLM runs were 0.75x of in-loop ones).
Here the stored arrays (fp16, bf16 as uint16 bits, or int8 + per-token scales) go to the device once, and
each batch is one index computation, one gather and one decode per state, all on the device:

    start, length = offsets[idx], offsets[idx + 1] - offsets[idx]          # (B,)
    pos = start[:, None] + arange(T)[None, :]   masked where >= length     # (B, T)
    state = decode(rows[pos]) * mask                                        # (B, T, d)

Batches equal the host reader's for the same (seed, epoch) order (tested on CPU tensors).
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.layout import TGT


def _to_device(a: np.ndarray, device) -> torch.Tensor:
    if a.dtype == np.uint16:  # bf16 bits (zarr 3.1 has no bfloat16): reinterpret, no copy of values
        return torch.from_numpy(a.view(np.int16)).to(device).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


class DeviceSplit:
    """The first n examples of a store, the requested states resident on `device` in their stored dtype."""

    def __init__(self, store, names: list[str], n: int, device):
        from pipeline.backbone import decoder_inputs

        self.store, self.names, self.device = store, list(names), torch.device(device)
        off = store.offsets[: n + 1].astype(np.int64)
        self.off = torch.from_numpy(off).to(self.device)  # (n + 1,)
        self.ids = torch.from_numpy(store.src_ids[: off[-1]].astype(np.int64)).to(self.device)
        self.labels = torch.from_numpy(store.labels[:n].copy()).to(self.device)
        self.arrays = {}
        for name, (rows, scale) in store.load_group(0, n, self.names).items():
            self.arrays[name] = (_to_device(rows, self.device), None if scale is None else _to_device(scale, self.device))
        self.t5 = store.fingerprint.get("family") == "t5"
        if self.t5:
            start = int(store.fingerprint.get("decoder_start_token_id", 0))
            dec_in, dec_labels, dec_mask = decoder_inputs(store.cand, start)  # (C, U)
            self.dec = tuple(t.to(self.device) for t in (dec_in, dec_labels, dec_mask))
            self.cand_off = torch.from_numpy(store.cand_offsets[:-1].astype(np.int64)).to(self.device)  # (C,)
            gold = [store.fingerprint_target(y) for y in store.labels[:n]]
            self.gold = torch.tensor(gold, dtype=torch.long, device=self.device)  # (n,)

    def _decode(self, name: str, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows, scale = self.arrays[name]
        x = rows[pos].float()  # (..., d): fp16 / bf16 widen exactly, int8 needs its scale
        if scale is not None:
            x = x * scale[pos]
        return x * mask[..., None]

    def batch(self, idx: np.ndarray, all_candidates: bool = False):
        from pipeline.side import LadderBatch

        dev = self.device
        i = torch.from_numpy(np.asarray(idx, dtype=np.int64)).to(dev)  # (B,)
        start = self.off[i]
        length = self.off[i + 1] - start
        T = int(length.max())  # one host sync per batch: the padded width
        ar = torch.arange(T, device=dev)
        mask = ar[None, :] < length[:, None]  # (B, T)
        pos = torch.where(mask, start[:, None] + ar[None, :], 0)
        ids = torch.where(mask, self.ids[pos], 0)
        states = {n: self._decode(n, pos, mask) for n in self.names if not n.startswith(TGT)}  # (B, T, d)
        batch = LadderBatch(ids, mask, states, self.labels[i])
        if not self.t5:
            return batch
        dec_in, dec_labels, dec_mask = self.dec
        C, U = dec_in.shape
        B = i.shape[0]
        if all_candidates:
            rows = torch.arange(B, device=dev).repeat_interleave(C)
            cand = torch.arange(C, device=dev).repeat(B)
        else:
            rows, cand = torch.arange(B, device=dev), self.gold[i]
        K = self.store.K
        tpos = (i[rows] * K + self.cand_off[cand])[:, None] + torch.arange(U, device=dev)[None, :]  # (N, U)
        tmask = dec_mask[cand]
        tpos = torch.where(tmask, tpos, 0)
        for n in self.names:
            if n.startswith(TGT):
                states[n] = self._decode(n, tpos, tmask)  # (N, U, d)
        batch.tgt_ids, batch.tgt_labels, batch.tgt_mask = dec_in[cand], dec_labels[cand], tmask
        batch.tgt_row, batch.tgt_cand = rows, cand
        batch.n_candidates = C if all_candidates else 0
        return batch
