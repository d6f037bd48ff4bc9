"""CPU memory-and-time suite: every method side by side on small shapes, one fresh process per
method so each peak is its own.

Shapes (random weights: values change neither memory nor time):
    minilm    BERT encoder of all-MiniLM-L6-v2's shape (6 x 384), classification head, batch 16 x 128 tokens
    t5-small  T5 (6 + 6 x 512), text-to-text, batch 8 x (128 source + 4 target) tokens

Methods: full_ft, lora, prompt_tuning, ia3, bitfit (BERT only: T5 has no biases), selective (token-
selective, k=32), lst_inloop (side net + live frozen backbone), lst_cache_fp16 / _int8 / _bitround
(side net fed from rows held encoded as the store reader holds them, decoded each step),
lst_cache_selective (the side net's own token-selective option, k=32, fed bf16 rows), and
stage_one_forward (the frozen forward that stage one runs once per example).

Memory on CPU: peak resident set size of the method's process (ru_maxrss), and that peak minus the
RSS after imports and batch creation (weights + gradients + optimizer state + activations + allocator
slack). Time: median of --steps steps after --warmup. Threads: torch's default (all cores).

    python -m bench.cpu_methods                       # ~10 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import gpu_t5  # noqa: E402
from bench.baselines import ENCODER_METHODS, T5_METHODS, build_encoder, loss_encoder  # noqa: E402
from bench.machine import describe, record_row  # noqa: E402

LST = ("lst_inloop", "lst_cache_fp16", "lst_cache_int8", "lst_cache_bitround", "lst_cache_selective",
       "stage_one_forward")
METHODS = {"minilm": ENCODER_METHODS + LST, "t5-small": T5_METHODS + LST}
BATCH = {"minilm": (16, 128, 0), "t5-small": (8, 128, 4)}  # B, source, target tokens


def minilm_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                      intermediate_size=1536, max_position_embeddings=512)


def run_encoder(method: str, B: int, S: int, warmup: int, steps: int) -> dict:
    from transformers import BertModel

    from pipeline.backbone import Backbone, forward_states
    from pipeline.batches import LadderBatch
    from pipeline.layout import SRC
    from pipeline.side import SideNetwork
    from pipeline.side_spec import spec_from_config

    cfg = minilm_config()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, cfg.vocab_size, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.bool)
    y = torch.randint(0, 2, (B,), generator=g)
    if method in ENCODER_METHODS:
        model, params = build_encoder(method, BertModel(cfg), 2)
        model.train()
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            loss_encoder(model, ids, mask, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        trainable = sum(p.numel() for p in params)
    else:
        spec = spec_from_config(cfg, 8, None, "ladder", "classification", 2, [], 0.1,
                                gpu_t5.SIDE_SELECT_K.get(method, 0))
        names = spec.state_names(SRC)
        if method in ("lst_inloop", "stage_one_forward"):
            bert = BertModel(cfg).eval().requires_grad_(False)
            bb = Backbone("minilm-shape", bert, None, "encoder", torch.device("cpu"), torch.float32, "", 6)

            def states():
                return {k: v.float() for k, v in forward_states(bb, ids, mask, names).items()}
        else:
            states = gpu_t5.cache_feed({n: (B, S) for n in names}, cfg.hidden_size,
                                       gpu_t5.CACHE_CODECS[method], "cpu")
        side = SideNetwork(spec, {}).train()
        params = [p for p in side.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=3e-3)
        trainable = 0 if method == "stage_one_forward" else side.trainable_parameters()

        def step():
            st = states()
            if method == "stage_one_forward":
                return
            side(LadderBatch(ids, mask, st, labels=y)).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    t = gpu_t5.timed(step, warmup, steps, "cpu")
    return {"step_time_s": t, "tokens_per_s": B * S / t, "trainable_params": trainable}


def one(model: str, method: str, warmup: int, steps: int) -> dict:
    import psutil

    B, S, U = BATCH[model]
    start = psutil.Process().memory_info().rss / 2**20
    if model == "minilm":
        row = run_encoder(method, B, S, warmup, steps)
    else:
        row = gpu_t5.run_method(method, model, torch.float32, B, S, U, warmup, steps, dev="cpu")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": model, "method": method, **row, "peak_rss_mb": peak, "rss_start_mb": start,
            "peak_above_start_mb": peak - start}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="minilm,t5-small")
    ap.add_argument("--methods", default="", help="comma list (default: every method of each model)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="bench/results/cpu_methods.json")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # model:method, in the child process
    a = ap.parse_args()
    if a.one:
        model, method = a.one.split(":")
        print(json.dumps(one(model, method, a.warmup, a.steps)))
        return
    res = {"command": " ".join(["python -m bench.cpu_methods"] + sys.argv[1:]), **describe(torch.device("cpu")),
           "torch_threads": torch.get_num_threads(),
           "config": {**vars(a), "batch": BATCH}, "memory": "peak RSS of a fresh process per method; "
           "peak_above_start_mb subtracts the RSS after imports and batch creation", "results": []}
    for model in a.models.split(","):
        for method in (a.methods.split(",") if a.methods else METHODS[model]):
            cmd = [sys.executable, "-m", "bench.cpu_methods", "--one", f"{model}:{method}",
                   "--warmup", str(a.warmup), "--steps", str(a.steps)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                row = {"model": model, "method": method, "error": p.stderr.strip().splitlines()[-1]}
            else:
                row = json.loads(p.stdout.strip().splitlines()[-1])
            record_row(res, row, a.out)


if __name__ == "__main__":
    main()
