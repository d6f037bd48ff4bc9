"""Stage one and the store on CPU, real MiniLM over real rt-snippets: stage-one tokens/s against the
backbone forward alone (same run), bytes per token per codec against raw fp16 and against padding to
max_length, lossy codecs' relative error, and reader batches/s.

    python -m bench.store_codecs --examples 1000 --out bench/results/store_codecs.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.machine import describe
from pipeline import backbone as bbm
from pipeline import cache_activations
from pipeline.batches import reader
from pipeline.config import CacheConfig
from pipeline.inspect_cache import summarize
from pipeline.ladder_store import LadderStore
from pipeline.padding import pad
from pipeline.tasks import get_task


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=1000)
    ap.add_argument("--data-dir", default="data/raw")
    ap.add_argument("--out", default="bench/results/store_codecs.json")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    task = get_task("rt-sentiment")
    exs = task.load(a.data_dir, 0)["train"][: a.examples]
    bb = bbm.load_backbone(bbm.MINILM, "cpu")
    enc = bbm.encode(task, exs, bb.tokenizer, bb.family, 64)
    names = bbm.state_names_for(bb, None)
    t0 = time.perf_counter()
    for b in range(0, len(exs), 64):
        ids, mask = pad(enc.src_ids[b:b + 64])
        bbm.forward_states(bb, ids, mask, names)
    fwd = time.perf_counter() - t0
    tokens = sum(len(s) for s in enc.src_ids)
    res = {"command": "python -m bench.store_codecs " + " ".join(sys.argv[1:]), **describe(torch.device("cpu")),
           "cpus": torch.get_num_threads(), "config": vars(a), "tokens": tokens, "forward_only_tokens_per_s": tokens / fwd, "codecs": {}}
    ref = None
    for codec, dtype in (("none", "fp16"), ("zstd", "fp16"), ("blosc", "fp16"), ("zstd", "bf16"), ("int8", "fp16"),
                         ("bitround", "fp16")):
        cfg = CacheConfig(backbone=bbm.MINILM, task="rt-sentiment", splits=["train"], limit=a.examples, codec=codec,
                          dtype=dtype, out=str(tmp / f"{codec}_{dtype}"), data_dir=a.data_dir, device="cpu")
        t0 = time.perf_counter()
        path = cache_activations.run(cfg, log=lambda *x: None)[0]
        dt = time.perf_counter() - t0
        s = summarize(path, reference=ref)
        disk = sum(r["bytes_on_disk"] for r in s["layers"].values())
        n_layers = len(s["layers"])
        row = {"stage_one_tokens_per_s": tokens / dt, "bytes_per_token_per_layer": disk / tokens / n_layers,
               "vs_raw_fp16": (tokens * 384 * 2 * n_layers) / disk,
               "vs_padded_fp16": (len(exs) * 64 * 384 * 2 * n_layers) / disk}
        errs = [r.get("relative_error_vs_reference") for r in s["layers"].values()]
        if errs[0] is not None:
            row["max_relative_error_vs_fp16"] = max(errs)
        store = LadderStore(path)
        t0 = time.perf_counter()
        nb = sum(1 for _ in reader(store).batches(store.names, 100, shuffle=True))
        row["reader_batches_per_s"] = nb / (time.perf_counter() - t0)
        res["codecs"][f"{codec}/{dtype}"] = row
        if codec == "none":
            ref = path
        print(codec, dtype, json.dumps(row), flush=True)
    res["stage_one_tokens_per_s_ratio_vs_forward"] = res["codecs"]["zstd/fp16"]["stage_one_tokens_per_s"] / res["forward_only_tokens_per_s"]
    Path(a.out).write_text(json.dumps(res, indent=2))
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
