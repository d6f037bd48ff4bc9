"""Which torch device a stage runs on ("auto": CUDA when torch sees one, else the CPU)."""
from __future__ import annotations

import torch

from pipeline.errors import BackboneError


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackboneError("device: cuda was asked for but torch sees no CUDA device; use --device cpu")
    return torch.device(device)
