"""Past one process, measured with the real CLIs on the real MiniLM and rt-snippets:

    stage one   in this process, then `--scheduler local:1` and `--scheduler local:2` (dask workers)
    stage two   one process, then `torchrun --standalone --nproc-per-node 2` (DDP over gloo)

Each configuration runs `--repeats` times, interleaved (A B C A B C), and the median is kept: the machine may be
shared, so compare the figures of one run of this script with each other (ratios), not with other runs. Stage
one's tokens/s is what the stage reports (tokens written over the time from the first forward, or the first
task submitted, to the last shard), so start-up is excluded; the wall time from outside includes it (the
interpreter, the workers' imports, the backbone loads). Stage one's stores are also compared file for file
with the in-process one. Stage two's tokens/s is metrics.json's train_tokens_per_s (all ranks' tokens over
rank 0's training time, validation excluded).

    python -m bench.distributed                           # CPU: ~10 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.machine import describe  # noqa: E402


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **(env or {})))
    if res.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0, res.stdout


def same_files(a: Path, b: Path) -> bool:
    fa = {p.relative_to(a).as_posix(): p for p in a.rglob("*") if p.is_file()}
    fb = {p.relative_to(b).as_posix(): p for p in b.rglob("*") if p.is_file()}
    return fa.keys() == fb.keys() and all(fa[k].read_bytes() == fb[k].read_bytes() for k in fa)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--task", default="rt-sentiment")
    ap.add_argument("--examples", type=int, default=3000, help="training examples cached and trained on")
    ap.add_argument("--shard-tokens", type=int, default=4096,
                    help="small shards so that the split makes ~20 of them: several ranges per worker")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default="data/bench_distributed")
    ap.add_argument("--data-dir", default="data/raw")
    ap.add_argument("--out", default="bench/results/distributed_cpu.json")
    a = ap.parse_args()
    import torch

    work = Path(a.work)
    py = [sys.executable, "-m"]
    one = ["stages.cache_activations", "--backbone", a.backbone, "--task", a.task, "--data-dir", a.data_dir,
           "--splits", "train", "--limit", str(a.examples), "--shard-tokens", str(a.shard_tokens), "--device", a.device]
    arms = {"in_process": [], "local_1_worker": ["--scheduler", "local:1"], "local_2_workers": ["--scheduler", "local:2"]}
    stage_one = {k: {"command": "python -m " + shlex.join([*one, *v, "--out", str(work / k)]), "tokens_per_s": [],
                     "wall_s": []} for k, v in arms.items()}
    for rep in range(a.repeats):
        for name, extra in arms.items():
            out = work / name
            shutil.rmtree(out, ignore_errors=True)
            wall, log = timed(py + one + extra + ["--out", str(out)])
            tps = float(re.search(r"MiB on disk, (\d+) tokens/s", log)[1])
            stage_one[name]["tokens_per_s"].append(tps)
            stage_one[name]["wall_s"].append(wall)
            print(f"stage one {name} #{rep}: {tps:.0f} tokens/s, {wall:.1f} s", flush=True)
    for name, r in stage_one.items():
        r["median_tokens_per_s"] = statistics.median(r["tokens_per_s"])
        r["median_wall_s"] = statistics.median(r["wall_s"])
        r["store_identical_to_in_process"] = same_files(work / "in_process", work / name)
    base1 = stage_one["in_process"]["median_tokens_per_s"]

    train = ["stages.train_side", "--backbone", a.backbone, "--task", a.task, "--data-dir", a.data_dir,
             "--cache", str(work / "in_process"), "--init", "magnitude", "--side-init", "", "--epochs", str(a.epochs),
             "--device", a.device]
    torchrun = ["torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    runs = {"1_process": ([], {}), "1_process_1_thread": ([], {"OMP_NUM_THREADS": "1"}),
            "torchrun_2_ranks": (torchrun, {})}
    stage_two = {k: {"command": " ".join([f"{e}={v}" for e, v in env.items()] + ["python -m", shlex.join(
                         [*launch, *train, "--out", str(work / f"run_{k}")])]),
                     "tokens_per_s": [], "wall_s": []} for k, (launch, env) in runs.items()}
    for rep in range(a.repeats):
        for name, (launch, env) in runs.items():
            out = work / f"run_{name}"
            shutil.rmtree(out, ignore_errors=True)
            wall, _ = timed(py + launch + train + ["--out", str(out)], env)
            m = json.loads((out / "metrics.json").read_text())
            stage_two[name]["tokens_per_s"].append(m["train_tokens_per_s"])
            stage_two[name]["wall_s"].append(wall)
            stage_two[name]["final_train_loss"] = m["final_train_loss"]
            print(f"stage two {name} #{rep}: {m['train_tokens_per_s']:.0f} tokens/s, {wall:.1f} s", flush=True)
    for r in stage_two.values():
        r["median_tokens_per_s"] = statistics.median(r["tokens_per_s"])
        r["median_wall_s"] = statistics.median(r["wall_s"])
    base2 = stage_two["1_process"]["median_tokens_per_s"]
    res = {"command": " ".join(["python -m bench.distributed"] + sys.argv[1:]), **describe(torch.device(a.device)),
           "config": vars(a),
           "notes": "Timed on a shared machine (other jobs were running): compare figures within this file only, as "
                    "ratios; each figure is the median of the interleaved repeats. 2 CPU cores in all: local:1 runs one "
                    "worker with 2 torch threads, local:2 two workers with 1 thread each; torchrun gives each rank 1 "
                    "thread (OMP_NUM_THREADS=1), the plain process uses torch's default (2).",
           "stage_one": stage_one,
           "stage_one_speedup_vs_in_process": {k: r["median_tokens_per_s"] / base1 for k, r in stage_one.items()},
           "stage_two": stage_two,
           "stage_two_speedup_vs_1_process": {k: r["median_tokens_per_s"] / base2 for k, r in stage_two.items()}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps({k: res[k] for k in ("stage_one_speedup_vs_in_process", "stage_two_speedup_vs_1_process")}, indent=2))


if __name__ == "__main__":
    main()
