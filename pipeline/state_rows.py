"""Stage one's unit of work, shared by the in-process path and the dask workers: one forward batch of the
frozen backbone as store rows, and the check that stops inf/NaN before they reach a store."""
from __future__ import annotations

import numpy as np
import torch

from pipeline import ladder_store as ls
from pipeline.backbone import Backbone, checkpoint_files, forward_states
from pipeline.config import CacheConfig
from pipeline.layout import TGT
from pipeline.padding import pad


def state_rows(bb: Backbone, src_ids: list[np.ndarray], cand_ids: list[np.ndarray], names: list[str],
               cand: tuple | None) -> dict[str, torch.Tensor]:
    """One forward batch as store rows (float32): src states ragged, (tokens, d) with the padding dropped;
    T5 tgt states K rows per example, (B*K, d), every candidate's tokens in candidate order."""
    ids, mask = pad(src_ids)
    states = forward_states(bb, ids, mask, names, cand)
    B, out = len(src_ids), {}
    for name in names:
        h = states[name]
        if name.startswith(TGT):  # (B*C, U, d) -> K rows per example, candidates concatenated
            C = len(cand_ids)
            h = h.view(B, C, h.shape[1], h.shape[-1])
            rows = torch.cat([h[j, c, : len(cand_ids[c])] for j in range(B) for c in range(C)])
        else:
            rows = torch.cat([h[j, : len(src_ids[j])] for j in range(B)])  # ragged: padding dropped here
        out[name] = rows.float()
    return out


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
