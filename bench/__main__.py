"""Run a benchmark suite, then refresh bench/results/summary.json, tables.md and the README's results block.

    python -m bench --suite cpu       # store codecs, every method's CPU memory/time, end-to-end sweep, stage two
                                      #   (packed vs padded, data path, one-pass sweeps), dask workers and
                                      #   torchrun ranks: 2 cores, about an hour and a half
    python -m bench --suite gpu       # T5 base/large/3b and Llama 1B/8B/70B memory and step time (needs CUDA), sweep and stage two on the GPU
    python -m bench --suite accuracy  # real MiniLM, the five offline tasks, 3 seeds (days on 2 cores; ~5 min per task
                                      #   on an H100)
"""
import argparse
import subprocess
import sys

SUITES = {
    "cpu": [["bench.store_codecs"], ["bench.cpu_methods"], ["bench.sweep", "--device", "cpu", "--out", "bench/results/sweep_cpu.json"],
            ["bench.stage_two", "--device", "cpu"], ["bench.distributed"]],
    "gpu": [["bench.gpu_t5"], ["bench.gpu_llm"], ["bench.sweep", "--examples", "0", "--epochs", "5", "--device", "cuda",
                               "--out", "bench/results/sweep_gpu.json"],
            ["bench.stage_two", "--device", "cuda", "--examples", "0"]],
    "accuracy": [["bench.accuracy", "--tasks", "rt-sentiment,rt-rating,pang-lee,hedge-conll2010,bbc-topics"]],
}
ap = argparse.ArgumentParser()
ap.add_argument("--suite", choices=list(SUITES), required=True)
a = ap.parse_args()
for cmd in SUITES[a.suite] + [["bench.summary"]]:
    subprocess.run([sys.executable, "-m", *cmd], check=True)
