"""In-loop LST's backbone feed: one padded forward per batch against length-sorted chunks (train_side.FEED_CHUNK),
on the real cache of a task, interleaved in one process so the ratio holds on a shared machine.

    python -m bench.inloop_feed --cache <bench.llm work folder>/pang-lee/cache_l10 --backbone smollm2-135m-instruct \
        --task pang-lee --batches 4
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    from bench.machine import describe
    from pipeline import train_side
    from pipeline.config import TrainConfig
    from pipeline.ladder_store import LadderStore
    from pipeline.padding import pad

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="a stage-one output folder (its train store is read)")
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/inloop_feed.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    store = LadderStore(Path(a.cache) / "train.zarr")
    feed = train_side.BackboneFeed(TrainConfig(backbone=a.backbone, task=a.task, device="cpu"), store)
    names = store.names
    rng = np.random.default_rng(0)
    lens = np.diff(store.offsets)
    chunk = train_side.FEED_CHUNK
    times = {"one_padded_forward": [], f"chunks_of_{chunk}": []}
    real = padded = 0
    for _ in range(a.batches):
        idx = np.sort(rng.choice(store.n, a.batch, replace=False))
        ids, mask = pad([store.src_ids[store.offsets[i]:store.offsets[i + 1]].astype(np.int64) for i in idx])
        real += int(lens[idx].sum())
        padded += ids.numel()
        for key, c in zip(times, (10**9, chunk)):  # 10**9: the whole batch in one padded forward
            train_side.FEED_CHUNK = c
            t0 = time.perf_counter()
            feed.states(ids, mask, names)
            times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    one, chunked = med.values()
    res = {"command": " ".join(["python -m bench.inloop_feed"] + sys.argv[1:]), **describe(torch.device("cpu")),
           "config": vars(a), "real_tokens_per_batch": real / a.batches, "padded_tokens_per_batch": padded / a.batches,
           "median_s_per_batch": med, "chunked_speedup": one / chunked}
    print(json.dumps(res, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
