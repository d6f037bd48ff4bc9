"""What every result file records about where it ran."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device) -> dict:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {"device": name, "machine": platform.node(), "cpu_count": os.cpu_count(),
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__}}


def record_row(res: dict, row: dict, out: str | Path) -> None:
    """Append one measured row to res["results"], echo it, and rewrite the results file whole. A suite runs for
    an hour or more, so every row is saved as it lands, through durable.atomic_path: a crash mid-write keeps the
    last complete file."""
    import json

    from pipeline.durable import atomic_path

    res["results"].append(row)
    print(json.dumps(row), flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(res, indent=2))
