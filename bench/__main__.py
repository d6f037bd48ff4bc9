"""Run a benchmark suite and refresh bench/results/summary.json.

    python -m bench --suite cpu    # store codecs and stage one on the real MiniLM (2 cores: ~3 minutes)
    python -m bench --suite gpu    # T5 base/large/3b memory and step time, needs CUDA
"""
import argparse
import subprocess
import sys

ap = argparse.ArgumentParser()
ap.add_argument("--suite", choices=["cpu", "gpu"], required=True)
a = ap.parse_args()
mods = ["bench.store_codecs"] if a.suite == "cpu" else ["bench.gpu_t5"]
for m in mods + ["bench.summary"]:
    subprocess.run([sys.executable, "-m", m], check=True)
