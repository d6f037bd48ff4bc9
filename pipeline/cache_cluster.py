"""Stage one on a dask.distributed cluster: a split cut into shard-aligned ranges, each range one task
that runs the frozen backbone over its forward batches and writes whole shards of the one store.

    python -m stages.cache_activations --scheduler local:2               # 2 worker processes here
    python -m stages.cache_activations --scheduler tcp://head:8786       # a running `dask scheduler`

Ranges. Shards are token-based (`shard_tokens` rows of every src state); forward batches are example-based:
length-sorted windows of SORT_WINDOW * batch_size examples at fixed multiples from example 0, because the CPU
forward is not bit-stable across batch shapes (pipeline/state_rows.py). A range is a run of whole src shards
[j0, j1), rows [j0*S, j1*S), and it runs the windows that cover those rows: from the window holding row j0*S
to the window holding row j1*S - 1. The example straddling a shard boundary sits in a window that both
neighbouring ranges run (at most one window of repeated work per boundary); each keeps only its own rows. So no two tasks write one shard (a
partial-shard write would read, modify and rewrite the file), every row comes from the same batch as in the
single-process run, and every shard file gets the same bytes through the same write path
(ladder_store.write_shards).

T5's decoder states (tgt_*) have K rows per example (every candidate's tokens), so one tgt shard spans S/K
examples (8,192 at K = 4, S = 32,768) and would need many ranges' examples. Ranges hand their tgt rows over
instead (dask moves them between workers: K / (mean tokens + K) of the data, 13% on rt-sentiment with 4
target tokens per example) to one task per tgt shard that writes it.

The client (the process running the stage) holds the store's lock file, records each finished task's files in
`_progress.json` (an atomic replace, as the in-process writer does after each shard) and writes the complete
record last. The record lists every file's size and sha256 with sorted keys, so it too ends byte-identical to
the in-process store's.

Failures. A worker that dies: dask runs its tasks again elsewhere (and a finished range whose handed-over
rows died with it); a rerun skips shards already recorded and otherwise writes the same bytes (zarr's local
store writes a temporary file and renames it). The client that dies: rerun with --resume; the record says
which shards exist, the ranges are planned again over the rest. A task of a dead client that is still
running checks the lock file before each shard write and stops once another run owns the store.

Stores live on a local or shared POSIX file system (NFS, Lustre, a cloud file store mounted at the same path
on every machine): the record's atomic replace and the lock file's exclusive create need one. Object-store
URLs (s3://, gs://) are refused.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import ladder_store as ls
from pipeline.backbone import (
    Backbone,
    family_of_config,
    load_backbone,
    load_config,
    load_tokenizer,
)
from pipeline.config import CacheConfig, scheduler_workers
from pipeline.device import pick_device
from pipeline.durable import crash_once, crash_point
from pipeline.errors import BackboneError, ConfigError, StoreError
from pipeline.layout import TGT
from pipeline.padding import candidate_inputs
from pipeline.state_rows import SORT_WINDOW, check_finite, dropout_seed, window_rows

# About 4 ranges per worker: the last range to finish leaves the other workers idle for at most a quarter of
# a worker's share, and the repeated window at each range boundary stays bounded (rt-sentiment train, 242k
# tokens in 8 shards of 32,768 on 2 workers: 8 one-shard ranges of ~1,200 examples, each repeating at most one
# 256-example window at batch 32, i.e. <= ~20% extra forward work; fewer, longer ranges repeat less).
RANGES_PER_WORKER = 4
CLIENT_KILL_ENV = "LADDER_CACHE_KILL_CLIENT_AFTER_TASKS"  # test hook: SIGKILL the client after N recorded tasks
WORKER_KILL_ENV = "LADDER_CACHE_KILL_WORKER_ONCE"  # test hook: a file path; first worker to write a shard dies
WORKER_WAIT_S = 120  # a scheduler with no worker after this long is reported instead of waited on


# ---------------------------------------------------------------- planning (pure)

@dataclass(frozen=True)
class Range:
    shards: tuple[int, int]  # src shards [j0, j1) it writes, in every src array
    examples: tuple[int, int]  # the windows it runs: [e0, e1), e0 a multiple of the window (`unit`)
    handover: tuple[int, int]  # T5: the examples whose tgt rows it hands over (the ranges partition the split)


def example_of_row(offsets: np.ndarray, row: int) -> int:
    """The example holding store row `row` of a src array."""
    return int(np.searchsorted(offsets, row, side="right")) - 1


def plan_ranges(offsets: np.ndarray, shard: int, unit: int, n_ranges: int) -> list[Range]:
    """Up to n_ranges ranges of whole src shards, each with the forward windows (`unit` examples each, from
    example 0) covering its rows."""
    n, total = len(offsets) - 1, int(offsets[-1])
    n_shards = -(-total // shard)
    if n == 0 or n_shards == 0:
        return []
    per = max(1, -(-n_shards // max(1, n_ranges)))
    out = []
    for j0 in range(0, n_shards, per):
        j1 = min(j0 + per, n_shards)
        first = example_of_row(offsets, j0 * shard)
        last = example_of_row(offsets, min(j1 * shard, total) - 1)
        out.append(((j0, j1), (first - first % unit, min(n, (last // unit + 1) * unit))))
    starts = [0] + [e[0] for _, e in out[1:]] + [n]
    return [Range(s, e, (starts[k], starts[k + 1])) for k, (s, e) in enumerate(out)]


def handover_sources(ranges: list[Range], rows: tuple[int, int], K: int) -> list[int]:
    """Indices of the ranges whose handed-over tgt rows (K per example) overlap tgt rows [r0, r1)."""
    return [k for k, r in enumerate(ranges) if r.handover[0] * K < rows[1] and r.handover[1] * K > rows[0]]


# ---------------------------------------------------------------- worker side

@dataclass
class RangeJob:
    """One range for a worker. `cfg.backbone` is an absolute path where the backbone is a local folder."""

    cfg: CacheConfig
    store: str  # absolute path, the same on every machine
    owner: dict  # the store's lock file as this run's client wrote it
    sha256: str  # the backbone weights' hash in the store's fingerprint
    compute_dtype: str  # the backbone's dtype on the workers (bf16 on CUDA, fp32 on the CPU)
    split: str
    dtype: str  # stored dtype
    names: list[str]
    index: int
    range: Range
    ids: list[np.ndarray]  # token ids of examples range.examples
    src_start: int  # store row of the first example's first token
    src_rows: int  # rows of every src array
    skip: dict[str, set]  # src shards already recorded, per array
    cand_ids: list[np.ndarray]
    decoder_start: int
    dropout_pass: int | None = None  # train-mode pass (state_rows.dropout_seed), None: eval mode


@dataclass
class TgtJob:
    """One T5 tgt shard, written from the rows that ranges hand over."""

    cfg: CacheConfig
    store: str
    owner: dict
    dtype: str
    names: list[str]  # the tgt arrays still lacking this shard
    shard: int
    rows: tuple[int, int]  # tgt rows [r0, r1) of the shard
    K: int


_LOADED: dict[tuple[str, str], Backbone] = {}  # per worker process: the backbone is loaded once


def _worker_name():
    from distributed import get_worker

    try:
        return get_worker().name
    except ValueError:
        return None


def _worker_device(device: str) -> str:
    """One GPU per worker: LocalCluster workers are named 0..N-1 and take GPU name % count; a worker started
    elsewhere (dask worker, dask-cuda) uses the first GPU it sees (CUDA_VISIBLE_DEVICES picks it)."""
    dev = pick_device(device)
    name = _worker_name()
    if dev.type == "cuda" and dev.index is None and isinstance(name, int) and torch.cuda.device_count() > 1:
        return f"cuda:{name % torch.cuda.device_count()}"
    return str(dev)


def worker_backbone(cfg: CacheConfig, sha256: str | None = None) -> Backbone:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    key = (cfg.backbone, _worker_device(cfg.device))
    if key not in _LOADED:
        _LOADED[key] = load_backbone(cfg.backbone, key[1])
    bb = _LOADED[key]
    if sha256 is not None and bb.sha256 != sha256:
        raise BackboneError(f"backbone: worker {_worker_name()} loaded {cfg.backbone} with weights sha256 "
                            f"{bb.sha256[:12]}..., the store was planned with {sha256[:12]}...; give every worker "
                            "the same checkpoint")
    return bb


def probe(cfg: CacheConfig) -> dict:
    """Load the backbone on this worker (kept for its ranges) and say what it runs on."""
    bb = worker_backbone(cfg)
    import socket

    return {"worker": _worker_name(), "host": socket.gethostname(), "device": str(bb.device),
            "dtype": str(bb.dtype).removeprefix("torch."), "sha256": bb.sha256}


def _check_owner(store: Path, owner: dict) -> None:
    """Fencing: write only while the client that sent this task still owns the store."""
    lock = store.with_name(store.name + ".lock")
    try:
        now = json.loads(lock.read_text())
    except (OSError, ValueError):
        now = None
    if now != owner:
        raise StoreError(f"{store}: the stage one that sent this task no longer holds {lock}; stopping")


def _check_visible(store: Path) -> None:
    if not (store / ls.PROGRESS).is_file():
        raise StoreError(f"{store}: worker {_worker_name()} cannot see the store; --out must be on a file system "
                         "every worker mounts at the same path")


def run_range(job: RangeJob) -> dict:
    """Run the range's forward batches, write its src shards, hand over its tgt rows."""
    t0 = time.perf_counter()
    cfg, store, S = job.cfg, Path(job.store), job.cfg.shard_tokens
    _check_visible(store)
    bb = worker_backbone(cfg, job.sha256)
    if str(bb.dtype).removeprefix("torch.") != job.compute_dtype:
        raise BackboneError(f"device: worker {_worker_name()} runs the backbone in {bb.dtype}, the store was "
                            f"planned for {job.compute_dtype}; give every worker the same kind of device")
    skip = {n: set(s) | _recorded(store, n, S) for n, s in job.skip.items()}  # a rerun after a worker died
    src = [n for n in job.names if not n.startswith(TGT)]
    tgt = [n for n in job.names if n.startswith(TGT)]
    cand = candidate_inputs(bb.family, job.cand_ids, job.decoder_start) if job.cand_ids else None
    (e0, e1), (h0, h1) = job.range.examples, job.range.handover
    r0, r1 = job.range.shards[0] * S, min(job.range.shards[1] * S, job.src_rows)
    buf: dict[str, list] = {n: [] for n in src}
    held = {n: [] for n in tgt}
    at, start, files = job.src_start, r0, {}  # next row to arrive; first buffered row (a shard boundary)
    window = cfg.batch_size * SORT_WINDOW
    for b in range(e0, e1, window):
        idx = range(b, min(b + window, e1))
        rows = window_rows(bb, job.ids[b - e0: idx.stop - e0], job.cand_ids, job.names, cand, cfg.batch_size,
                           dropout_seed(cfg.seed, job.dropout_pass, b))
        for name in job.names:
            check_finite(rows[name], name, idx, job.split, cfg, job.dtype)
        n_rows = rows[src[0]].shape[0]
        lo, hi = max(at, r0), min(at + n_rows, r1)
        for name in src if lo < hi else []:
            buf[name].append(rows[name][lo - at: hi - at])
        at += n_rows
        while start < r1 and min(at, r1) >= min(start + S, r1):  # a whole shard (or the array's last) is here
            take = min(S, r1 - start)
            for name in src:
                cat = torch.cat(buf[name])
                buf[name] = [cat[take:]]
                if start // S not in skip[name]:
                    vals, scale = ls.encode_rows(cat[:take], job.dtype, cfg.codec)
                    _check_owner(store, job.owner)
                    files.update(ls.write_shards(store, name, start, vals, scale, S))
                    crash_once(WORKER_KILL_ENV)
            start += take
        K = rows[tgt[0]].shape[0] // len(idx) if tgt else 0
        a, z = max(b, h0), min(idx.stop, h1)
        for name in tgt if a < z else []:
            held[name].append(rows[name][(a - b) * K:(z - b) * K])
    handed = {n: ls.encode_rows(torch.cat(v), job.dtype, cfg.codec) for n, v in held.items() if v}
    summary = {"files": files, "tokens": r1 - r0, "task": f"range {job.index}", "worker": _worker_name(),
               "seconds": time.perf_counter() - t0}
    return {"summary": summary, "tgt": handed, "handover": (h0, h1)}


