"""A trained run's folder, as train_side writes it and evaluate / predict read it:

    side.safetensors     the side network's trainable tensors (the best validation epoch)
    side_config.json     its SideSpec, the backbone (name + weights sha256), task, max_length, init, train config
    metrics.json         train_side's metrics (best epoch, peak memory, tokens/s, validation metrics)
    plots/curves.csv     one row per epoch (train loss, validation metrics); plots/curves.png the same, drawn
    checkpoint.safetensors  the last epoch's full training state, for --resume (train_side only)

Frozen backbone tensors the side net reuses (embedding table, LM head) are never saved with it: they are read
back from the backbone's checkpoint files by name and sha256.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from pipeline import backbone as bbm
from pipeline.config import to_dict
from pipeline.durable import atomic_json, atomic_path
from pipeline.errors import ConfigError
from pipeline.side import SideNetwork
from pipeline.side_spec import SideSpec

SIDE_WEIGHTS = "side.safetensors"
SIDE_CONFIG = "side_config.json"
METRICS = "metrics.json"
CURVES = "plots/curves.csv"
CURVES_PNG = "plots/curves.png"


def save_side(out: Path, net: SideNetwork, cfg, store, init_info: dict):
    """The side network alone (trainable tensors) + the config needed to rebuild and check it."""
    with atomic_path(out / SIDE_WEIGHTS) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp))
    fp = store.fingerprint
    atomic_json(out / SIDE_CONFIG, {"spec": json.loads(net.spec.to_json()), "backbone": cfg.backbone,
                                     "backbone_sha256": fp["backbone_sha256"], "task": cfg.task,
                                     "max_length": fp["max_length"], "prompt_format": fp.get("prompt_format", "plain"),
                                     "init": init_info, "train": to_dict(cfg)})


def load_side(run: str | Path, device="cpu") -> tuple[SideNetwork, dict]:
    run = Path(run)
    if not (run / SIDE_CONFIG).exists():
        raise ConfigError(f"run: {run} has no {SIDE_CONFIG}; train first (python -m stages.train_side)")
    meta = json.loads((run / SIDE_CONFIG).read_text())
    spec = SideSpec(**meta["spec"])
    net = SideNetwork(spec, bbm.load_frozen_tensors(meta["backbone"], spec.family, spec.mixes_final))
    net.load_state_dict(load_file(str(run / SIDE_WEIGHTS)), strict=False)
    return net.to(device).eval(), meta
