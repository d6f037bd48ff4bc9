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


def git_commit(root: str | Path | None = None) -> str:
    """The commit a result was measured at, "+changes" when tracked code differs from it (result files written
    since do not count). A job record must name the code that made it: rt-sentiment's LST seeds 1-2 were once
    paired with runs of a later commit, which draws the ladders, gates and head from the training seed (e4a9b5d),
    and no record said so."""
    import subprocess

    root = root or Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=root).stdout.strip()
        code_changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".", ":!bench/results"], cwd=root,
                                      capture_output=True).returncode == 1
    except OSError:  # no git on this machine: the record still saves
        return "unknown"
    return (head or "unknown") + ("+changes" if head and code_changed else "")


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
