"""Record what `make demo` measured (the embedded default: real MiniLM, rt-sentiment, params.yaml) into
bench/results/demo.json, from which `python -m bench.summary` writes the README's demo block.

    python -m bench.demo --repro-s 123 --setup-s 45     # the Makefile's demo target calls this
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.machine import describe  # noqa: E402


def main():
    import torch
    import yaml

    ap = argparse.ArgumentParser()
    ap.add_argument("--repro-s", type=float, required=True, help="wall seconds of `dvc repro`")
    ap.add_argument("--setup-s", type=float, default=None, help="wall seconds of the set-up (venv, installs)")
    ap.add_argument("--run", default="runs/side")
    ap.add_argument("--out", default="bench/results/demo.json")
    a = ap.parse_args()
    run = Path(a.run)
    ev = json.loads((run / "eval" / "metrics.json").read_text())
    tr = json.loads((run / "metrics.json").read_text())
    params = yaml.safe_load(Path("params.yaml").read_text())
    res = {"command": "make demo", **describe(torch.device("cpu")), "params": params["train_side"],
           "repro_wall_s": a.repro_s, "setup_wall_s": a.setup_s,
           "test": {k: ev[k] for k in ("accuracy", "f1", "matthews_correlation", "baseline_accuracy", "baseline_f1",
                                       "baseline_matthews_correlation", "examples")},
           "train": {k: tr[k] for k in ("trainable_params", "peak_memory_mb", "peak_memory_kind", "train_tokens_per_s",
                                        "best_epoch")}}
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
