"""Plots as static PNG files written by the stages, beside the DVC plot definitions: `dvc plots show` writes
HTML that loads vega from a CDN, which an offline machine cannot reach (DESIGN.md)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.durable import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def curves_png(path: Path, rows: list[dict], metric: str, best_epoch: int | None = None):
    """Training loss and the validation headline metric per epoch, the best epoch marked."""
    plt = _pyplot()
    ep = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(ep, [r["train_loss"] for r in rows], "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:blue")
    key = f"val_{metric}"
    if any(key in r for r in rows):
        ax2 = ax.twinx()
        ax2.plot(ep, [r.get(key, np.nan) for r in rows], "s-", color="tab:orange", label=f"validation {metric}")
        ax2.set_ylabel(f"validation {metric}", color="tab:orange")
        if best_epoch:
            ax2.axvline(best_epoch, color="grey", ls=":", lw=1)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def confusion_png(path: Path, y, p, names):
    """Counts of (actual, predicted) labels."""
    plt = _pyplot()

    C = len(names)
    m = np.zeros((C, C), int)
    for a, b in zip(y, p):
        m[a, b] += 1
    fig, ax = plt.subplots(figsize=(1.2 * C + 2, 1.2 * C + 1.5))
    ax.imshow(m, cmap="Blues")
    for i in range(C):
        for j in range(C):
            ax.text(j, i, str(m[i, j]), ha="center", va="center")
    ax.set_xticks(range(C), names, rotation=30)
    ax.set_yticks(range(C), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
