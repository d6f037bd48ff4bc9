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


def generation_metrics(scores: np.ndarray) -> dict[str, float]:
    """Generation from teacher-forced scores (n, 3) = [every answer token the argmax, answer NLL, answer tokens]
    (pipeline/side.py): greedy decoding reproduces an answer exactly iff each of its tokens (the end token
    included) is the argmax given the earlier ones, so `exact_match` is greedy generation's exact match."""
    nll, tokens = float(scores[:, 1].sum()), float(scores[:, 2].sum())
    return {"exact_match": float(scores[:, 0].mean()), "answer_nll_per_token": nll / max(tokens, 1.0),
            "answer_perplexity": float(np.exp(nll / max(tokens, 1.0)))}


def scores_metrics(task, scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """A task's metrics from a side net's (n, C) scores."""
    if task.kind == "generation":
        return generation_metrics(scores)
    return task_metrics(task.kind, predictions(scores, task.kind, task.regression_bins), labels)


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
