"""The evaluate stage: score a split from the cache with a trained side network (rank classification for
T5 / decoder-only verbalizers, heads otherwise), beside the baselines LST must beat: frozen features (a linear model
on the last stored layer, mean-pooled; decoder-only: the last token's state) and, for decoder-only classification,
zero-shot prompting of the frozen model itself (its own verbalizer log-likelihoods, computed from the cached
last-layer states); save metrics, predictions and a confusion plot."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, Ridge

from pipeline.backbone import load_frozen_tensors
from pipeline.batches import reader
from pipeline.config import EvalConfig
from pipeline.device import pick_device
from pipeline.durable import atomic_json, atomic_path
from pipeline.errors import ConfigError, StoreError
from pipeline.ladder_store import LadderStore
from pipeline.layout import SRC, TGT, state_name
from pipeline.metrics import predictions, scores_metrics, task_metrics
from pipeline.plots import confusion_png
from pipeline.run_folder import load_side
from pipeline.tasks import get_task


@torch.no_grad()
def score_store(net, store: LadderStore, batch_size: int, device, limit: int = 0, feed=None,
                device_budget_mb: int = 0, pack_len: int = 0) -> np.ndarray:
    """(n, C) scores for every example of a store: class logits, regression output, or (T5) the
    log-likelihood of each candidate verbalizer (rank classification)."""
    net.eval()
    names = net.spec.read_states
    out = []
    for batch in reader(store).batches(names if feed is None else [], batch_size, shuffle=False, limit=limit,
                               all_candidates=True, device=device, device_budget_mb=device_budget_mb,
                               pack_len=pack_len):
        if feed is not None:
            batch = feed(batch, names)
        out.append(net(batch.to(device)).scores.float().cpu().numpy())
    return np.concatenate(out)


def pooled_last_layer(store: LadderStore, limit: int = 0) -> np.ndarray:
    """(n, d) features of the last stored source layer: the mean over tokens (encoder, T5), or the last token's
    state (decoder-only: a causal model's last position is the one that has read the whole prompt)."""
    last = [n for n in store.names if n.startswith(SRC) and not n.endswith("emb")][-1]
    n = min(store.n, limit) if limit else store.n
    last_token = store.fingerprint.get("family") == "decoder"
    X = np.zeros((n, store.width), np.float32)
    for e0 in range(0, n, 2048):
        e1 = min(n, e0 + 2048)
        rows = store.rows(last, int(store.offsets[e0]), int(store.offsets[e1]))
        base = store.offsets[e0]
        for i in range(e0, e1):
            ex = rows[store.offsets[i] - base: store.offsets[i + 1] - base]
            X[i] = ex[-1] if last_token else ex.mean(0)
    return X


@torch.no_grad()
def zero_shot_scores(store: LadderStore, frozen: dict, eps: float, batch_size: int = 256) -> np.ndarray | None:
    """(n, C) log-likelihood of every candidate verbalizer under the frozen decoder-only model itself, from the
    cached states of its last layer: logits = head(final_norm(h_L-1)) at the prompt's last position (scores the
    candidate's first token) and at the candidate's own positions (tgt_*, the later tokens). This is zero-shot
    prompting, computed without the backbone (tested equal to the live model). None when the last layer is not
    stored."""
    L = int(store.fingerprint["n_layers"]) - 1
    src, tgt = state_name(SRC, L), state_name(TGT, L)
    if store.fingerprint.get("family") != "decoder" or not store.cand or src not in store.names:
        return None
    longer = store.K > 0
    if longer and tgt not in store.names:
        return None
    w, head = frozen["final_norm_src"], frozen.get("lm_head", frozen["embed"])

    def logits(h):
        h = h.float()
        return (w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))) @ head.T

    out = []
    for b in reader(store).batches([src, tgt] if longer else [src], batch_size, shuffle=False, all_candidates=True):
        flat = b.states[src].reshape(-1, store.width)
        n_ex = b.src_ids.shape[0]
        last = torch.arange(n_ex) * b.src_ids.shape[1] + b.src_mask.long().sum(1) - 1
        h = flat[last][b.tgt_row][:, None]  # (N, 1, d)
        if longer:
            h = torch.cat([h, b.states[tgt]], 1)  # (N, U + 1, d)
        lp = torch.log_softmax(logits(h), -1)
        t = b.tgt_labels
        ll = (lp.gather(-1, t.clamp(min=0)[..., None])[..., 0] * (t != -100)).sum(1)
        out.append(ll.view(n_ex, -1).numpy())
    return np.concatenate(out)


