"""What closes the gap between LST and full fine-tuning on MiniLM (issue 10, item 9): side-net variants
at one seed, each at its best learning rate on validation, with trainable parameters, stage-two peak
memory and throughput beside the accuracy, so the trade-off is one table.

    python -m bench.explore --task rt-sentiment --device cpu

Each run goes through bench.accuracy's job machinery (same caches, Fisher inits, per-job result files,
resumable); bench/results/lst_explore.json collects them. The LST default is `lst_cache`. A method's lr grid
trains as one `train_side` sweep (one read of each batch; --one-pass, the default), or as separate runs
(--no-one-pass); both write the same per-(method, lr) result files.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import DROPOUT_SITES  # noqa: E402 - after the path insert

DROPOUT_OFF = {site: 0.0 for site in DROPOUT_SITES}  # the official sites (ladder_dropout is off already)
EXPLORE = {  # method -> TrainConfig fields that differ from LST (bench.accuracy.LST, r = 8)
    "lst_mix_final": dict(mix_final=True),  # QST: gated mix of up(side) with the backbone's final state
    "lst_epochs20": dict(epochs=20),
    "lst_no_dropout": DROPOUT_OFF,
    "lst_r4": dict(r=4),  # 4x the side width: over the 2% parameter budget on MiniLM
    "lst_r4_mix_final": dict(r=4, mix_final=True),
    "lst_r16": dict(r=16),
    # item 5: the official code runs the frozen backbone in train mode, so its ladders see dropout; a cache cannot.
    # In the loop with backbone dropout on, against lst_inloop (off): does that difference matter?
    "lst_inloop_backbone_dropout": dict(feed="backbone", backbone_dropout=True),
    # ...and from the cache, a stand-in: dropout on each cached state before its ladder (BERT's hidden dropout, 0.1)
    "lst_ladder_dropout": dict(ladder_dropout=0.1),
}
LRS = [3e-4, 1e-3, 3e-3]
BACKBONE_PARAMS = 22_713_216  # all-MiniLM-L6-v2 (BertModel incl. pooler), counted from its safetensors


def lr_grid(task: str, method: str, seed: int, paths: dict, a) -> list[dict]:
    """The method's result at every lr of --lrs: result files already written are read back; the rest train."""
    from bench import accuracy as A

    jobs = [A.make_job(task, method, seed, lr, paths, a) for lr in a.lrs]
    todo = [j for j in jobs if not Path(j["result"]).exists()]
    if todo and a.one_pass and A.lst_config(method)["feed"] == "cache":
        import dataclasses

        import torch

        from pipeline.train_side import sweep_configs, train

        torch.set_num_threads(jobs[0]["threads"])
        t0 = time.perf_counter()
        cfg, codec = A.lst_train_config(todo[0])
        cfg = dataclasses.replace(cfg, sweep={"lr": [j["lr"] for j in todo]}, resume=True,
                                  out=str(Path(a.work) / "runs" / task / f"{method}_s{seed}_sweep"))
        train(cfg, log=print)
        wall = (time.perf_counter() - t0) / len(todo)  # the pass's time, shared by its configs
        for job, (_, c) in zip(todo, sweep_configs(cfg)):
            m = json.loads((Path(c.out) / "metrics.json").read_text())
            A.save_result(job, {**A.lst_result(job, c, codec, m), "one_pass_configs": len(todo)}, wall)
    return [r for r in (A.run_job(j) for j in jobs) if r is not None]


def main():
    from bench import accuracy as A
    from bench.machine import describe

    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="rt-sentiment")
    ap.add_argument("--methods", default=",".join(["lst_cache", *EXPLORE]))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backbone", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", default="data/bench_accuracy")
    ap.add_argument("--jobs-dir", default="")
    ap.add_argument("--data-dir", default="data/raw")
    ap.add_argument("--out", default="bench/results/lst_explore.json")
    ap.add_argument("--lrs", default=",".join(f"{x:g}" for x in LRS), help="learning rates tried per method")
    ap.add_argument("--jobs", type=int, default=1, help="torch threads = cores / jobs (2: share a 2-core machine)")
    ap.add_argument("--one-pass", action=argparse.BooleanOptionalAction, default=True,
                    help="train a method's lr grid as one sweep (default) or as separate runs")
    a = ap.parse_args()
    a.limit, a.epochs = 0, 0
    a.lrs = [float(x) for x in a.lrs.split(",")]
    methods = a.methods.split(",")
    a.lst_methods = methods
    t0 = time.perf_counter()
    paths = A.prepare(a.task, a)
    rows = []
    for m in methods:
        runs = lr_grid(a.task, m, a.seed, paths, a)
        metric = A._headline(a.task)
        best = max(runs, key=lambda r: r["val"][metric])
        rows.append({"method": m, "config": A.lst_config(m), "best_lr": best["lr"],
                     "val": 100 * best["val"][metric], "test": 100 * best["test"][metric],
                     "by_lr": {f"{r['lr']:g}": {"val": 100 * r["val"][metric], "test": 100 * r["test"][metric]}
                               for r in runs},
                     "trainable_params": best["trainable_params"],
                     "trainable_pct_of_backbone": 100 * best["trainable_params"] / BACKBONE_PARAMS,
                     "peak_memory_mb": best.get("peak_memory_mb"), "train_tokens_per_s": best["train_tokens_per_s"],
                     "best_epoch": best.get("best_epoch")})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.exists() else {"tasks": {}}
    res["tasks"][a.task] = {"headline_metric": A._headline(a.task), "seed": a.seed, "lrs": a.lrs, "rows": rows,
                            "run": {"command": " ".join(["python -m bench.explore"] + sys.argv[1:]),
                                    **describe(A._device(a.device))},
                            "wall_s": time.perf_counter() - t0}
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
