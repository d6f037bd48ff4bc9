"""End-to-end learning-rate sweep, measured with the real stage CLIs on the real MiniLM and rt-snippets:

    in-loop LST:  k runs of `stages.train_side --feed backbone` (the backbone runs every step of every run)
    ladder-cache: one `stages.cache_activations` + k runs of `stages.train_side --feed cache`

Each command is its own process, timed from the outside (start-up and imports included); peak
memory per run is what the run wrote to its metrics.json (CPU: peak RSS; CUDA: max allocated).
Both arms train the same examples in the same order with the same magnitude init (no Fisher stage,
which both would share). Only the train split is cached: the sweep compares training cost.

    python -m bench.sweep --examples 2000 --epochs 2          # CPU, ~6 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.machine import describe  # noqa: E402


def timed_run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", *cmd], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--task", default="rt-sentiment")
    ap.add_argument("--examples", type=int, default=2000, help="training examples (0 = the whole split)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lrs", default="1e-3,3e-3,1e-2,3e-2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", default="data/bench_sweep")
    ap.add_argument("--data-dir", default="data/raw")
    ap.add_argument("--out", default="bench/results/sweep_cpu.json")
    a = ap.parse_args()
    from pipeline.device import pick_device

    dev = pick_device(a.device)
    work = Path(a.work)
    common = ["--backbone", a.backbone, "--task", a.task, "--data-dir", a.data_dir, "--device", a.device]
    cache = work / "cache"
    t_stage_one = timed_run(["stages.cache_activations", *common, "--splits", "train", "--limit", str(a.examples),
                             "--out", str(cache), "--overwrite", "--no-resume"])
    runs = []
    for feed in ("cache", "backbone"):
        for lr in a.lrs.split(","):
            out = work / f"{feed}_lr{lr}"
            t = timed_run(["stages.train_side", *common, "--cache", str(cache), "--out", str(out), "--feed", feed,
                           "--init", "magnitude", "--side-init", "", "--epochs", str(a.epochs), "--lr", lr,
                           "--limit", str(a.examples)])
            m = json.loads((out / "metrics.json").read_text())
            runs.append({"feed": feed, "lr": float(lr), "wall_s": t, "train_tokens_per_s": m["train_tokens_per_s"],
                         "peak_memory_mb": m["peak_memory_mb"], "peak_memory_kind": m["peak_memory_kind"],
                         "final_train_loss": m["final_train_loss"]})
            print(json.dumps(runs[-1]), flush=True)
    inloop = sum(r["wall_s"] for r in runs if r["feed"] == "backbone")
    cached = t_stage_one + sum(r["wall_s"] for r in runs if r["feed"] == "cache")
    res = {"command": " ".join(["python -m bench.sweep"] + sys.argv[1:]), **describe(dev), "config": vars(a), "stage_one_wall_s": t_stage_one, "runs": runs,
           "inloop_total_s": inloop, "cache_total_s": cached, "sweep_speedup_vs_inloop": inloop / cached,
           "same_losses": all(abs(c["final_train_loss"] - b["final_train_loss"]) < 1e-2 for c, b in
                              zip([r for r in runs if r["feed"] == "cache"], [r for r in runs if r["feed"] == "backbone"]))}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
