"""The evaluate stage: score a split from the cache, compare with the frozen-features baseline, save artifacts."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import evaluate as ev
from pipeline.backbone import pick_device
from pipeline.config import EvalConfig
from pipeline.durable import atomic_json, atomic_path
from pipeline.errors import StoreError
from pipeline.ladder_store import LadderStore
from pipeline.tasks import get_task
from pipeline.train import load_side


def run(cfg: EvalConfig) -> dict:
    device = pick_device(cfg.device)
    net, meta = load_side(cfg.run, device)
    task = get_task(meta["task"])
    # the run's own backbone and max_length: a store made for another config is refused, every field named
    expect = {"task": task.name, "backbone_sha256": meta["backbone_sha256"], "max_length": int(meta["max_length"])}
    store = LadderStore(Path(cfg.cache) / f"{cfg.split}.zarr", expect=dict(expect, split=cfg.split))
    names = sorted({n for st in net.spec.stacks for n in net.spec.state_names(st)})
    store.require_states(names, f"the side network of {cfg.run}")
    train_path = Path(cfg.cache) / "train.zarr"
    if not train_path.exists():
        raise StoreError(f"{train_path}: the baseline needs the train split's cache; run stage one for it")
    train = LadderStore(train_path, expect=dict(expect, split="train"))
    scores = ev.score_store(net, store, cfg.batch_size, device)
    pred = ev.predictions(scores, task.kind, task.regression_bins)
    metrics = ev.task_metrics(task.kind, pred, store.labels)
    metrics.update(ev.frozen_features_baseline(train, store, task.kind, meta["train"].get("limit", 0)))
    metrics["headline_metric"] = task.metric
    metrics["lst_minus_baseline_pt"] = 100 * (metrics[task.metric] - metrics[f"baseline_{task.metric}"])
    metrics["examples"] = int(store.n)
    out = Path(cfg.out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    rows = ["actual,predicted"] + [f"{a:g},{p:g}" for a, p in zip(store.labels, pred)]
    with atomic_path(out / "plots" / "predictions.csv") as tmp:
        tmp.write_text("\n".join(rows) + "\n")
    if task.kind == "classification":
        _confusion_png(out / "plots" / "confusion.png", store.labels.astype(int), pred, task.label_names)
    atomic_json(out / "metrics.json", metrics)  # last: its presence means the evaluation finished
    return metrics


def _confusion_png(path: Path, y, p, names):
    """A static PNG beside the DVC plot, for users without the CDN that `dvc plots show` HTML loads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
