"""Stage one: run the frozen backbone once over each split and write its ladder store."""
from __future__ import annotations

import shutil
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from pipeline import ladder_store as ls
from pipeline.backbone import (
    Backbone,
    check_max_length,
    encode,
    load_backbone,
    load_config,
    state_names_for,
)
from pipeline.config import CacheConfig
from pipeline.durable import owner_lock
from pipeline.errors import ConfigError, LadderCacheError, StoreError
from pipeline.layout import TGT, family_of, tgt_lengths
from pipeline.padding import candidate_inputs
from pipeline.progress import Progress
from pipeline.prompting import check_format
from pipeline.state_rows import SORT_WINDOW, check_finite, dropout_seed, window_rows
from pipeline.tasks import Task, check_targets, content_hash, get_task


def resolve_dtype(cfg: CacheConfig, bb: Backbone) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    # T5 activations overflow fp16 in several checkpoints (DESIGN.md): bf16 keeps fp32's range.
    return "bf16" if bb.dtype == torch.bfloat16 or bb.family == "t5" else "fp16"


def fingerprint(cfg: CacheConfig, bb: Backbone, task: Task, split: str, examples, dtype: str,
                train_hash: str | None = None, dropout_pass: int | None = None) -> dict:
    import numcodecs
    import transformers

    return {
        "format_version": ls.FORMAT_VERSION, "backbone": bb.name, "backbone_sha256": bb.sha256,
        "tokenizer": bb.tokenizer_id, "max_length": int(cfg.max_length), "task": task.name, "split": split,
        "content_hash": content_hash(examples), "layers": _layers_key(cfg.layer_list),
        # the whole train split's hash, whatever split and limit this store holds: a side init made for another
        # task or another version of the data is refused by it (the init records the same hash)
        "train_hash": train_hash or content_hash(examples),
        "decoder_layers": "same" if cfg.decoder_layer_list == "same" else _layers_key(cfg.decoder_layer_list),
        "dtype": dtype, "codec": cfg.codec, "limit": int(cfg.limit),
        "seed": int(cfg.seed), "family": bb.family, "n_layers": bb.n_layers, "d_model": _width(bb),
        "task_kind": task.kind, "num_labels": task.num_labels, "regression_bins": task.regression_bins,
        "decoder_start_token_id": int(getattr(bb.config, "decoder_start_token_id", 0) or 0),
        # decoder-only stores only: how prompts were formatted (pipeline/prompting.py)
        **({"prompt_format": cfg.prompt_format} if bb.family == "decoder" else {}),
        # train-mode passes only: which pass, and the backbone's dropout rates that made its states
        **({"dropout_pass": int(dropout_pass), "backbone_dropout": dropout_rates(bb.config)}
           if dropout_pass is not None else {}),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "zarr": ls.zarr.__version__, "numcodecs": numcodecs.__version__},
    }


def dropout_rates(hf_config) -> dict:
    """The backbone config's nonzero dropout rates (BERT: hidden_dropout_prob, attention_probs_dropout_prob;
    T5: dropout_rate; Llama: attention_dropout), the ones train mode turns on."""
    return {k: v for k, v in sorted(hf_config.to_dict().items())
            if "drop" in k and isinstance(v, float) and v > 0}


def _layers_key(layers) -> str:
    return "all" if layers is None else ",".join(map(str, layers))


def _width(bb: Backbone) -> int:
    return int(getattr(bb.config, "d_model", None) or bb.config.hidden_size)


def cache_split(cfg: CacheConfig, bb: Backbone, task: Task, split: str, examples, log=print, client=None,
                train_hash: str | None = None, dropout_pass: int | None = None) -> Path:
    """Write (or resume, or check) the ladder store of one split; `client`: a dask client whose workers run
    the backbone (pipeline/cache_cluster.py), else this process runs it. `dropout_pass` i: the backbone in
    train mode, its dropout masks seeded by (cfg.seed, i, window), into train.dropout<i>.zarr."""
    enc = encode(task, examples, bb.tokenizer, bb.family, cfg.max_length, cfg.prompt_format)
    names = state_names_for(bb, cfg.layer_list, cfg.decoder_layer_list, enc.cand_ids)
    dtype = resolve_dtype(cfg, bb)
    n = len(examples)
    lengths = np.array([len(s) for s in enc.src_ids])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    K = int(sum(tgt_lengths(bb.family, enc.cand_ids)))  # target rows per example (pipeline/layout.py)
    d = _width(bb)
    arrays = [ls.ArraySpec(nm, int(n * K) if nm.startswith(TGT) else int(offsets[-1]), d,
                           np.arange(n + 1) * K if nm.startswith(TGT) else offsets) for nm in names]
    fp = fingerprint(cfg, bb, task, split, examples, dtype, train_hash, dropout_pass)
    path = ls.store_path(cfg.out, split, dropout_pass)
    label = split if dropout_pass is None else f"{split} dropout pass {dropout_pass}"
    extra = {"answer_start": enc.answer_start} if enc.answer_start is not None else {}
    writer = ls.StoreWriter(path, fp, offsets, np.concatenate(enc.src_ids), enc.labels, arrays,
                            enc.cand_ids, dtype=dtype, codec=cfg.codec,
                            chunk_tokens=cfg.chunk_tokens, shard_tokens=cfg.shard_tokens, extra=extra)
    raw = sum(a.rows for a in arrays) * d * ls.bytes_per_value(dtype, cfg.codec)
    padded = n * cfg.max_length * d * len([a for a in arrays if not a.name.startswith(TGT)]) * 2
    log(f"[{label}] {n} examples, {int(offsets[-1])} tokens (mean {lengths.mean():.1f}), {len(names)} states x {d}: "
        f"about {raw / 2**20:.0f} MiB before compression ({dtype}/{cfg.codec}); padding to max_length in fp16 "
        f"would take {padded / 2**20:.0f} MiB")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cfg.out).free
    if free < raw * 1.1:
        raise StoreError(f"{cfg.out}: {free / 2**20:.0f} MiB free, the store needs about {raw / 2**20:.0f} MiB; "
                         "free space or pick another --out")
    with owner_lock(path.with_name(path.name + ".lock"), f"{path} (stage one)"):  # one writer per store
        first = writer.open(resume=cfg.resume, overwrite=cfg.overwrite)
        if writer.complete:
            ls.LadderStore(path)  # the open-time checks: a damaged store is reported, not reused
            log(f"[{label}] {path} is complete for this config; nothing to do")
            return path
        try:
            if client is None:
                tokens, seconds = _write_states(cfg, bb, label, enc, names, lengths, writer, first, dtype, log,
                                                dropout_pass)
            else:
                from pipeline import cache_cluster

                tokens, seconds = cache_cluster.write_states(cfg, client, bb, split, enc, names, writer, dtype, log,
                                                             dropout_pass)
        except ls.NonFiniteStates:
            shutil.rmtree(path, ignore_errors=True)  # these examples give inf/NaN on every rerun: no store
            raise
    log(f"[{label}] wrote {path}: {ls.LadderStore(path).nbytes_on_disk() / 2**20:.1f} MiB on disk, "
        f"{tokens / seconds:.0f} tokens/s")
    return path


