"""Stage one's unit of work, shared by the in-process path and the dask workers (pipeline/cache_cluster.py):
the frozen backbone over one window of consecutive examples, as store rows in example order, and the check
that stops inf/NaN before they reach a store.

Forward batches are a function of the example indices alone: windows of SORT_WINDOW * batch_size examples at
fixed multiples from example 0, each cut into batches of similar length (sorted by length within the window),
its rows put back in example order. The CPU forward is not bit-stable across batch shapes (a batch pads to its
longest example; 29 of 160 tiny-BERT states changed in their last bits when the batch around them changed), so
a resumed run, or a dask range, recomputes exactly the clean run's windows. Sorting matters for ragged text:
hedge-conll2010 plain prompts average 34.5 tokens but a batch of 32 in file order padded to 113 (70% of the
forward spent on padding)."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from pipeline import ladder_store as ls
from pipeline.backbone import Backbone, checkpoint_files, forward_states
from pipeline.config import CacheConfig
from pipeline.layout import TGT, tgt_lengths
from pipeline.padding import pad

SORT_WINDOW = 8  # batches per length-sorted window


def forward_windows(lengths: np.ndarray, batch_size: int, start: int = 0):
    """Stage one's forward batches: (window, [batch, ...]) index arrays, windows of SORT_WINDOW * batch_size examples
    at fixed multiples from example 0 (`start` must be one), each cut into batches of similar length."""
    window = batch_size * SORT_WINDOW
    for w0 in range(start, len(lengths), window):
        w = np.arange(w0, min(w0 + window, len(lengths)))
        order = w[np.argsort(lengths[w], kind="stable")]
        yield w, [order[b:b + batch_size] for b in range(0, len(order), batch_size)]


def dropout_seed(seed: int, dropout_pass: int | None, window_start: int) -> int | None:
    """The dropout masks' seed of one window of a train-mode pass (None: an eval-mode store): a function of the
    window alone, so a resumed run or a dask range draws the clean run's masks."""
    if dropout_pass is None:
        return None
    return int(np.random.SeedSequence([seed, dropout_pass, window_start]).generate_state(1)[0])


def window_rows(bb: Backbone, src_ids: list[np.ndarray], cand_ids: list[np.ndarray], names: list[str],
                cand: tuple | None, batch_size: int, seed: int | None = None) -> dict[str, torch.Tensor]:
    """One window (consecutive examples, starting at a window boundary) as store rows (float32), in example
    order: src states ragged, (tokens, d) with the padding dropped; target states K rows per example, every
    candidate's stored rows (layout.tgt_lengths) in candidate order. `cand`: padding.candidate_inputs().
    `seed` (dropout_seed): run the backbone in train mode, its dropout masks drawn from this seed."""
    lengths = np.array([len(s) for s in src_ids])
    rows_of, C = tgt_lengths(bb.family, cand_ids), len(cand_ids)
    per: dict[str, list] = {name: [None] * len(src_ids) for name in names}
    with backbone_mode(bb, seed):
        for _, batches in forward_windows(lengths, batch_size):
            for idx in batches:
                ids, mask = pad([src_ids[i] for i in idx])
                states = forward_states(bb, ids, mask, names, cand)
                for name in names:
                    h = states[name]
                    for j, i in enumerate(idx):
                        if name.startswith(TGT):  # (B*C, U, d) -> K rows per example, candidates concatenated
                            per[name][i] = torch.cat([h[j * C + c, : rows_of[c]] for c in range(C)])
                        else:
                            per[name][i] = h[j, : lengths[i]]  # ragged: padding dropped here
    return {name: torch.cat(v).float() for name, v in per.items()}


@contextmanager
def backbone_mode(bb: Backbone, seed: int | None):
    """Eval mode (seed None), or train mode with dropout masks drawn from `seed`; the caller's RNG is untouched."""
    with torch.random.fork_rng(devices=[bb.device] if bb.device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        bb.model.train(seed is not None)
        try:
            yield
        finally:
            bb.model.eval()


def check_finite(rows: torch.Tensor, name: str, idx: range, split: str, cfg: CacheConfig, dtype: str) -> None:
    """inf/NaN from the backbone, or values fp16 cannot hold, stop stage one before they reach the store."""
    if not torch.isfinite(rows).all():
        what, fix = "inf/NaN", "check the checkpoint, or run it in fp32 (--device cpu)"
    elif ls.storage_dtype(dtype, cfg.codec) == "float16" and torch.isinf(rows.to(torch.float16)).any():
        what, fix = "values beyond fp16's range (65504)", "store bf16 or fp32 (--dtype bf16)"
    else:
        return
    files = ", ".join(map(str, checkpoint_files(cfg.backbone))) or cfg.backbone
    raise ls.NonFiniteStates(f"backbone {cfg.backbone} (weights: {files}) gave {what} in state {name} for examples "
                             f"{idx.start}..{idx.stop - 1} of split '{split}'; no store was kept: {fix}")
