"""Token id lists to tensors: right padding, T5's teacher-forced decoder inputs for each candidate target, and a
decoder-only model's candidate continuations. Stage one pads the backbone's input batches with it; the side
network's batches (pipeline/batches.py) build the candidate inputs with it, so the cached states and the side
network see the same token positions."""
from __future__ import annotations

import numpy as np
import torch


def pad(seqs: list[np.ndarray], value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest: (B, T) ids and (B, T) bool mask."""
    T = max(len(s) for s in seqs)
    ids = np.full((len(seqs), T), value, dtype=np.int64)
    mask = np.zeros((len(seqs), T), dtype=bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = True
    return torch.from_numpy(ids), torch.from_numpy(mask)


def decoder_inputs(cands: list[np.ndarray], start_id: int, pad_id: int = 0):
    """T5 teacher forcing for each candidate: (C, U) decoder inputs (shifted right), labels (-100 pad), mask."""
    tgt, mask = pad(cands, pad_id)
    dec_in = torch.full_like(tgt, pad_id)
    dec_in[:, 0] = start_id
    dec_in[:, 1:] = tgt[:, :-1]
    labels = tgt.masked_fill(~mask, -100)
    return dec_in, labels, mask


def continuation_inputs(cands: list[np.ndarray], pad_id: int = 0):
    """Decoder-only candidates continuing a prompt: (C, U - 1) inputs (each candidate without its last token, the
    positions whose states score its next token), (C, U) labels (every token, -100 pad: label 0 is scored from
    the prompt's last position), (C, U - 1) mask. U is the longest candidate; U - 1 = 0 for one-token ones."""
    tgt, mask = pad(cands, pad_id)
    labels = tgt.masked_fill(~mask, -100)
    return tgt[:, :-1], labels, mask[:, 1:]


def candidate_inputs(family: str, cands: list[np.ndarray], start_id: int = 0):
    """(inputs, labels, mask) of every candidate, per family (T5: decoder inputs; decoder-only: continuations)."""
    return decoder_inputs(cands, start_id) if family == "t5" else continuation_inputs(cands)
