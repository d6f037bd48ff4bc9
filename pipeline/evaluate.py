"""Metrics (named as the paper names them per task), evaluation from the cache, and the
frozen-features baseline (a linear model on mean-pooled last-layer states) that LST must beat."""
from __future__ import annotations

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from pipeline.layout import SRC
from pipeline.ladder_store import LadderStore


def predictions(scores: np.ndarray, kind: str, bins: list[float]) -> np.ndarray:
    """(n, C) scores -> class index, or (n,) regression value (head output or the best bin's value)."""
    if kind == "regression":
        return scores[:, 0] if scores.shape[1] == 1 else np.asarray(bins)[scores.argmax(1)]
    return scores.argmax(1)


def task_metrics(kind: str, pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    if kind == "regression":
        p = float(pearsonr(pred, labels)[0]) if np.std(pred) > 0 else 0.0
        s = float(spearmanr(pred, labels)[0]) if np.std(pred) > 0 else 0.0
        return {"pearson": p, "spearman": s, "pearson_spearman_mean": (p + s) / 2,
                "mse": float(np.mean((pred - labels) ** 2))}
    y = labels.astype(int)
    acc = float(accuracy_score(y, pred))
    n_cls = max(int(y.max()), int(pred.max())) + 1
    f1 = float(f1_score(y, pred, average="binary" if n_cls <= 2 else "macro", zero_division=0))
    return {"accuracy": acc, "f1": f1, "f1_accuracy_mean": (acc + f1) / 2,
            "matthews_correlation": float(matthews_corrcoef(y, pred))}


@torch.no_grad()
def score_store(net, store: LadderStore, batch_size: int, device, limit: int = 0, feed=None,
                device_budget_mb: int = 0, pack_len: int = 0) -> np.ndarray:
    """(n, C) scores for every example of a store: class logits, regression output, or (T5) the
    log-likelihood of each candidate verbalizer (rank classification)."""
    net.eval()
    names = sorted({n for st in net.spec.stacks for n in net.spec.state_names(st)})
    out = []
    for batch in store.batches(names if feed is None else [], batch_size, shuffle=False, limit=limit,
                               all_candidates=True, device=device, device_budget_mb=device_budget_mb,
                               pack_len=pack_len):
        if feed is not None:
            batch = feed(batch, names)
        out.append(net(batch.to(device)).scores.float().cpu().numpy())
    return np.concatenate(out)


def pooled_last_layer(store: LadderStore, limit: int = 0) -> np.ndarray:
    """(n, d) mean over tokens of the last stored source layer."""
    last = [n for n in store.names if n.startswith(SRC) and not n.endswith("emb")][-1]
    n = min(store.n, limit) if limit else store.n
    X = np.zeros((n, store.width), np.float32)
    for e0 in range(0, n, 2048):
        e1 = min(n, e0 + 2048)
        rows = store.rows(last, int(store.offsets[e0]), int(store.offsets[e1]))
        base = store.offsets[e0]
        for i in range(e0, e1):
            X[i] = rows[store.offsets[i] - base: store.offsets[i + 1] - base].mean(0)
    return X


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
