"""GPU memory and step time of fine-tuning methods on randomly initialized T5 shapes (paper Table 1
columns): full fine-tuning, LoRA (r=32 on q, v), prompt tuning (100 tokens), LST in the loop, and
LST from the cache (ours: the side net alone, its ladder states copied host->device each step as a
reader would deliver them). Also times stage one's work per batch (backbone forward + copying the
kept states to host) to size the sweep: one stage one + k stage twos against k in-loop runs.

Weights are random: values change neither memory nor time. T5 has no biases, so BitFit is not run.

    python -m bench.gpu_t5 --models t5-base,t5-large,t5-3b --dtypes bf16,fp32 --out bench/results/gpu_t5.json
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.baselines import PROMPT_TOKENS, SELECTIVE_K, T5_METHODS, build_t5, loss_t5  # noqa: E402
from bench.machine import record_row  # noqa: E402
from pipeline.batches import LadderBatch
from pipeline.side import SideNetwork
from pipeline.side_spec import spec_from_config  # noqa: E402

SHAPES = {  # d_model, d_ff, d_kv, heads, layers; paper's kept side layers (supplement Table 2)
    "t5-base": (768, 3072, 64, 12, 12, [1, 2, 3, 5, 6, 7, 9, 10, 11]),
    "t5-large": (1024, 4096, 64, 16, 24, list(range(1, 24, 2))),
    "t5-3b": (1024, 16384, 128, 32, 24, [23]),
    "t5-small": (512, 2048, 64, 8, 6, [0, 1, 2, 3, 4, 5]),  # CPU suite shape (side layers: all)
}
CAND = 2  # binary task: candidates for rank classification; training uses the gold one


def t5_config(name):
    from transformers import T5Config

    d, ff, kv, h, n, _ = SHAPES[name]
    return T5Config(vocab_size=32128, d_model=d, d_ff=ff, d_kv=kv, num_heads=h, num_layers=n, dropout_rate=0.1,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def make_model(name, dtype, dev="cuda"):
    from transformers import T5ForConditionalGeneration

    with torch.device(dev):
        m = T5ForConditionalGeneration(t5_config(name))
    return m.to(dtype)


def batch_tensors(B, S, U, vocab=32128, dev="cuda"):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (B, S), generator=g)
    labels = torch.randint(2, vocab, (B, U), generator=g)
    return ids.to(dev), torch.ones(B, S, dtype=torch.bool, device=dev), labels.to(dev)


def sync(dev):
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def timed(step, warmup, steps, dev="cuda"):
    """Median wall time of one step, after warm-up steps."""
    for _ in range(warmup):
        step()
    sync(dev)
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(dev)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def hf_step(method, model, ids, mask, labels, params, amp):
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with torch.autocast(ids.device.type, torch.bfloat16, enabled=amp):
            loss = loss_t5(method, model, ids, mask, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def capture(model, layers):
    """Hooks keeping kept-layer block outputs of encoder and decoder."""
    out, hs = {}, []
    for stack, mod in (("src", model.encoder), ("tgt", model.decoder)):
        for k in layers:
            def fn(m, a, o, key=f"{stack}_{k:02d}"):
                out[key] = o[0] if isinstance(o, tuple) else o
            hs.append(mod.block[k].register_forward_hook(fn))
    return out, hs


def side_for(name, dtype, dev="cuda", select_k=0):
    d, ff, kv, h, n, layers = SHAPES[name]
    spec = spec_from_config(t5_config(name), 8, layers, "ladder", "classification", CAND, [0] * CAND, 0.1, select_k)
    frozen = {"embed": torch.randn(32128, d, device=dev).to(torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)}
    return SideNetwork(spec, frozen).to(dev), spec


# LST from the cache: None = states already decoded to bf16 in (pinned) host memory, copied to the device
# each step; (dtype, codec) = rows held encoded as the store's reader holds a RAM group, decoded each step
CACHE_CODECS = {"lst_cache": None, "lst_cache_fp16": ("fp16", "zstd"), "lst_cache_int8": ("fp16", "int8"),
                "lst_cache_bitround": ("fp16", "bitround"), "lst_cache_selective": None}
SIDE_SELECT_K = {"lst_cache_selective": SELECTIVE_K}  # the side net's own token-selective option


def cache_feed(shapes: dict, d: int, codec, dev):
    """A function returning one step's ladder states on `dev`, as stage two's reader delivers them."""
    from pipeline.ladder_store import decode_rows, encode_rows

    pin = torch.device(dev).type == "cuda"
    if codec is None:
        host = {k: torch.randn(*s, d, dtype=torch.bfloat16) for k, s in shapes.items()}
        host = {k: v.pin_memory() if pin else v for k, v in host.items()}
        return lambda: {k: v.to(dev, non_blocking=True) for k, v in host.items()}
    enc = {k: encode_rows(torch.randn(s[0] * s[1], d), *codec) for k, s in shapes.items()}

    def feed():
        return {k: torch.from_numpy(decode_rows(a, sc, *codec)).view(*shapes[k], d).to(dev, non_blocking=True)
                for k, (a, sc) in enc.items()}
    return feed


def lst_batch(ids, mask, labels, states):
    B, U = labels.shape
    dec_in = torch.zeros_like(labels)
    dec_in[:, 1:] = labels[:, :-1]
    return LadderBatch(ids, mask, states, None, dec_in, torch.ones_like(labels, dtype=torch.bool), labels,
                       torch.arange(B, device=ids.device), torch.zeros(B, dtype=torch.long, device=ids.device), 0)


def run_method(method, name, dtype, B, S, U, warmup, steps, dev="cuda"):
    amp = dtype == torch.bfloat16
    ids, mask, labels = batch_tensors(B, S, U, dev=dev)
    tokens = B * (S + U)
    if method in T5_METHODS:
        model, params = build_t5(method, make_model(name, dtype, dev))
        if method == "prompt_tuning":
            tokens = B * (S + PROMPT_TOKENS + U)
        model.train()
        step = hf_step(method, model, ids, mask, labels, params, amp and method not in ("full_ft", "selective"))
        trainable = sum(p.numel() for p in params)
    elif method in ("lst_inloop", "stage_one_forward") or method in CACHE_CODECS:
        layers = SHAPES[name][5]
        side, spec = side_for(name, dtype, dev, SIDE_SELECT_K.get(method, 0))
        side.train()
        trainable = side.trainable_parameters()
        params = [p for p in side.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=3e-3)
        if method in ("lst_inloop", "stage_one_forward"):
            model = make_model(name, torch.bfloat16 if amp else torch.float32, dev).eval()
            for p in model.parameters():
                p.requires_grad_(False)
            out, _ = capture(model, layers)
        if method in CACHE_CODECS:
            shapes = {f"src_{k:02d}": (B, S) for k in layers} | {f"tgt_{k:02d}": (B, U) for k in layers}
            host_states = cache_feed(shapes, spec.d_model, CACHE_CODECS[method], dev)
        dec_in = torch.zeros_like(labels)

        def backbone_states():
            with torch.no_grad():
                enc = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
                model.decoder(input_ids=dec_in, encoder_hidden_states=enc, encoder_attention_mask=mask, use_cache=False)
            return dict(out)

        if method == "stage_one_forward":
            trainable = 0

            def step():
                st = backbone_states()
                for v in st.values():
                    v.to("cpu", non_blocking=True)
        else:
            def step():
                st = backbone_states() if method == "lst_inloop" else host_states()
                with torch.autocast(ids.device.type, torch.bfloat16, enabled=amp):
                    loss = side(lst_batch(ids, mask, labels, st)).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
    t = timed(step, warmup, steps, dev)
    return {"step_time_s": t, "tokens_per_s": tokens / t, "trainable_params": trainable}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="t5-base,t5-large,t5-3b")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--methods", default="full_ft,lora,prompt_tuning,ia3,selective,lst_inloop,lst_cache,"
                                         "lst_cache_selective,stage_one_forward")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--src-len", type=int, default=128)
    ap.add_argument("--tgt-len", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="bench/results/gpu_t5.json")
    ap.add_argument("--merge", action="store_true", help="keep the other rows of an existing --out")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 rows use TF32 tensor cores, as PyTorch users on Hopper do
    import transformers

    res = {"command": " ".join(["python -m bench.gpu_t5"] + sys.argv[1:]),
           "device": torch.cuda.get_device_name(0), "machine": platform.node(),
           "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__},
           "config": vars(a), "notes": "BitFit not run: T5 has no bias terms. Weights random (shapes only).",
           "results": []}
    out = Path(a.out)
    if a.merge and out.exists():  # add or replace these rows; rows of other methods stay with their own command
        old = json.loads(out.read_text())
        res["results"] = [dict(r, command=r.get("command", old["command"])) for r in old["results"]]
    for name in a.models.split(","):
        for dt in a.dtypes.split(","):
            dtype = torch.bfloat16 if dt == "bf16" else torch.float32
            for method in a.methods.split(","):
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                row = {"model": name, "dtype": dt, "method": method, "command": res["command"]}
                try:
                    steps = a.steps if name != "t5-3b" else max(5, a.steps // 2)
                    row.update(run_method(method, name, dtype, a.batch, a.src_len, a.tgt_len, a.warmup, steps))
                    row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
                except torch.OutOfMemoryError:
                    row.update({"oom": True, "peak_memory_gb": None})
                gc.collect()
                torch.cuda.empty_cache()
                key = (name, dt, method)
                res["results"] = [r for r in res["results"] if (r["model"], r["dtype"], r["method"]) != key]
                record_row(res, row, out)


if __name__ == "__main__":
    main()
