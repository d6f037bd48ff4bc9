"""Accuracy suite on real offline tasks with the real MiniLM backbone, full splits, 3 seeds.

Per task: stage one once per codec (fp16+zstd, int8, bitround), the Fisher side inits once, then

    lst_cache      LST from the cache (ours), Fisher init, fp16 cache
    lst_inloop     the same runs with the backbone in the loop (--feed backbone), same seeds and lr
    lst_magnitude  / lst_random      init ablation (paper Fig. 7)
    lst_int8       / lst_bitround    codec ablation (lossy caches, train and test)
    lst_fuse_after the ladder fused after its side block (the order this project had before the fix)
    full_ft, lora, selective         baselines on the backbone (bench/baselines.py)
    frozen         logistic regression on frozen mean-pooled features

Learning rates: each trained method picks its lr from a small grid by validation score with seed 0
(the LST variants use lst_cache's), then runs seeds 1 and 2 at that lr. Every trained method reports the
test score of its best validation epoch (the official LST code's load_best_model_at_end; LST through
train_side's best-epoch side.safetensors, the baselines by scoring validation and test after each epoch).
Jobs run in parallel processes (--jobs); each job's result is a JSON file under --jobs-dir, so an
interrupted suite resumes where it stopped, also on another machine when those files are copied along.

    python -m bench.accuracy --tasks rt-sentiment,rt-rating,pang-lee,hedge-conll2010,bbc-topics --jobs 6
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.batches import reader  # noqa: E402

TASKS = {  # epochs: the paper's 10, 20 on small sets (< 10k examples); max_length covers the task's texts
    "rt-sentiment": {"epochs": 10, "max_length": 64},
    "rt-rating": {"epochs": 10, "max_length": 64},
    "pang-lee": {"epochs": 20, "max_length": 64},
    "hedge-conll2010": {"epochs": 20, "max_length": 64},
    "bbc-topics": {"epochs": 20, "max_length": 256},
}
LR_GRID = {"lst_cache": [1e-3, 3e-3, 1e-2], "full_ft": [2e-5, 5e-5, 1e-4], "lora": [3e-4, 1e-3, 3e-3],
           "selective": [2e-5, 5e-5, 1e-4]}
LST = dict(init="fisher", codec="zstd", feed="cache", variant="ladder")  # LST from the cache: the paper's design
LST_VARIANTS = {  # method -> what differs from LST (TrainConfig fields, and the cache's codec)
    "lst_cache": {}, "lst_inloop": dict(feed="backbone"), "lst_magnitude": dict(init="magnitude"),
    "lst_random": dict(init="random"), "lst_int8": dict(codec="int8"), "lst_bitround": dict(codec="bitround"),
    "lst_fuse_after": dict(variant="fuse_after")}


def lst_config(method: str) -> dict:
    from bench.explore import (
        EXPLORE,  # what-closes-the-gap variants (issue 10 item 9), same machinery
    )

    return {**LST, "r": R, **{**LST_VARIANTS, **EXPLORE}[method]}
BATCH = 100  # paper
R = 8


def _quiet(*a, **k):
    pass


def prepare(task: str, a) -> dict:
    """Stage one per codec and the Fisher side init; returns their paths."""
    from pipeline import cache_activations, prune_init
    from pipeline.config import CacheConfig, PruneConfig

    work, t = Path(a.work) / task, TASKS[task]
    paths = {}
    methods = getattr(a, "lst_methods", None) or list(LST_VARIANTS)
    # zstd: the baselines read token ids from it; the other codecs only where an LST method reads them
    for codec in ["zstd"] + sorted({lst_config(m)["codec"] for m in methods} - {"zstd"}):
        out = work / f"cache_{codec}"
        # train-mode passes of the train split, as many as a method reading this codec's cache needs
        passes = max([lst_config(m).get("dropout_passes", 0) for m in methods if lst_config(m)["codec"] == codec],
                     default=0)
        cache_activations.run(CacheConfig(backbone=a.backbone, task=task, max_length=t["max_length"], dtype="fp16", codec=codec,
                              out=str(out), data_dir=a.data_dir, device=a.device, limit=a.limit,
                              dropout_passes=passes), log=print)
        paths[codec] = str(out)
    for variant, r in sorted({(lst_config(m)["variant"], lst_config(m)["r"]) for m in methods}):
        init = work / f"side_init_fisher_{variant}_r{r}.safetensors"  # an init file names its variant and r
        if not init.exists():
            prune_init.run(PruneConfig(backbone=a.backbone, task=task, r=r, init="fisher", variant=variant,
                                      max_length=t["max_length"], out=str(init), data_dir=a.data_dir,
                                      device=a.device), log=print)
        paths[f"fisher_{variant}_r{r}"] = str(init)
    return paths


def _metrics(task, scores, labels):
    from pipeline.metrics import predictions, task_metrics
    from pipeline.tasks import get_task

    tk = get_task(task)
    return task_metrics(tk.kind, predictions(scores, tk.kind, tk.regression_bins), labels)


def lst_train_config(job: dict):
    """The TrainConfig of an LST job, and the codec of the cache it reads."""
    from pipeline.config import TrainConfig

    c = lst_config(job["method"])
    codec = c.pop("codec")
    side_init = job["paths"][f"fisher_{c['variant']}_r{c['r']}"] if c["init"] == "fisher" else ""
    kw = dict(task=job["task"], cache=job["paths"][codec], out=job["out"], backbone=job["backbone"],
              side_init=side_init, epochs=job["epochs"], lr=job["lr"], batch_size=BATCH, seed=job["seed"],
              device=job["device"], max_length=job["max_length"], data_dir=job["data_dir"])
    return TrainConfig(**{**kw, **c}), codec  # a variant may set any TrainConfig field (epochs, dropouts, mix_final, r)


def lst_result(job: dict, cfg, codec: str, m: dict) -> dict:
    """A trained LST run's result: the best epoch's validation metrics (its metrics.json `m`) and its test score."""
    from pipeline import evaluate as ev
    from pipeline.ladder_store import LadderStore
    from pipeline.run_folder import load_side

    net, _ = load_side(cfg.out, _device(job["device"]))
    test = LadderStore(Path(job["paths"][codec]) / "test.zarr")
    feed_fn = None
    if cfg.feed == "backbone":  # score the test split in the loop too
        from pipeline.train_side import BackboneFeed

        feed_fn = BackboneFeed(cfg, test)
    scores = ev.score_store(net, test, 256, _device(job["device"]), feed=feed_fn)
    val = {k[4:]: v for k, v in m.items() if k.startswith("val_")}  # the best epoch's (the saved side net)
    return {"val": val, "test": _metrics(job["task"], scores, test.labels), "trainable_params": m["trainable_params"],
            "train_tokens_per_s": m["train_tokens_per_s"], "peak_memory_mb": m["peak_memory_mb"],
            "best_epoch": m["best_epoch"]}


def run_lst(job: dict) -> dict:
    from pipeline.train_side import train

    cfg, codec = lst_train_config(job)
    return lst_result(job, cfg, codec, train(cfg, log=_quiet))


def _device(name):
    from pipeline.device import pick_device

    return pick_device(name)


def run_baseline(job: dict) -> dict:
    """full_ft / lora / selective on the backbone, reading token ids (and labels) from the cache."""
    import math

    import numpy as np
    import torch
    from transformers import AutoModel

    from bench.baselines import build_encoder, loss_encoder
    from pipeline.backbone import resolve
    from pipeline.ladder_store import LadderStore
    from pipeline.tasks import get_task
    from pipeline.train_side import lr_lambda

    dev = _device(job["device"])
    cache = Path(job["paths"]["zstd"])
    tr, va, te = (LadderStore(cache / f"{s}.zarr") for s in ("train", "validation", "test"))
    task = get_task(job["task"])
    n_out = 1 if task.kind == "regression" else len(task.label_names)
    torch.manual_seed(job["seed"])
    enc = AutoModel.from_pretrained(resolve(job["backbone"]), dtype=torch.float32)
    model, params = build_encoder(job["method"], enc, n_out)
    model.generator.manual_seed(job["seed"])
    model.to(dev)
    steps = math.ceil(tr.n / BATCH) * job["epochs"]
    opt = torch.optim.AdamW(params, lr=job["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(max(1, min(500, steps // 10)), steps))
    amp = dict(device_type="cuda", dtype=torch.bfloat16) if dev.type == "cuda" else dict(device_type="cpu", enabled=False)

    @torch.no_grad()
    def scores(store):
        model.eval()
        out = []
        for b in reader(store).batches([], 256, shuffle=False):
            with torch.autocast(**amp):
                out.append(model(b.src_ids.to(dev), b.src_mask.to(dev)).float().cpu().numpy())
        return np.concatenate(out)

    key = _headline(job["task"])
    best, train_time, tokens = None, 0.0, 0
    for epoch in range(job["epochs"]):
        model.train()
        t0 = time.perf_counter()
        for b in reader(tr).batches([], BATCH, shuffle=True, seed=job["seed"], epoch=epoch):
            ids, mask, y = b.src_ids.to(dev), b.src_mask.to(dev), b.labels.to(dev)
            with torch.autocast(**amp):
                loss = loss_encoder(model, ids, mask, y, task.kind)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            tokens += int(mask.sum())
        train_time += time.perf_counter() - t0
        val = _metrics(job["task"], scores(va), va.labels)
        if best is None or val[key] > best["val"][key]:  # ties keep the earlier epoch
            best = {"val": val, "test": _metrics(job["task"], scores(te), te.labels), "best_epoch": epoch + 1}
    return {**best, "trainable_params": sum(p.numel() for p in params), "train_tokens_per_s": tokens / train_time}


def run_job(job: dict) -> dict:
    path = Path(job["result"])
    if path.exists():
        return json.loads(path.read_text())
    import torch

    torch.set_num_threads(job["threads"])
    t0 = time.perf_counter()
    try:
        res = run_lst(job) if job["method"].startswith("lst_") else run_baseline(job)
    except Exception as e:  # noqa: BLE001 - one failed job (e.g. out of GPU memory) must not end the suite
        print(f"{job['task']} {job['method']} seed={job['seed']} lr={job['lr']:g}: FAILED {type(e).__name__}: "
              f"{str(e)[:200]}", flush=True)
        return None
    return save_result(job, res, time.perf_counter() - t0)


def save_result(job: dict, res: dict, wall_s: float) -> dict:
    """Write a finished job's result file (atomically: a rerun skips the job only if it is whole)."""
    import torch

    from bench.machine import describe, git_commit
    from pipeline.durable import atomic_path

    path = Path(job["result"])
    res.update({k: job[k] for k in ("task", "method", "seed", "lr", "epochs")}, wall_s=wall_s, commit=git_commit())
    where = describe(_device(job["device"]))
    res.setdefault("device", where["device"])  # a table may mix runs from several machines
    res.update(versions=where["versions"], torch_threads=torch.get_num_threads())
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(res, indent=1))
    print(f"{job['task']} {job['method']} seed={job['seed']} lr={job['lr']:g}: "
          f"val {res['val'].get(_headline(job['task']))} test {res['test'].get(_headline(job['task']))} "
          f"({res['wall_s']:.0f} s)", flush=True)
    return res


