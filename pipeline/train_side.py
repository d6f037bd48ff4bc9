"""Stage two: train the side network from the ladder store (setup -> train -> save).

With `feed="cache"` nothing of the backbone is loaded except the frozen tensors the side network
reuses (T5 / decoder-only: the embedding table and LM head). With `feed="backbone"` (in-loop LST,
for comparison) the same examples in the same order get their states from the live frozen backbone.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline import backbone as bbm
from pipeline import ddp, prune
from pipeline.batches import LadderBatch, Reader, reader
from pipeline.config import ALL_DROPOUT_SITES, TrainConfig, read_yaml, to_dict
from pipeline.device import pick_device
from pipeline.durable import atomic_json, atomic_path, crash_point
from pipeline.errors import ConfigError, DataError, StoreError
from pipeline.evaluate import score_store
from pipeline.ladder_store import LadderStore, store_path
from pipeline.layout import SRC, TGT
from pipeline.metrics import scores_metrics
from pipeline.padding import candidate_inputs
from pipeline.plots import curves_png
from pipeline.progress import Progress
from pipeline.run_folder import (
    CURVES,
    CURVES_PNG,
    METRICS,
    SIDE_CONFIG,
    SIDE_WEIGHTS,
    save_side,
)
from pipeline.side import SideNetwork, build_side
from pipeline.side_spec import spec_from_config
from pipeline.tasks import get_task

# In-loop LST runs the frozen backbone on the side net's padded batch in chunks of this many examples sorted by
# length: a random batch of 100 SmolLM2 pang-lee prompts pads to 2.04x its real tokens, and chunks of 32 ran its
# forward 1.87x faster on one CPU thread (python -m bench.inloop_feed, bench/results/inloop_feed.json)
FEED_CHUNK = 32
CHECKPOINT = "checkpoint.safetensors"  # tensors + JSON metadata in one file: no pickle, written atomically
KILL_ENV = "LADDER_CACHE_KILL_AFTER_EPOCH"


def open_store(cfg: TrainConfig, split: str) -> LadderStore:
    path = store_path(cfg.cache, split)
    # every field this config fixes: a store made with another backbone or max_length is refused, all of
    # its differing fields named at once (the layers the side net needs are checked in setup)
    return LadderStore(path, expect=_expect(cfg, split))


def _expect(cfg: TrainConfig, split: str) -> dict:
    return {"task": get_task(cfg.task).name, "split": split, "max_length": int(cfg.max_length),
            **bbm.backbone_identity(cfg.backbone)}


def open_passes(cfg: TrainConfig, train: LadderStore) -> list[LadderStore]:
    """Stage one's train-mode passes (--dropout-passes K): the train store's examples, states and layers, pass i."""
    passes = []
    for i in range(cfg.dropout_passes):
        path = store_path(cfg.cache, "train", i)
        if not path.exists():
            raise StoreError(f"dropout_passes: {path} does not exist; run stage one with --dropout-passes "
                             f"{cfg.dropout_passes} on {cfg.cache}")
        same = {k: train.fingerprint[k] for k in ("content_hash", "limit", "layers", "decoder_layers")}
        passes.append(LadderStore(path, expect={**_expect(cfg, "train"), **same, "dropout_pass": i}))
    return passes


class BackboneFeed:
    """In-loop LST: the same batch with its states computed by the live frozen backbone (no grad)."""

    def __init__(self, cfg: TrainConfig, store: LadderStore):
        self.bb = bbm.load_backbone(cfg.backbone, cfg.device)
        if self.bb.sha256 != store.fingerprint["backbone_sha256"]:
            raise ConfigError(f"backbone: {cfg.backbone} is not the backbone the cache {store.path} was made with")
        self.dropout = cfg.backbone_dropout  # official code: the frozen backbone runs in train mode
        self.cand = (candidate_inputs(self.bb.family, store.cand, int(store.fingerprint["decoder_start_token_id"]))
                     if store.cand else None)

    def __call__(self, batch: LadderBatch, names: list[str], train: bool = False) -> LadderBatch:
        self.bb.model.train(self.dropout and train)
        st = self.states(batch.src_ids, batch.src_mask, names)
        states = {n: v.float() for n, v in st.items() if n.startswith(SRC)}
        if self.cand is not None:
            C = self.cand[0].shape[0]
            rows = batch.tgt_row * C + batch.tgt_cand
            U = batch.tgt_ids.shape[1]
            states.update({n: v[rows.to(v.device), :U].float() for n, v in st.items() if n.startswith(TGT)})
        return dataclasses.replace(batch, states=states)

    def states(self, ids: torch.Tensor, mask: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        """forward_states of a padded batch, run FEED_CHUNK examples at a time in order of length, each chunk cut
        to its own longest example (stage one sorts its batches the same way): the batch's (B, T) src states
        with zeros at padded positions, as the cache's, and its (B*C, U) target rows in the batch's order."""
        lens = mask.sum(1)
        order = torch.argsort(lens, stable=True)
        out: dict[str, torch.Tensor] = {}
        for c in range(0, len(order), FEED_CHUNK):
            idx = order[c:c + FEED_CHUNK]
            T = int(lens[idx].max())
            st = bbm.forward_states(self.bb, ids[idx, :T], mask[idx, :T], names, self.cand)
            for n, v in st.items():
                if n.startswith(TGT):  # rows j*C + k of the chunk are rows idx[j]*C + k of the batch
                    C = v.shape[0] // len(idx)
                    rows = (idx[:, None] * C + torch.arange(C, device=idx.device)).reshape(-1)
                    full = out.setdefault(n, v.new_zeros(len(order) * C, *v.shape[1:]))
                    full[rows.to(v.device)] = v
                else:  # positions past the chunk's longest example stay zero
                    full = out.setdefault(n, v.new_zeros(len(order), ids.shape[1], v.shape[-1]))
                    full[idx.to(v.device), :T] = v
        return out


@dataclass
class Setup:
    net: SideNetwork
    train: LadderStore
    val: LadderStore | None
    names: list[str]
    device: torch.device
    feed: BackboneFeed | None
    init_info: dict
    passes: list[LadderStore]  # train-mode passes (--dropout-passes); [] reads `train` every epoch

    def epoch_reader(self, epoch: int):
        """The reader of epoch `epoch`'s training states. A pass is read afresh each epoch (not kept resident
        as `train` is), so RAM holds one pass at a time, not K."""
        return Reader(self.passes[epoch % len(self.passes)]) if self.passes else reader(self.train)


def open_stores(cfg: TrainConfig) -> tuple[LadderStore, LadderStore | None, list[LadderStore]]:
    """The train and validation stores and the train-mode passes, opened once (a sweep's configs share them)."""
    train = open_store(cfg, "train")
    if train.n == 0 or (cfg.limit and cfg.limit < 1):
        raise DataError(f"{train.path}: the training split is empty")
    val = open_store(cfg, "validation") if store_path(cfg.cache, "validation").exists() else None
    return train, val, open_passes(cfg, train)


def setup(cfg: TrainConfig, log=print, stores=None) -> Setup:
    train, val, passes = stores or open_stores(cfg)
    fp = train.fingerprint
    hf_cfg = bbm.load_config(cfg.backbone)
    verb = [[int(t) for t in c] for c in train.cand] if fp["family"] == "decoder" else []
    spec = spec_from_config(hf_cfg, cfg.r, cfg.layer_list, cfg.variant, fp["task_kind"], int(fp["num_labels"]),
                            verb, select_k=cfg.select_k, dec_layers=cfg.decoder_layer_list, mix_final=cfg.mix_final,
                            downsampler=cfg.downsampler, downsampler_rank=cfg.downsampler_rank, gate=cfg.gate,
                            **cfg.dropouts)
    if spec.family != fp["family"]:
        raise ConfigError(f"backbone: {cfg.backbone} is {spec.family}, the cache {train.path} holds {fp['family']} states")
    names = spec.read_states
    missing = [n for n in names if n not in train.names]
    if missing:
        raise StoreError(f"layers: the cache {train.path} lacks states {missing}; cache those layers in stage one "
                         f"(cache_activations.layers) or keep only stored ones ({', '.join(train.names)})")
    frozen = bbm.load_frozen_tensors(cfg.backbone, spec.family, spec.mixes_final)
    sha = fp["backbone_sha256"]
    expect = prune.init_fingerprint(spec, fp["backbone"], sha, cfg.init, 0, fp["task"], fp.get("train_hash"))
    if cfg.side_init:
        tensors, init_fp = prune.load_side_init(cfg.side_init, expect)
        if init_fp.get("init") != cfg.init:
            raise ConfigError(f"init: side_init {cfg.side_init} was made with init={init_fp.get('init')}, config says {cfg.init}")
        spec.rope_pairs = init_fp.get("rope_pairs")  # decoder-only: the rotary pairs the pruned heads kept
        torch.manual_seed(cfg.seed)
        net = SideNetwork(spec, frozen)
        net.load_state_dict(tensors, strict=False)
    elif cfg.init == "fisher":
        raise ConfigError("init: fisher needs --side-init from the prune_init stage (it needs gradients through the backbone)")
    else:
        weights = bbm.state_dict_from_files(cfg.backbone) if cfg.init == "magnitude" else None
        net = build_side(spec, frozen, cfg.init, cfg.seed, weights)
        del weights
        init_fp = dict(expect)
    device = pick_device(cfg.device)
    if device.type == "cuda":  # frozen tensors in half precision where the device supports it
        for name, buf in net.named_buffers():
            setattr(net, name, buf.to(torch.bfloat16))
    net.to(device)
    feed = BackboneFeed(cfg, train) if cfg.feed == "backbone" else None
    dec = f", decoder layers={spec.dec_layers}" if spec.dec_layers is not None else ""
    log(f"side network: {spec.family}, r={spec.r}, layers={spec.layers}{dec}, variant={spec.variant}, "
        f"{net.trainable_parameters():,} trainable parameters, init={cfg.init}, feed={cfg.feed}, device={device}"
        + (f", {len(passes)} train-mode dropout passes" if passes else ""))
    return Setup(net, train, val, names, device, feed, init_fp, passes)


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


def read_options(cfg: TrainConfig, store: LadderStore, device) -> dict:
    """How batches are read (shared by every config of a sweep): layout, batch formation, where rows live."""
    return dict(ram_budget_mb=cfg.ram_budget_mb, device=device, device_budget_mb=cfg.device_cache_mb,
                pack_len=store.longest if cfg.pack else 0, batch_tokens=cfg.batch_tokens, limit=cfg.limit)


def data_seed(cfg: TrainConfig) -> int:
    """The seed of the example order (-1: the run's seed, so a plain run needs only --seed)."""
    return cfg.seed if cfg.data_seed < 0 else cfg.data_seed


class Run:
    """One side network's training state: optimizer, schedule, curves, best epoch, its own RNG stream (so
    configs sharing a process, as in a sweep, each draw exactly the dropout masks they would alone). Under
    torchrun (`group` of several ranks) it steps this rank's part of each batch through DDP; rank 0 keeps the
    curves and writes the run folder."""

    def __init__(self, cfg: TrainConfig, s: Setup, log=print, group: ddp.Group = ddp.ALONE):
        self.cfg, self.s, self.log, self.group = cfg, s, log, group
        self.task = get_task(cfg.task)
        self.out = Path(cfg.out)
        if group.main:
            (self.out / "plots").mkdir(parents=True, exist_ok=True)
        store = s.train
        self.n = min(store.n, cfg.limit) if cfg.limit else store.n
        self.steps_per_epoch = len(list(reader(store).epoch_plan(self.n, s.names, cfg.batch_size, True, data_seed(cfg), 0,
                                                         cfg.ram_budget_mb, batch_tokens=cfg.batch_tokens)))
        total = self.steps_per_epoch * cfg.epochs
        warmup = max(1, min(cfg.warmup_steps, total // 10))  # paper: 500 steps; short runs would never leave warmup
        self.params = [p for p in s.net.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(warmup, total))
        self.state = {"curves": [], "epoch": -1, "best": None}  # best: {"epoch": e (1-based), "value": v}
        self.ckpt = self.out / CHECKPOINT
        if cfg.resume and self.ckpt.exists():
            self.state = load_checkpoint(self.ckpt, cfg, s.net, self.opt, self.sched, group)
            log(f"resuming after epoch {self.state['epoch'] + 1} of {cfg.epochs}")
        else:
            torch.manual_seed(ddp.rank_seed(cfg.seed, group))  # dropout stream of a fresh run (rank 0: cfg.seed)
        self.model = ddp.wrap(s.net, group)  # after the checkpoint: DDP copies rank 0's weights to every rank
        self.rng = _rng_get(s.device)
        self.key = f"val_{self.task.metric}"
        self.tokens, self.train_time = 0, 0.0
        self._epoch_start()

    def trains_in(self, epoch: int) -> bool:
        return self.state["epoch"] < epoch < self.cfg.epochs

    def _epoch_start(self):
        self.t0, self.ep_tokens, self.losses, self.ep_time = time.perf_counter(), 0, [], 0.0

    def step(self, batch: LadderBatch):
        s, dev = self.s, self.s.device
        t0 = time.perf_counter()
        _rng_set(dev, self.rng)
        s.net.train()
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
        with amp:
            out = self.model(batch)
        # alone: the batch's mean loss; DDP: weighted so that the averaged gradient is the global batch's
        loss, share = ddp.scaled_loss(out.loss, out.terms, batch.placeholder, self.group)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.rng = _rng_get(dev)
        self.losses.append(share.detach())
        self.ep_tokens += batch.n_tokens
        self.ep_time += time.perf_counter() - t0

    def end_epoch(self, epoch: int, shared_time: float | None = None):
        """Validation, curves, best-epoch weights and the resume checkpoint after `epoch` (0-based)."""
        s, cfg, group = self.s, self.cfg, self.group
        dt = shared_time if shared_time is not None else self.ep_time
        losses, ep_tokens = torch.stack(self.losses).float(), self.ep_tokens
        rng = ddp.gather(self.rng, group)  # every rank's dropout stream, for the checkpoint
        if group.world > 1:  # each step's loss is the sum of the ranks' shares; tokens add up too
            losses, ep_tokens = ddp.total(losses, group).float(), int(ddp.total(ep_tokens, group))
        if not group.main:
            self.state["epoch"] = epoch
            self._epoch_start()
            return
        self.tokens, self.train_time = self.tokens + ep_tokens, self.train_time + dt
        row = {"epoch": epoch + 1, "train_loss": float(losses.mean()),
               "tokens_per_s": ep_tokens / max(dt, 1e-9), "lr": self.sched.get_last_lr()[0]}
        if s.val is not None:
            row.update({f"val_{k}": v for k, v in evaluate_split(s.net, s.val, s.device, cfg, s.feed).items()})
        st = self.state
        st["curves"].append(row)
        self.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if s.val is None or st["best"] is None or row[self.key] > st["best"]["value"]:
            # ties keep the earlier epoch, as the HF Trainer's best-model tracking does
            st["best"] = {"epoch": epoch + 1, "value": row.get(self.key)}
            save_side(self.out, s.net, cfg, s.train, s.init_info)
        _write_curves(self.out / CURVES, st["curves"])
        curves_png(self.out / CURVES_PNG, st["curves"], self.task.metric, st["best"]["epoch"])
        st["epoch"] = epoch
        _rng_set(s.device, self.rng)  # the checkpoint stores this run's own stream
        save_checkpoint(self.ckpt, cfg, s.net, self.opt, self.sched, st, rng[1:])
        self._epoch_start()

    def finish(self) -> dict:
        s, st = self.s, self.state
        peak, kind = peak_memory_mb(s.device)
        curves, best = st["curves"], st["best"]
        # measurements only (the config is in side_config.json); val_* are the best epoch's, the saved side net's
        metrics = {"trainable_params": s.net.trainable_parameters(), "peak_memory_mb": peak, "peak_memory_kind": kind,
                   "train_tokens_per_s": (self.tokens / self.train_time) if self.train_time else None,
                   "ranks": self.group.world, "train_examples": self.n,
                   "final_train_loss": curves[-1]["train_loss"] if curves else None, "best_epoch": best["epoch"]}
        if s.val is not None:
            metrics.update({k: v for k, v in curves[best["epoch"] - 1].items() if k.startswith("val_")})
            metrics[f"last_epoch_{self.key}"] = curves[-1][self.key]
        atomic_json(self.out / METRICS, metrics)
        return metrics


def _rng_get(device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _rng_set(device, state):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def train(cfg: TrainConfig, log=print) -> dict:
    """Train, evaluating on validation after every epoch. `side.safetensors` holds the epoch with the best
    validation headline metric (the official code's load_best_model_at_end); the last epoch's state goes to
    the resume checkpoint. Without a validation split the last epoch is kept. Under torchrun: DDP over the
    ranks (a sweep: its configs spread over them); rank 0 returns the metrics, the others {}."""
    group = ddp.join(cfg.device)
    try:
        if cfg.sweep:
            return sweep(cfg, log, group)
        return _train(cfg, log if group.main else _quiet, group)
    finally:
        ddp.leave(group)


def _quiet(*_):
    pass


def _train(cfg: TrainConfig, log, group: ddp.Group) -> dict:
    s = setup(cfg, log)
    run = Run(cfg, s, log, group)
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    read = read_options(cfg, s.train, s.device)
    for epoch in range(run.state["epoch"] + 1, cfg.epochs):
        bar = Progress(run.steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", unit="step", enabled=group.main)
        batches = s.epoch_reader(epoch).batches(s.names if s.feed is None else [], cfg.batch_size, shuffle=True,
                                          seed=data_seed(cfg), epoch=epoch, part=group.part, **read)
        for step, batch in enumerate(batches, 1):
            if s.feed is not None:
                batch = s.feed(batch, s.names, train=True)
            run.step(batch.to(s.device))
            if step % 20 == 0:  # .item() syncs a GPU (and, across ranks, adds an all-reduce): only now and then
                bar.update(1, loss=ddp.total(run.losses[-1], group).item(),
                           tokens_per_s=round(run.ep_tokens / (time.perf_counter() - run.t0)),
                           peak_mb=round(peak_memory_mb(s.device)[0]))
            else:
                bar.update(1)
        bar.close()
        run.end_epoch(epoch, shared_time=time.perf_counter() - run.t0)
        ddp.barrier(group)  # rank 0's checkpoint is on disk before any rank may stop (the kill hook below)
        crash_point(KILL_ENV, epoch + 1)  # test hook: die like kill -9 right after this checkpoint
    return run.finish() if group.main else {}


SWEEP_KEYS = ("lr", "seed", "r", "init", "side_init", "layers", "decoder_layers", "variant", "select_k", "epochs",
              "mix_final", "weight_decay", "warmup_steps", "grad_clip", *ALL_DROPOUT_SITES)
SWEEP_TABLE = "sweep.csv"
SWEEP_JSON = "sweep.json"


def sweep_configs(base: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """(name, config) of every config of a sweep: the cartesian product of the sweep's lists, plus its
    `configs` entries. Every config reads the same batches: one example order (data_seed), one batch
    formation and layout, the cache feed."""
    import itertools

    spec = base.sweep
    if isinstance(spec, str):
        spec = read_yaml(spec, "sweep: file", "; give a YAML file of lists, e.g. 'lr: [0.001, 0.003]'")
    if not isinstance(spec, dict):
        raise ConfigError("sweep: expected a mapping of keys to lists of values (and an optional `configs` list)")
    extra = spec.get("configs", []) or []
    grid = {k: v if isinstance(v, list) else [v] for k, v in spec.items() if k != "configs"}
    bad = sorted((set(grid) | {k for c in extra for k in c}) - set(SWEEP_KEYS))
    if bad:
        raise ConfigError(f"sweep: keys {bad} cannot vary within a sweep (its configs share every batch); "
                          f"allowed: {', '.join(SWEEP_KEYS)}")
    if base.feed != "cache":
        raise ConfigError("sweep: runs from the cache only (--feed cache)")
    combos = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())] if grid else []
    combos += [dict(c) for c in extra]
    if not combos:
        raise ConfigError("sweep: no configs; give at least one key with a list of values")
    common = dict(sweep="", data_seed=data_seed(base))
    out = []
    for over in combos:
        name = "-".join(f"{k}{v}" for k, v in over.items()).replace("/", "_") or "base"
        cfg = dataclasses.replace(base, **common, **over, out=str(Path(base.out) / name))
        out.append((name, cfg))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep: two configs share a name ({names}); make each config differ")
    return out


def _groups(active: list, stack: bool) -> tuple[list, list]:
    """Runs stepped one by one, and stacks of same-shape runs stepped as one computation (pipeline/stacked.py)."""
    from pipeline.stacked import StackedRuns, can_stack, shape_key

    if not stack:
        return list(active), []
    by_shape: dict[str, list] = {}
    for r in active:
        by_shape.setdefault(shape_key(r) if can_stack(r) else f"alone-{id(r)}", []).append(r)
    alone = [rs[0] for rs in by_shape.values() if len(rs) == 1]
    return alone, [StackedRuns(rs) for rs in by_shape.values() if len(rs) > 1]


def sweep(base: TrainConfig, log=print, group: ddp.Group = ddp.ALONE) -> dict:
    """Train every config of a sweep from one read of each batch: the batch is assembled once (on the device
    when the split fits) and each config takes its step on it in turn, with its own RNG stream, so a config
    ends exactly where it would alone (same seed and data_seed). Each config gets its own run folder; the
    sweep writes a table and names the best config on validation, whose artifacts are also copied to --out
    so evaluate and predict use it directly. Under torchrun the configs are dealt out over the ranks (config
    i to rank i mod W, so each rank stacks its share of every shape); each rank reads every batch, and rank 0
    writes the table once all are done."""
    import shutil

    configs = sweep_configs(base)
    mine = configs[group.rank::group.world]
    done = ddp.gather(_sweep_train(base, mine, log) if mine else [], group)
    if not group.main:
        return {}
    order = {name: i for i, (name, _) in enumerate(configs)}
    finished = sorted((r for part in done for r in part), key=lambda r: order[r[0]["name"]])
    rows = [row for row, _, _ in finished]
    key = f"val_{get_task(base.task).metric}"
    has_val = rows[0].get(key) is not None
    best = max(rows, key=lambda row: row[key]) if has_val else rows[0]
    out = Path(base.out)
    summary = {"best": best["name"], "selected_by": key if has_val else "first config (no validation split)",
               "configs": rows, "sweep_tokens_per_s": sum(t for _, t, _ in finished) / max(
                   sum(dt for _, _, dt in finished) / len(finished), 1e-9)}
    with atomic_path(out / SWEEP_TABLE) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, list(dict.fromkeys(k for row in rows for k in row)))
        w.writeheader()
        w.writerows(rows)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    # the best config, where evaluate and predict look (and every file dvc.yaml declares for a single run)
    for f in (SIDE_WEIGHTS, SIDE_CONFIG, METRICS, CURVES, CURVES_PNG, CHECKPOINT):
        with atomic_path(out / f) as tmp:
            shutil.copyfile(Path(best["out"]) / f, tmp)
    atomic_json(out / SWEEP_JSON, summary)
    log(f"sweep: {len(rows)} configs; best on {summary['selected_by']}: {best['name']} ({best.get(key)})")
    return {**json.loads((out / METRICS).read_text()), "sweep_best": best["name"], "sweep_configs": len(rows),
            "sweep_tokens_per_s": summary["sweep_tokens_per_s"]}


def _sweep_train(base: TrainConfig, configs: list[tuple[str, TrainConfig]], log) -> list[tuple[dict, int, float]]:
    """Train `configs` on shared batches; (table row, tokens, training seconds) of each."""
    stores = open_stores(base)
    runs = []
    for name, cfg in configs:
        log(f"[{name}]")
        runs.append((name, Run(cfg, setup(cfg, log, stores), lambda msg, n=name: log(f"[{n}] {msg}"))))
    train_store, device = stores[0], runs[0][1].s.device
    names = sorted({n for _, r in runs for n in r.s.names})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    read = read_options(base, train_store, device)
    epochs = max(cfg.epochs for _, cfg in configs)
    first = min(r.state["epoch"] for _, r in runs) + 1
    for epoch in range(first, epochs):
        active = [r for _, r in runs if r.trains_in(epoch)]
        if not active:
            continue
        t0 = time.perf_counter()
        steps = len(list(reader(train_store).epoch_plan(runs[0][1].n, names, base.batch_size, True, data_seed(base), epoch,
                                                base.ram_budget_mb, batch_tokens=base.batch_tokens)))
        bar = Progress(steps, f"sweep epoch {epoch + 1}/{epochs} ({len(active)} configs)", unit="step")
        alone, stacks = _groups(active, stack=base.sweep_stack == "always" or (
            base.sweep_stack == "auto" and device.type == "cuda"))
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
        for batch in runs[0][1].s.epoch_reader(epoch).batches(names, base.batch_size, shuffle=True,
                                                              seed=data_seed(base), epoch=epoch, **read):
            for r in alone:
                r.step(batch)
            for st in stacks:
                losses = st.step(batch, amp)
                for k, r in enumerate(st.runs):
                    r.losses.append(losses[k])
                    r.ep_tokens += batch.n_tokens
            bar.update(1)
        bar.close()
        for st in stacks:
            st.unstack()
        wall = time.perf_counter() - t0
        for r in active:
            r.end_epoch(epoch, shared_time=wall)
        crash_point(KILL_ENV, epoch + 1)
    out = []
    for name, r in runs:
        m = r.finish()
        row = {"name": name, "out": str(r.out), **{k: getattr(r.cfg, k) for k in SWEEP_KEYS
                                                   if getattr(r.cfg, k) != getattr(base, k)},
               "best_epoch": m["best_epoch"], r.key: m.get(r.key), "trainable_params": m["trainable_params"],
               "train_tokens_per_s_shared": m["train_tokens_per_s"]}
        out.append((row, r.tokens, r.train_time))
    return out


def save_checkpoint(path: Path, cfg: TrainConfig, net, opt, sched, state: dict, other_ranks_rng: list = ()) -> None:
    """Everything --resume needs in one safetensors file: tensors (side net, optimizer moments, RNG; under DDP
    also ranks 1.. as rng/cpu/<rank>) and a JSON metadata string (epoch, curves, best epoch, optimizer
    hyper-parameters, scheduler). No pickle, so a file planted in --out cannot run code when it is read back."""
    tensors = {f"net/{k}": v.detach().contiguous() for k, v in net.state_dict().items()}
    osd = opt.state_dict()
    for i, st in osd["state"].items():
        for k, v in st.items():
            tensors[f"opt/{i}/{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().contiguous()
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    for rank, (cpu, cuda) in enumerate(other_ranks_rng, 1):
        tensors[f"rng/cpu/{rank}"] = cpu
        if cuda is not None:
            tensors[f"rng/cuda/{rank}"] = cuda
    meta = {"epoch": state["epoch"], "curves": state["curves"], "best": state["best"], "config": _resumable(cfg),
            "param_groups": osd["param_groups"], "sched": {k: v for k, v in sched.state_dict().items()
                                                           if k != "lr_lambdas"}}
    with atomic_path(path) as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata={"state": json.dumps(meta)})


def load_checkpoint(path: Path, cfg: TrainConfig, net, opt, sched, group: ddp.Group = ddp.ALONE) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["state"])
        tensors = load_file(str(path))
    except (SafetensorError, KeyError, ValueError, OSError) as e:
        raise ConfigError(f"resume: {path} is not a checkpoint this version wrote ({type(e).__name__}: {e}); "
                          "delete it or use another --out") from None
    if meta["config"] != _resumable(cfg):
        diff = sorted(k for k in set(meta["config"]) | set(_resumable(cfg))
                      if meta["config"].get(k) != _resumable(cfg).get(k))
        raise ConfigError(f"resume: {path} was written by a different config (fields: {', '.join(diff)}); "
                          "drop --resume or use another --out")
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net/")}, strict=False)
    opt_state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, i, name = k.split("/", 2)
            opt_state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    sched.load_state_dict({**meta["sched"], "lr_lambdas": [None] * len(meta["sched"]["base_lrs"])})
    suffix = f"/{group.rank}" if group.rank else ""
    if f"rng/cpu{suffix}" in tensors:
        torch.set_rng_state(tensors[f"rng/cpu{suffix}"])
    else:  # a rank the saving run did not have (more ranks now): its own stream from here
        torch.manual_seed(ddp.rank_seed(cfg.seed + meta["epoch"] + 1, group))
    if f"rng/cuda{suffix}" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"rng/cuda{suffix}"])
    return {"epoch": meta["epoch"], "curves": meta["curves"], "best": meta["best"]}


def _resumable(cfg: TrainConfig) -> dict:
    d = to_dict(cfg)
    d.pop("resume")
    return d


def evaluate_split(net, store, device, cfg, feed=None) -> dict:
    task = get_task(cfg.task)
    scores = score_store(net, store, 256, device, feed=feed, device_budget_mb=cfg.device_cache_mb,
                            pack_len=store.longest if cfg.pack and feed is None else 0)
    return scores_metrics(task, scores, store.labels[: len(scores)])


def _write_curves(path: Path, rows: list[dict]):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, keys)
        w.writeheader()
        w.writerows(rows)