def _write_states(cfg: CacheConfig, bb: Backbone, split: str, enc, names, lengths, writer, first: int, dtype: str,
                  log, dropout_pass: int | None = None) -> tuple[int, float]:
    n = len(lengths)
    # windows at fixed multiples from example 0 (pipeline/state_rows.py): a resumed run recomputes exactly the
    # clean run's windows; the writer skips rows already on disk
    window = cfg.batch_size * SORT_WINDOW
    start = first - first % window
    if first:
        log(f"[{split}] resuming at example {first} of {n} (from its window, which starts at example {start})")
    writer.begin(start)
    cand = candidate_inputs(bb.family, enc.cand_ids, writer.fp["decoder_start_token_id"]) if enc.cand_ids else None
    t0, tokens = time.perf_counter(), 0
    bar = Progress(n - start, f"cache {split}", unit="ex")
    for w in range(start, n, window):
        idx = range(w, min(w + window, n))
        rows = window_rows(bb, [enc.src_ids[i] for i in idx], enc.cand_ids, names, cand, cfg.batch_size,
                           dropout_seed(cfg.seed, dropout_pass, w))
        for name in names:
            check_finite(rows[name], name, idx, split, cfg, dtype)
            writer.append(name, rows[name])
        tokens += int(lengths[list(idx)].sum())
        bar.update(len(idx), tokens_per_s=round(tokens / (time.perf_counter() - t0)))
    bar.close()
    writer.finish()
    return tokens, time.perf_counter() - t0


def run(cfg: CacheConfig, log=print) -> list[Path]:
    task = get_task(cfg.task)
    hf_cfg = load_config(cfg.backbone)
    check_max_length(hf_cfg, cfg.max_length, cfg.backbone)  # before anything is written
    check_targets(task, family_of(hf_cfg.model_type))
    data = task.load(cfg.data_dir, cfg.seed)
    missing = [s for s in cfg.splits if s not in data]
    if missing:
        raise StoreError(f"splits: {missing} not in task {task.name} (has {', '.join(data)})")
    out, paths = Path(cfg.out), []
    made_out = not out.exists()
    train_hash = content_hash(data["train"]) if "train" in data else None
    try:
        with ExitStack() as stack:
            if cfg.scheduler:  # the workers load the backbone; this process plans, records and seals
                from pipeline import cache_cluster

                client = stack.enter_context(cache_cluster.connect(cfg, log))
                bb = cache_cluster.describe_backbone(cfg, client, log)
            else:
                client, bb = None, load_backbone(cfg.backbone, cfg.device)
                if cfg.threads:
                    stack.callback(torch.set_num_threads, torch.get_num_threads())
                    torch.set_num_threads(cfg.threads)
            check_format(cfg.prompt_format, bb.tokenizer, bb.family, cfg.backbone)
            if cfg.dropout_passes and not dropout_rates(bb.config):
                raise ConfigError(f"dropout_passes: backbone {cfg.backbone} has no dropout (its config's rates are "
                                  "all 0), so a train-mode pass would equal the train store; set dropout_passes: 0")
            # every split's store, then the train split's train-mode passes
            passes = [("train", i) for i in range(cfg.dropout_passes)] if "train" in cfg.splits else []
            for split, dropout_pass in [(s, None) for s in cfg.splits] + passes:
                examples = data[split][: cfg.limit] if cfg.limit else data[split]
                paths.append(cache_split(cfg, bb, task, split, examples, log, client, train_hash, dropout_pass))
    except LadderCacheError:
        if made_out and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a refused run leaves no empty --out behind
        raise
    return paths
