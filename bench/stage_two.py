"""Stage two at the speed of the side network: what bounds a step, and what a sweep costs.

Part 1, in one process, on a real MiniLM cache of rt-snippets (real lengths: mean 27, longest 64 tokens),
the default side net (r = 8, Fisher-free magnitude init, official dropouts), batch 100:
    padded vs packed   training tokens/s (real tokens only), alternating the two layouts per epoch
    data path          one epoch of batch assembly alone, and one epoch of steps on batches already
                       assembled: the data path's share of a step = data / (data + compute)
Part 2, torch.compile (dynamic shapes) against eager on the same batches: steady-state tokens/s and the
    first epoch's compilation cost, padded and packed.
Part 3, a sweep's shared step: K = 4 configs stepped in turn against one stacked (vmap) computation.
Part 4, end to end through the real CLIs (each process timed from outside, start-up included):
    K = 1, 4, 16 configs (learning rates x seeds) as one `train_side --sweep` against K separate
    `train_side` runs, from the same cache.

    python -m bench.stage_two                      # CPU: ~15 minutes on 2 cores
    python -m bench.stage_two --device cuda        # GPU: the same, device-resident cache
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.machine import describe  # noqa: E402
from pipeline.batches import reader  # noqa: E402
from pipeline.config import DROPOUT_SITES  # noqa: E402


def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _run(a, cache: Path, out: str, pack: bool, **over):
    """A Run of the bench's side net (r = 8, magnitude init built inline) on the cache, not yet stepped."""
    from pipeline.config import TrainConfig
    from pipeline.train_side import Run, setup

    cfg = TrainConfig(**{**dict(task=a.task, cache=str(cache), out=str(Path(a.work) / out), backbone=a.backbone,
                                init="magnitude", side_init="", epochs=a.epochs, device=a.device, pack=pack,
                                max_length=a.max_length), **over})
    return Run(cfg, setup(cfg, log=lambda *x: None), log=lambda *x: None)


def _batches(run, pack: bool, epoch: int) -> list:
    """One epoch's batches of 100 as the training loop reads them (device-resident where the split fits)."""
    s = run.s
    return list(reader(s.train).batches(s.names, 100, shuffle=True, seed=0, epoch=epoch, prefetch=False,
                                        device=s.device, device_budget_mb=run.cfg.device_cache_mb,
                                        pack_len=s.train.longest if pack else 0))


def layouts(a, cache: Path, dev) -> dict:
    """Padded vs packed tokens/s and the data path's share, in one process."""
    out = {}
    for name, pack in (("padded", False), ("packed", True)):
        out[name] = {"run": _run(a, cache, f"run_{name}", pack), "pack": pack, "epochs": []}
    for epoch in range(a.epochs):
        for name, o in out.items():  # alternate layouts: drift in machine speed hits both
            run = o["run"]
            t0 = time.perf_counter()
            batches = _batches(run, o["pack"], epoch)
            _sync(dev)
            data_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for b in batches:
                run.step(b)
            _sync(dev)
            compute_s = time.perf_counter() - t0
            tokens = sum(b.n_tokens for b in batches)
            slots = sum(b.src_ids.numel() for b in batches)
            o["epochs"].append({"data_s": data_s, "compute_s": compute_s, "tokens": tokens, "slots": slots,
                                "steps": len(batches), "final_loss": float(run.losses[-1])})
            run._epoch_start()
            print(name, json.dumps(o["epochs"][-1]), flush=True)
    res = {}
    for name, o in out.items():
        ep = o["epochs"][1:] or o["epochs"]  # the first epoch warms caches
        res[name] = {"tokens_per_s": statistics.median(e["tokens"] / (e["data_s"] + e["compute_s"]) for e in ep),
                     "compute_tokens_per_s": statistics.median(e["tokens"] / e["compute_s"] for e in ep),
                     "data_path_share": statistics.median(e["data_s"] / (e["data_s"] + e["compute_s"]) for e in ep),
                     "padding_share": 1 - ep[0]["tokens"] / ep[0]["slots"], "steps_per_epoch": ep[0]["steps"],
                     "epochs": o["epochs"]}
    res["packed_vs_padded_tokens_per_s_ratio"] = res["packed"]["tokens_per_s"] / res["padded"]["tokens_per_s"]
    return res


def compiled(a, cache: Path, dev) -> dict:
    """Eager vs torch.compile(dynamic=True) of the side net, the same batches in one process: the first epoch
    (compilation included) and the steady state (later epochs, batches assembled beforehand)."""
    import torch

    res = {}
    for layout, pack in (("padded", False), ("packed", True)):
        runs = {}
        for mode in ("eager", "compiled"):
            run = _run(a, cache, f"compile_{layout}_{mode}", pack)
            if mode == "compiled":
                run.model = torch.compile(run.model, dynamic=True)
            runs[mode] = (run, [])
        try:
            for epoch in range(a.epochs):
                batches = _batches(runs["eager"][0], pack, epoch)
                tokens = sum(b.n_tokens for b in batches)
                for mode, (run, eps) in runs.items():
                    t0 = time.perf_counter()
                    for b in batches:
                        run.step(b)
                    _sync(dev)
                    eps.append({"s": time.perf_counter() - t0, "tokens": tokens})
                    print(layout, mode, json.dumps(eps[-1]), flush=True)
        except Exception as e:  # an honest result too: what stops the compiler on this side net
            res[layout] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        r = {}
        for mode, (_, eps) in runs.items():
            r[mode] = {"first_epoch_s": eps[0]["s"],
                       "tokens_per_s": statistics.median(e["tokens"] / e["s"] for e in eps[1:] or eps), "epochs": eps}
        r["compiled_vs_eager_tokens_per_s_ratio"] = r["compiled"]["tokens_per_s"] / r["eager"]["tokens_per_s"]
        r["compile_overhead_s"] = r["compiled"]["first_epoch_s"] - r["eager"]["first_epoch_s"]
        res[layout] = r
    return res