def write_tgt_shard(job: TgtJob, *parts: dict) -> dict:
    """Write one tgt shard from the rows the ranges covering it handed over (in range order)."""
    t0 = time.perf_counter()
    store, (r0, r1) = Path(job.store), job.rows
    _check_visible(store)
    files = {}
    for name in job.names:
        vals, scales = [], []
        for p in parts:
            h0 = p["handover"][0] * job.K
            v, s = p["tgt"][name]
            a, z = max(r0, h0), min(r1, h0 + len(v))
            vals.append(v[a - h0: z - h0])
            scales.append(None if s is None else s[a - h0: z - h0])
        v = np.concatenate(vals)
        s = None if scales[0] is None else np.concatenate(scales)
        if len(v) != r1 - r0:
            raise StoreError(f"{store}: tgt shard {job.shard} got {len(v)} of {r1 - r0} rows from its ranges")
        _check_owner(store, job.owner)
        files.update(ls.write_shards(store, name, r0, v, s, job.cfg.shard_tokens))
    return {"files": files, "tokens": 0, "task": f"tgt shard {job.shard}", "worker": _worker_name(),
            "seconds": time.perf_counter() - t0}


def _recorded(store: Path, name: str, shard: int) -> set[int]:
    """Shards of `name` the record lists now (the client records as tasks finish)."""
    try:
        files = json.loads((store / ls.PROGRESS).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return set()
    prefix = f"{ls.LAYERS}/{name}/"
    return {int(k[len(prefix):].split("/")[1]) for k in files if k.startswith(prefix + "c/")}


def _part(result: dict, key: str):
    return result[key]


# ---------------------------------------------------------------- client side

@contextmanager
def connect(cfg: CacheConfig, log=print):
    """A dask client for cfg.scheduler: a LocalCluster of N worker processes, or a running scheduler."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ConfigError("scheduler: needs dask.distributed; pip install 'distributed>=2024.8'") from None
    n = scheduler_workers(cfg.scheduler)
    cluster, environ = None, dict(os.environ)
    if n is not None:
        if n == 0:
            n = torch.cuda.device_count() or 1
        # each worker runs the backbone with its share of this machine's cores (torch reads OMP_NUM_THREADS;
        # --threads, when given, is set in each worker instead)
        threads = str(cfg.threads or max(1, (os.cpu_count() or 1) // n))
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                               env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
        address = cluster
    else:
        address = cfg.scheduler
    try:
        try:
            client = Client(address, timeout="20s")
        except (OSError, TimeoutError) as e:
            raise ConfigError(f"scheduler: cannot reach {cfg.scheduler} ({e}); start one (dask scheduler, then "
                              "dask worker ADDRESS on each machine) or use --scheduler local:N") from None
        try:
            try:
                client.wait_for_workers(1, timeout=WORKER_WAIT_S)
            except TimeoutError:
                raise ConfigError(f"scheduler: {cfg.scheduler} has no worker after {WORKER_WAIT_S} s; start "
                                  f"`dask worker {client.scheduler.address}` on the machines that run the "
                                  "backbone") from None
            workers = client.scheduler_info(n_workers=-1)["workers"]
            log(f"dask: {len(workers)} workers at {client.scheduler.address}; dashboard "
                f"{client.dashboard_link or '(not served: pip install bokeh>=3.1 where the scheduler runs)'}")
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()
            # a LocalCluster's nannies run in this process and apply distributed.nanny.pre-spawn-environ
            # (OMP/MKL/OPENBLAS_NUM_THREADS=1, MALLOC_TRIM_THRESHOLD_) to its os.environ before spawning each
            # worker, for good (distributed 2026.8.0, nanny.py:726): later subprocesses would inherit 1 thread
            os.environ.clear()
            os.environ.update(environ)


def for_workers(cfg: CacheConfig) -> CacheConfig:
    """The config the workers get: a local backbone folder as an absolute path (they may run elsewhere)."""
    bb = Path(cfg.backbone)
    return dataclasses.replace(cfg, backbone=str(bb.resolve())) if bb.is_dir() else cfg


def describe_backbone(cfg: CacheConfig, client, log=print) -> Backbone:
    """The backbone as the store's fingerprint needs it, from the workers' loaded copies (every worker loads
    it now, once); this process reads only the config and the tokenizer, never the weights."""
    run = uuid.uuid4().hex[:8]
    workers = list(client.scheduler_info(n_workers=-1)["workers"])
    futs = [client.submit(probe, for_workers(cfg), workers=[w], allow_other_workers=False, pure=False,
                          key=f"ladder-load-backbone-{run}-{i}") for i, w in enumerate(workers)]
    found = client.gather(futs)
    kinds = {(torch.device(p["device"]).type, p["dtype"], p["sha256"]) for p in found}
    if len(kinds) > 1:
        seen = "; ".join(f"worker {p['worker']} on {p['host']}: {p['device']} {p['dtype']} "
                         f"sha256 {p['sha256'][:12]}" for p in found)
        raise ConfigError(f"device: the workers differ ({seen}); the store must come from one kind of device and "
                          "one checkpoint: give --device, and the same backbone files, to every worker")
    device, dtype, sha = kinds.pop()
    log(f"backbone {cfg.backbone} loaded on {len(found)} workers: "
        + ", ".join(f"{p['worker']}={p['device']}" for p in found))
    hf = load_config(cfg.backbone)
    family = family_of_config(hf)
    n_layers = hf.num_layers if family == "t5" else hf.num_hidden_layers
    return Backbone(cfg.backbone, None, load_tokenizer(cfg.backbone), family, torch.device(device),
                    getattr(torch, dtype), sha, n_layers, hf_config=hf)


def write_states(cfg: CacheConfig, client, bb: Backbone, split: str, enc, names: list[str], writer,
                 dtype: str, log=print, dropout_pass: int | None = None) -> tuple[int, float]:
    """The cluster's counterpart of cache_activations._write_states: plan, submit, record, seal."""
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    t0 = time.perf_counter()
    store = writer.path.resolve()
    owner = json.loads(store.with_name(store.name + ".lock").read_text())
    S, n = cfg.shard_tokens, len(writer.offsets) - 1
    src = [m for m in names if not m.startswith(TGT)]
    tgt = [m for m in names if m.startswith(TGT)]
    done = {m: writer.recorded_shards(m) for m in names}
    n_workers = len(client.scheduler_info(n_workers=-1)["workers"])
    ranges = plan_ranges(writer.offsets, S, cfg.batch_size * SORT_WINDOW, RANGES_PER_WORKER * n_workers)
    K = writer.arrays[tgt[0]].rows // n if tgt and n else 0
    tgt_todo = {}  # tgt shard -> arrays lacking it
    for t in range(writer.n_shards(tgt[0]) if tgt else 0):
        lacking = [m for m in tgt if t not in done[m]]
        if lacking:
            tgt_todo[t] = lacking
    tgt_rows = {t: (t * S, min((t + 1) * S, n * K)) for t in tgt_todo}
    needed = {k for t in tgt_todo for k in handover_sources(ranges, tgt_rows[t], K)}
    todo = [k for k, r in enumerate(ranges)
            if k in needed or any(j not in done[m] for m in src for j in range(*r.shards))]
    run = uuid.uuid4().hex[:8]
    wcfg = for_workers(cfg)
    cand_ids = list(enc.cand_ids)
    start_id = int(writer.fp["decoder_start_token_id"])
    range_futs, watch = {}, []
    for k in todo:
        r = ranges[k]
        job = RangeJob(wcfg, str(store), owner, bb.sha256, str(bb.dtype).removeprefix("torch."), split, dtype,
                       names, k, r, enc.src_ids[r.examples[0]:r.examples[1]], int(writer.offsets[r.examples[0]]),
                       int(writer.offsets[-1]), {m: done[m] & set(range(*r.shards)) for m in src}, cand_ids,
                       start_id, dropout_pass)
        range_futs[k] = client.submit(run_range, job, pure=False, key=f"ladder-{split}-range-{k}-{run}")
        watch.append(client.submit(_part, range_futs[k], "summary", pure=False,
                                   key=f"ladder-{split}-range-{k}-summary-{run}"))
    for t, lacking in tgt_todo.items():
        job = TgtJob(wcfg, str(store), owner, dtype, lacking, t, tgt_rows[t], K)
        parts = [range_futs[k] for k in handover_sources(ranges, tgt_rows[t], K)]
        watch.append(client.submit(write_tgt_shard, job, *parts, pure=False, key=f"ladder-{split}-tgt-{t}-{run}"))
    del range_futs  # dask keeps each range's rows until the tgt shards that read them are written
    skipped = len(ranges) - len(todo)
    log(f"[{split}] {len(todo)} ranges of {len(ranges)} to run ({skipped} already recorded), "
        f"{len(tgt_todo)} tgt shards, on {n_workers} workers")
    tokens, recorded = 0, 0
    bar = tqdm(total=len(watch), desc=f"cache {split} (ranges + tgt shards)", unit="task", disable=None)
    try:
        for fut in as_completed(watch):
            try:
                res = fut.result()
            except KilledWorker:
                raise StoreError(f"{writer.path}: task {fut.key} was running on a worker each time one died "
                                 "(dask's allowed-failures; out of memory? see the worker logs); the store keeps its "
                                 "recorded shards: rerun with --resume") from None
            writer.record_written(res["files"])
            tokens += res["tokens"]
            recorded += 1
            crash_point(CLIENT_KILL_ENV, recorded)
            bar.update(1)
            bar.set_postfix(tokens_per_s=f"{tokens / (time.perf_counter() - t0):.0f}", last=res["worker"])
    except BaseException:
        client.cancel(watch)
        raise
    finally:
        bar.close()
    writer.seal()
    return tokens, time.perf_counter() - t0