def frozen_features_baseline(train: LadderStore, test: LadderStore, kind: str, limit: int = 0) -> dict[str, float]:
    """Logistic (classification) or ridge (regression) regression on frozen mean-pooled features."""
    Xtr, ytr = pooled_last_layer(train, limit), train.labels[: (limit or train.n)]
    Xte, yte = pooled_last_layer(test), test.labels
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
    if kind == "regression":
        pred = Ridge(alpha=1.0).fit(Xtr, ytr).predict(Xte)
    else:
        pred = LogisticRegression(max_iter=2000, C=1.0).fit(Xtr, ytr.astype(int)).predict(Xte)
    return {f"baseline_{k}": v for k, v in task_metrics(kind, pred, yte).items()}


def run(cfg: EvalConfig) -> dict:
    device = pick_device(cfg.device)
    net, meta = load_side(cfg.run, device)
    task = get_task(meta["task"])
    if cfg.task and get_task(cfg.task).name != task.name:
        raise ConfigError(f"task: {cfg.run} was trained on task {task.name}, not {get_task(cfg.task).name}; "
                          "point --run at that task's run")
    # the run's own backbone and max_length: a store made for another config is refused, every field named
    expect = {"task": task.name, "backbone_sha256": meta["backbone_sha256"], "max_length": int(meta["max_length"])}
    store = LadderStore(Path(cfg.cache) / f"{cfg.split}.zarr", expect=dict(expect, split=cfg.split))
    names = net.spec.read_states
    store.require_states(names, f"the side network of {cfg.run}")
    train_path = Path(cfg.cache) / "train.zarr"
    if not train_path.exists() and task.kind != "generation":
        raise StoreError(f"{train_path}: the baseline needs the train split's cache; run stage one for it")
    scores = score_store(net, store, cfg.batch_size, device)
    metrics = scores_metrics(task, scores, store.labels)
    metrics["headline_metric"] = task.metric
    metrics["examples"] = int(store.n)
    if task.kind == "generation":  # no class to predict from features; predict generates (pipeline/predict.py)
        pred = scores[:, 0]
    else:
        pred = predictions(scores, task.kind, task.regression_bins)
        train = LadderStore(train_path, expect=dict(expect, split="train"))
        metrics.update(frozen_features_baseline(train, store, task.kind, meta["train"].get("limit", 0)))
        metrics["lst_minus_baseline_pt"] = 100 * (metrics[task.metric] - metrics[f"baseline_{task.metric}"])
        zs = zero_shot_scores(store, load_frozen_tensors(meta["backbone"], "decoder", final_norm=True),
                              net.spec.norm_eps, cfg.batch_size) if net.spec.family == "decoder" else None
        if zs is not None:
            metrics.update({f"zero_shot_{k}": v for k, v in scores_metrics(task, zs, store.labels).items()})
    out = Path(cfg.out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    rows = ["actual,predicted"] + [f"{a:g},{p:g}" for a, p in zip(store.labels, pred)]
    with atomic_path(out / "plots" / "predictions.csv") as tmp:
        tmp.write_text("\n".join(rows) + "\n")
    if task.kind == "classification":
        confusion_png(out / "plots" / "confusion.png", store.labels.astype(int), pred, task.label_names)
    atomic_json(out / "metrics.json", metrics)  # last: its presence means the evaluation finished
    return metrics
