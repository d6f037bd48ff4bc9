"""Stage two: train the side network from the ladder store (setup -> train -> save).

With `feed="cache"` nothing of the backbone is loaded except the frozen tensors the side network
reuses (T5 / decoder-only: the embedding table and LM head). With `feed="backbone"` (in-loop LST,
for comparison) the same examples in the same order get their states from the live frozen backbone.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from pipeline import backbone as bbm
from pipeline import evaluate as ev
from pipeline import prune
from pipeline.config import TrainConfig, to_dict
from pipeline.durable import atomic_json, atomic_path, crash_point
from pipeline.errors import ConfigError, DataError, StoreError
from pipeline.ladder_store import LadderStore
from pipeline.layout import SRC, TGT
from pipeline.side import LadderBatch, SideNetwork, spec_from_config
from pipeline.tasks import get_task

CHECKPOINT = "checkpoint.pt"
SIDE_WEIGHTS = "side.safetensors"
SIDE_CONFIG = "side_config.json"
METRICS = "metrics.json"
CURVES = "plots/curves.csv"
KILL_ENV = "LADDER_CACHE_KILL_AFTER_EPOCH"


def open_store(cfg: TrainConfig, split: str) -> LadderStore:
    path = Path(cfg.cache) / f"{split}.zarr"
    # every field this config fixes: a store made with another backbone or max_length is refused, all of
    # its differing fields named at once (the layers the side net needs are checked in setup)
    expect = {"task": get_task(cfg.task).name, "split": split, "max_length": int(cfg.max_length),
              **bbm.backbone_identity(cfg.backbone)}
    return LadderStore(path, expect=expect)


class BackboneFeed:
    """In-loop LST: the same batch with its states computed by the live frozen backbone (no grad)."""

    def __init__(self, cfg: TrainConfig, store: LadderStore):
        self.bb = bbm.load_backbone(cfg.backbone, cfg.device)
        if self.bb.sha256 != store.fingerprint["backbone_sha256"]:
            raise ConfigError(f"backbone: {cfg.backbone} is not the backbone the cache {store.path} was made with")
        self.cand = (bbm.decoder_inputs(store.cand, int(store.fingerprint["decoder_start_token_id"]))
                     if self.bb.family == "t5" else None)

    def __call__(self, batch: LadderBatch, names: list[str]) -> LadderBatch:
        st = bbm.forward_states(self.bb, batch.src_ids, batch.src_mask, names, self.cand)
        states = {n: v.float() for n, v in st.items() if n.startswith(SRC)}
        if self.cand is not None:
            C = self.cand[0].shape[0]
            rows = batch.tgt_row * C + batch.tgt_cand
            U = batch.tgt_ids.shape[1]
            states.update({n: v[rows.to(v.device), :U].float() for n, v in st.items() if n.startswith(TGT)})
        return dataclasses.replace(batch, states=states)


@dataclass
class Setup:
    net: SideNetwork
    train: LadderStore
    val: LadderStore | None
    names: list[str]
    device: torch.device
    feed: BackboneFeed | None
    init_info: dict


def setup(cfg: TrainConfig, log=print) -> Setup:
    train = open_store(cfg, "train")
    if train.n == 0 or (cfg.limit and cfg.limit < 1):
        raise DataError(f"{train.path}: the training split is empty")
    val_path = Path(cfg.cache) / "validation.zarr"
    val = open_store(cfg, "validation") if val_path.exists() else None
    fp = train.fingerprint
    hf_cfg = bbm.load_config(cfg.backbone)
    verb = [int(c[0]) for c in train.cand] if fp["family"] == "decoder" else []
    spec = spec_from_config(hf_cfg, cfg.r, cfg.layer_list, cfg.variant, fp["task_kind"], int(fp["num_labels"]),
                            verb, cfg.dropout, cfg.select_k)
    if spec.family != fp["family"]:
        raise ConfigError(f"backbone: {cfg.backbone} is {spec.family}, the cache {train.path} holds {fp['family']} states")
    names = sorted({n for st in spec.stacks for n in spec.state_names(st)})
    missing = [n for n in names if n not in train.names]
    if missing:
        raise StoreError(f"layers: the cache {train.path} lacks states {missing}; cache those layers in stage one "
                         f"(cache_activations.layers) or keep only stored ones ({', '.join(train.names)})")
    frozen = bbm.load_frozen_tensors(cfg.backbone, spec.family, spec.variant)
    sha = fp["backbone_sha256"]
    expect = prune.init_fingerprint(spec, fp["backbone"], sha, cfg.init, 0)
    if cfg.side_init:
        tensors, init_fp = prune.load_side_init(cfg.side_init, expect)
        if init_fp.get("init") != cfg.init:
            raise ConfigError(f"init: side_init {cfg.side_init} was made with init={init_fp.get('init')}, config says {cfg.init}")
        torch.manual_seed(cfg.seed)
        net = SideNetwork(spec, frozen)
        net.load_state_dict(tensors, strict=False)
    elif cfg.init == "fisher":
        raise ConfigError("init: fisher needs --side-init from the prune_init stage (it needs gradients through the backbone)")
    else:
        weights = bbm.state_dict_from_files(cfg.backbone) if cfg.init == "magnitude" else None
        net = prune.build_side(spec, frozen, cfg.init, cfg.seed, weights)
        del weights
        init_fp = dict(expect)
    device = bbm.pick_device(cfg.device)
    if device.type == "cuda":  # frozen tensors in half precision where the device supports it
        for name, buf in net.named_buffers():
            setattr(net, name, buf.to(torch.bfloat16))
    net.to(device)
    feed = BackboneFeed(cfg, train) if cfg.feed == "backbone" else None
    log(f"side network: {spec.family}, r={spec.r}, layers={spec.layers}, variant={spec.variant}, "
        f"{net.trainable_parameters():,} trainable parameters, init={cfg.init}, feed={cfg.feed}, device={device}")
    return Setup(net, train, val, names, device, feed, init_fp)


def lr_lambda(warmup: int, total: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def peak_memory_mb(device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"


def train(cfg: TrainConfig, log=print) -> dict:
    s = setup(cfg, log)
    net, store, device = s.net, s.train, s.device
    out = Path(cfg.out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    n = min(store.n, cfg.limit) if cfg.limit else store.n
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, min(cfg.warmup_steps, total // 10))  # paper: 500 steps; short runs would never leave warmup
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total))
    curves, start_epoch = [], 0
    ckpt = out / CHECKPOINT
    if cfg.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state["config"] != _resumable(cfg):
            raise ConfigError(f"resume: {ckpt} was written by a different config; drop --resume or use another --out")
        net.load_state_dict(state["net"], strict=False)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["rng"])
        curves, start_epoch = state["curves"], state["epoch"] + 1
        log(f"resuming after epoch {state['epoch'] + 1} of {cfg.epochs}")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.seed) if start_epoch == 0 else None
    tokens, train_time = 0, 0.0
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        t0, ep_tokens, losses = time.perf_counter(), 0, []
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr, disable=None)
        for batch in store.batches(s.names if s.feed is None else [], cfg.batch_size, shuffle=True, seed=cfg.seed,
                                   epoch=epoch, limit=cfg.limit, ram_budget_mb=cfg.ram_budget_mb):
            if s.feed is not None:
                batch = s.feed(batch, s.names)
            batch = batch.to(device)
            with amp:
                loss = net(batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
            ep_tokens += batch.n_tokens
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{ep_tokens / (time.perf_counter() - t0):.0f}",
                            mem_mb=f"{peak_memory_mb(device)[0]:.0f}")
        bar.close()
        dt = time.perf_counter() - t0
        tokens, train_time = tokens + ep_tokens, train_time + dt
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "tokens_per_s": ep_tokens / dt,
               "lr": sched.get_last_lr()[0]}
        if s.val is not None:
            row.update({f"val_{k}": v for k, v in evaluate_split(net, s.val, device, cfg, s.feed).items()})
        curves.append(row)
        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        _write_curves(out / CURVES, curves)
        with atomic_path(ckpt) as tmp:
            torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "rng": torch.get_rng_state(), "epoch": epoch, "curves": curves, "config": _resumable(cfg)}, tmp)
        crash_point(KILL_ENV, epoch + 1)  # test hook: die like kill -9 right after this checkpoint
    peak, kind = peak_memory_mb(device)
    save_side(out, net, cfg, store, s.init_info)
    metrics = {"trainable_params": net.trainable_parameters(), "peak_memory_mb": peak, "peak_memory_kind": kind,
               "train_tokens_per_s": (tokens / train_time) if train_time else None, "epochs": cfg.epochs,
               "seed": cfg.seed, "feed": cfg.feed, "init": cfg.init, "r": cfg.r, "variant": cfg.variant,
               "train_examples": n, "final_train_loss": curves[-1]["train_loss"] if curves else None}
    if curves and s.val is not None:
        metrics.update({k: v for k, v in curves[-1].items() if k.startswith("val_")})
    atomic_json(out / METRICS, metrics)
    return metrics


def _resumable(cfg: TrainConfig) -> dict:
    d = to_dict(cfg)
    d.pop("resume")
    return d


def evaluate_split(net, store, device, cfg, feed=None) -> dict:
    task = get_task(cfg.task)
    scores = ev.score_store(net, store, 256, device, feed=feed)
    pred = ev.predictions(scores, task.kind, task.regression_bins)
    return ev.task_metrics(task.kind, pred, store.labels[: len(pred)])


def _write_curves(path: Path, rows: list[dict]):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, keys)
        w.writeheader()
        w.writerows(rows)


def save_side(out: Path, net: SideNetwork, cfg: TrainConfig, store: LadderStore, init_info: dict):
    """The side network alone (trainable tensors) + the config needed to rebuild and check it."""
    with atomic_path(out / SIDE_WEIGHTS) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp))
    fp = store.fingerprint
    atomic_json(out / SIDE_CONFIG, {"spec": json.loads(net.spec.to_json()), "backbone": cfg.backbone,
                                     "backbone_sha256": fp["backbone_sha256"], "task": cfg.task,
                                     "max_length": fp["max_length"], "init": init_info, "train": to_dict(cfg)})


def load_side(run: str | Path, device="cpu") -> tuple[SideNetwork, dict]:
    from safetensors.torch import load_file

    from pipeline.side import SideSpec

    run = Path(run)
    if not (run / SIDE_CONFIG).exists():
        raise ConfigError(f"run: {run} has no {SIDE_CONFIG}; train first (python -m stages.train_side)")
    meta = json.loads((run / SIDE_CONFIG).read_text())
    spec = SideSpec(**meta["spec"])
    net = SideNetwork(spec, bbm.load_frozen_tensors(meta["backbone"], spec.family, spec.variant))
    net.load_state_dict(load_file(str(run / SIDE_WEIGHTS)), strict=False)
    return net.to(device).eval(), meta