def stacking(a, cache: Path, dev) -> dict:
    """A sweep's step on a shared batch: K = 4 same-shape configs stepped one after another against one stacked
    (vmap) computation, the same batches, in one process; with the official dropouts and without them."""
    import torch

    from pipeline.stacked import StackedRuns

    K, n_batches = 4, 6
    off = {site: 0.0 for site in DROPOUT_SITES}
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    res = {}
    for dropout in ("official", "off"):
        for layout, pack in (("padded", False), ("packed", True)):
            runs = [_run(a, cache, f"stack_{k}", pack, epochs=1, lr=1e-3 * (k + 1), **(off if dropout == "off" else {}))
                    for k in range(K)]
            batches = _batches(runs[0], pack, 0)[:n_batches]

            def in_turn():
                for b in batches:
                    for r in runs:
                        r.step(b)

            def stacked():
                st = StackedRuns(runs)
                for b in batches:
                    st.step(b, amp)

            times = {"in_turn": [], "stacked": []}
            for _ in range(2):  # alternate: drift in machine speed hits both; the first pass warms up
                for name, f in (("in_turn", in_turn), ("stacked", stacked)):
                    t0 = time.perf_counter()
                    f()
                    _sync(dev)
                    times[name].append((time.perf_counter() - t0) / n_batches)
            r = {f"{k}_s_per_batch": v[-1] for k, v in times.items()}
            r["stacked_vs_in_turn_speedup"] = r["in_turn_s_per_batch"] / r["stacked_s_per_batch"]
            res[f"{layout}_dropout_{dropout}"] = r
            print(layout, dropout, json.dumps(r), flush=True)
    return {"configs": K, "batches": n_batches, "results": res}


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", *cmd], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def sweeps(a, cache: Path) -> dict:
    """K configs as one sweep process vs K separate processes (real CLIs, start-up included)."""
    lrs = ["0.001", "0.002", "0.003", "0.005"]
    common = ["stages.train_side", "--params", "none", "--backbone", a.backbone, "--task", a.task, "--cache",
              str(cache), "--init", "magnitude", "--side-init", "", "--epochs", str(a.sweep_epochs), "--device", a.device,
              "--max-length", str(a.max_length)]
    if a.pack:
        common.append("--pack")
    res = {}
    for K in (1, 4, 16):
        seeds = list(range(max(1, K // len(lrs))))
        grid = [(lr, s) for lr in lrs[:K] for s in seeds][:K]
        work = Path(a.work) / f"sweep{K}"
        (work).mkdir(parents=True, exist_ok=True)
        spec = work / "sweep.yaml"
        spec.write_text(f"lr: [{', '.join(sorted({lr for lr, _ in grid}))}]\nseed: [{', '.join(map(str, seeds))}]\n")
        one = timed(common + ["--out", str(work / "one_pass"), "--sweep", str(spec)])
        sep = sum(timed(common + ["--out", str(work / f"alone_{lr}_{s}"), "--lr", lr, "--seed", str(s),
                                  "--data-seed", "0"]) for lr, s in grid)
        res[K] = {"configs": K, "one_pass_s": one, "separate_runs_s": sep, "speedup": sep / one}
        print(json.dumps(res[K]), flush=True)
    res["sweep16_one_pass_time_ratio_vs_one_run"] = res[16]["one_pass_s"] / res[1]["one_pass_s"]
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--task", default="rt-sentiment")
    ap.add_argument("--examples", type=int, default=3000, help="training examples cached (0 = the whole split)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per layout in part 1 (the first is warm-up)")
    ap.add_argument("--sweep-epochs", type=int, default=1)
    ap.add_argument("--pack", action="store_true", help="part 2 with packed batches")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", default="data/bench_stage_two")
    ap.add_argument("--data-dir", default="data/raw")
    ap.add_argument("--parts", default="layouts,compile,stacking,sweeps")
    ap.add_argument("--merge", action="store_true", help="update only the parts run in an existing --out file")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    from pipeline import cache_activations as stage_one
    from pipeline.config import CacheConfig
    from pipeline.device import pick_device

    dev = pick_device(a.device)
    cache = Path(a.work) / "cache"
    stage_one.run(CacheConfig(backbone=a.backbone, task=a.task, splits=["train", "validation"], limit=a.examples,
                              max_length=a.max_length, out=str(cache), data_dir=a.data_dir, device=a.device),
                  log=print)
    res = {"command": " ".join(["python -m bench.stage_two"] + sys.argv[1:]), **describe(dev), "config": vars(a)}
    if "layouts" in a.parts:
        res["layouts"] = layouts(a, cache, dev)
    if "compile" in a.parts:
        res["compile"] = compiled(a, cache, dev)
    if "stacking" in a.parts:
        res["stacking"] = stacking(a, cache, dev)
    if "sweeps" in a.parts:
        res["sweeps"] = sweeps(a, cache)
    out = Path(a.out or f"bench/results/stage_two_{dev.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.merge and out.exists():  # each part's ratios are within that part's own run
        old = json.loads(out.read_text())
        res = {**old, **res, "command": old["command"], "merged": old.get("merged", []) + [res["command"]]}
    out.write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps({k: v for k, v in res.items() if k not in ("config",)}, indent=1, default=str))


if __name__ == "__main__":
    main()