def _headline(task):
    from pipeline.tasks import get_task

    return get_task(task).metric


def make_job(task, method, seed, lr, paths, a) -> dict:
    key = f"{task}/{method}_s{seed}_lr{lr:g}"
    return {"task": task, "method": method, "seed": seed, "lr": lr, "paths": paths, "backbone": a.backbone,
            "epochs": a.epochs or TASKS[task]["epochs"], "max_length": TASKS[task]["max_length"], "device": a.device,
            "data_dir": a.data_dir, "out": str(Path(a.work) / "runs" / key), "result": str(Path(a.jobs_dir or Path(a.work) / "jobs") / f"{key}.json"),
            "threads": max(1, (os.cpu_count() or 2) // a.jobs)}


def frozen(task, paths) -> dict:
    from pipeline import evaluate as ev
    from pipeline.ladder_store import LadderStore
    from pipeline.tasks import get_task

    c = Path(paths["zstd"])
    m = ev.frozen_features_baseline(LadderStore(c / "train.zarr"), LadderStore(c / "test.zarr"), get_task(task).kind)
    return {k[len("baseline_"):]: v for k, v in m.items()}


def mean_std(vals: list[float]) -> tuple[float, float]:
    """Mean and sample std over seeds; one seed has no spread to show (0.0, which tables print as "1 seed")."""
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def aggregate(task: str, rows: list[dict], frozen_test: dict) -> dict:
    metric = _headline(task)
    out = {"headline_metric": metric, "methods": {}}
    for method in sorted({r["method"] for r in rows}):
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["seed"])
        vals = [100 * r["test"][metric] for r in rs]
        mean, std = mean_std(vals)
        out["methods"][method] = {
            "lr": rs[0]["lr"], "seeds": [r["seed"] for r in rs], "test": vals, "mean": mean, "std": std,
            "test_accuracy_mean": statistics.mean(100 * r["test"].get("accuracy", float("nan")) for r in rs),
            "trainable_params": rs[0]["trainable_params"]}
    if frozen_test is not None:
        out["methods"]["frozen"] = {"test": [100 * frozen_test[metric]], "mean": 100 * frozen_test[metric],
                                    "std": 0.0, "trainable_params": None}
    ms = out["methods"]
    by_seed = {m: {r["seed"]: 100 * r["test"][metric] for r in rows if r["method"] == m} for m in ms}
    if "lst_cache" in by_seed and "lst_inloop" in by_seed:
        common = sorted(set(by_seed["lst_cache"]) & set(by_seed["lst_inloop"]))
        d = [by_seed["lst_cache"][s] - by_seed["lst_inloop"][s] for s in common]
        out["cache_vs_inloop_delta_pt"] = {"per_seed": d, "mean": statistics.mean(d) if d else None}
    if "lst_cache" in ms and "full_ft" in ms:
        out["lst_vs_full_ft_delta_pt"] = ms["lst_cache"]["mean"] - ms["full_ft"]["mean"]
    return out


def still_to_run(task: str, runs: list[dict], best: dict, seeds: list[int], jobs_dir: Path) -> str:
    """What the table still lacks for `task`, and the command that runs each missing cell on its own (one job per
    call: a CPU takes them one at a time; a GPU can take the whole --methods list)."""
    todo = {}  # method -> what it lacks
    for m in [*LR_GRID, *LST_VARIANTS]:
        if m in LR_GRID and m not in best:
            todo[m] = f"lr grid at seed {seeds[0]}"
            continue
        lr = best.get(m, best.get("lst_cache"))
        if lr is None:
            continue  # an LST variant waits for lst_cache's lr
        done = {r["seed"] for r in runs if r["method"] == m and r["lr"] == lr}
        left = [s for s in seeds if s not in done]
        if left:
            todo[m] = f"seed{'s' if len(left) > 1 else ''} {', '.join(map(str, left))} at lr {lr:g}"
    if not todo:
        return ""
    how = [f"An LST row resumes from {jobs_dir}/{task} with python -m bench.explore --task {task} --device <cpu|cuda> "
           f"--jobs 1 --jobs-dir {jobs_dir} --methods <method> --seeds <s> --lrs <lr>"]
    if set(todo) & set(LR_GRID) - {"lst_cache"}:
        how.append(f"a baseline with python -m bench.accuracy --tasks {task} --methods <method> --jobs-dir {jobs_dir}")
    return f"still to run: {'; '.join(f'{m} ({what})' for m, what in todo.items())}. " + "; ".join(how)


def collect(a):
    """Aggregate whatever job results exist for --tasks from --jobs-dir, without running anything: the lr of
    each tuned method from its seed-0 grid runs, then the runs at that lr; methods with no runs are listed as
    missing. The frozen-features baseline is computed here when the task's fp16 cache exists under --work, and
    otherwise kept from the committed results."""
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.exists() else {"tasks": {}}
    jobs_dir = Path(a.jobs_dir or Path(a.work) / "jobs")
    for task in a.tasks.split(","):
        runs = [json.loads(f.read_text()) for f in sorted((jobs_dir / task).glob("*.json"))]
        metric = _headline(task)
        best = {}
        for m in LR_GRID:
            grid = [r for r in runs if r["method"] == m and r["seed"] == 0 and r["lr"] in LR_GRID[m]]
            grid.sort(key=lambda r: LR_GRID[m].index(r["lr"]))  # a tie on validation goes as in a run: grid order
            if len(grid) == len(LR_GRID[m]):
                best[m] = max(grid, key=lambda r: r["val"][metric])["lr"]
        lst_lr = best.get("lst_cache")
        rows = [r for r in runs if (r["method"] in best and r["lr"] == best[r["method"]])
                or (r["method"] in LST_VARIANTS and r["method"] != "lst_cache" and r["lr"] == lst_lr)]
        sel = [r for r in runs if r["method"] in LR_GRID and r["seed"] == 0]
        cache = Path(a.work) / task / "cache_zstd"
        frozen_test = frozen(task, {"zstd": str(cache)}) if (cache / "test.zarr").exists() else None
        missing = sorted((set(LR_GRID) | set(LST_VARIANTS)) - {r["method"] for r in rows})
        agg = aggregate(task, rows, frozen_test)
        old = res["tasks"].get(task, {})
        kept = old.get("methods", {}).get("frozen")
        if frozen_test is None and kept:  # its code did not change: the committed score stands without a cache
            agg["methods"]["frozen"] = kept
        # where the rows ran: job files older than the `device` field do not say, so a note set on an earlier
        # collect (or by the run itself) stands
        run = {"command": a.collect, "collected_by": " ".join(["python -m bench.accuracy"] + sys.argv[1:]),
               **({"device": old["run"]["device"]} if "device" in old.get("run", {}) else {}), **TASKS[task]}
        res["tasks"][task] = {**agg, "run": run, "lr_selection": sel, "runs": rows, "missing_methods": missing,
                              "pending": still_to_run(task, runs, best, [int(s) for s in a.seeds.split(",")], jobs_dir)}
        print(task, "methods:", sorted(agg["methods"]), "missing:", missing, "|", res["tasks"][task]["pending"])
    out.write_text(json.dumps(res, indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--backbone", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--work", default="data/bench_accuracy")
    ap.add_argument("--data-dir", default="data/raw")
    ap.add_argument("--out", default="bench/results/accuracy.json")
    ap.add_argument("--jobs-dir", default="", help="where each job's result JSON goes (default: <work>/jobs)")
    ap.add_argument("--limit", type=int, default=0, help="smoke runs only: cache N examples per split")
    ap.add_argument("--epochs", type=int, default=0, help="smoke runs only: override the epochs per task")
    ap.add_argument("--methods", default="", help="comma list of methods to run (default: all); the task's other "
                    "methods keep the runs already in --out, each marked with the command that made it")
    ap.add_argument("--collect", default="", help="no training: aggregate the job files of a partly run task "
                    "(machine and command recorded here), e.g. after a device's time ran out")
    a = ap.parse_args()
    from bench.machine import describe

    if a.collect:
        return collect(a)

    seeds = [int(s) for s in a.seeds.split(",")]
    dev = _device(a.device)
    run_info = {"command": " ".join(["python -m bench.accuracy"] + sys.argv[1:]), **describe(dev),
                "config": {**vars(a), "lr_grid": LR_GRID, "batch_size": BATCH, "lst": {**LST, "r": R},
                           "lst_variants": LST_VARIANTS}}
    out = Path(a.out)
    # tasks may run in separate invocations (or machines): each task keeps its own run info
    res = json.loads(out.read_text()) if out.exists() else {"tasks": {}}
    methods = set(a.methods.split(",")) if a.methods else set(LR_GRID) | set(LST_VARIANTS)
    unknown = methods - set(LR_GRID) - set(LST_VARIANTS)
    if unknown:
        ap.error(f"--methods: unknown {sorted(unknown)}; known: {', '.join(list(LR_GRID) + list(LST_VARIANTS))}")
    if methods & set(LST_VARIANTS):
        methods.add("lst_cache")  # the LST variants run at lst_cache's learning rate
    for task in a.tasks.split(","):
        t0 = time.perf_counter()
        paths = prepare(task, a)
        # 256-token inputs take about twice the GPU memory per job: 14 such jobs ran an H100 out of memory
        n_jobs = a.jobs if TASKS[task]["max_length"] <= 128 else max(1, a.jobs // 2)
        pool = ProcessPoolExecutor(n_jobs, mp_context=get_context("spawn"))
        tuned = [m for m in LR_GRID if m in methods]
        grid = [make_job(task, m, seeds[0], lr, paths, a) for m in tuned for lr in LR_GRID[m]]
        first = [r for r in pool.map(run_job, grid) if r is not None]
        best = {}
        for m in tuned:
            rs = [r for r in first if r["method"] == m]
            best[m] = max(rs, key=lambda r: r["val"][_headline(task)])["lr"]
        jobs = [make_job(task, m, s, best[m], paths, a) for m in tuned for s in seeds[1:]]
        jobs += [make_job(task, m, s, best["lst_cache"], paths, a) for m in LST_VARIANTS
                 if m != "lst_cache" and m in methods for s in seeds]
        rest = [r for r in pool.map(run_job, jobs) if r is not None]
        pool.shutdown()
        rows = [r for r in first if r["lr"] == best[r["method"]]] + rest
        old = res["tasks"].get(task, {})
        kept = [dict(r, made_by=r.get("made_by", old["run"]["command"])) for r in old.get("runs", [])
                if r["method"] not in methods]
        kept_sel = [r for r in old.get("lr_selection", []) if r["method"] not in methods]
        res["tasks"][task] = {**aggregate(task, rows + kept, frozen(task, paths)), "run": {**run_info, **TASKS[task]},
                              "lr_selection": first + kept_sel, "runs": rows + kept, "wall_s": time.perf_counter() - t0}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
        print(json.dumps({k: v for k, v in res["tasks"][task].items() if k not in ("runs", "lr_selection")}, indent=1),
              flush=True)


if __name__ == "__main__":
    main()
