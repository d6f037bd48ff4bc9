"""Metrics, named as the paper names them per task (GLUE conventions): accuracy, F1, MCC, Pearson/Spearman."""
from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


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
