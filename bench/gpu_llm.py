"""GPU memory and step time on Llama-architecture shapes (1B, 8B, 70B; random init: weights change neither memory
nor time), as bench/gpu_t5.py does for T5: full fine-tuning, LoRA (r = 32 on q, v), in-loop LST, LST from the
cache (the side net alone, its kept layers' states copied host -> device each step as the reader delivers them),
and stage one's forward. QLoRA-style 4-bit backbones appear in --plan's bytes only: bitsandbytes quantizes weights
as a checkpoint loads, and a random 70B checkpoint would first have to be written (140 GB); not measured. Layer dropping keeps every
fourth layer (8B: 8 of 32; 1B: 4 of 16) and for 70B every eighth (10 of 80), the last included.

What a cache-fed side net holds on the GPU (also printed by --plan, on any machine, from shapes alone): its own
parameters and AdamW state (fp32), the frozen embedding table (it embeds the input ids and, tied or not, its LM head
scores the verbalizer tokens; bf16), and one batch of cached states. For 70B that is 2.1 GB of table (128256 x 8192
bf16) against 140 GB of backbone; a classifier needs only the verbalizers' head rows, and the input embeddings could
come from the cache too, so the table is the part to cut first (not done here: the table is held whole).

    python -m bench.gpu_llm --plan                                     # CPU: shapes, parameter counts, bytes (JSON)
    python -m bench.gpu_llm --models llama-1b,llama-8b,llama-70b --out bench/results/gpu_llm.json   # needs CUDA

Not measured yet in this repository (no GPU was lent to the session that wrote it); `--plan` is tested on CPU.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # hidden, layers, heads, kv heads, ff, vocab, rope theta, tied: the published configs' sizes
    "llama-1b": (2048, 16, 32, 8, 8192, 128256, 500000.0, True),  # Llama-3.2-1B
    "llama-8b": (4096, 32, 32, 8, 14336, 128256, 500000.0, False),  # Llama-3.1-8B
    "llama-70b": (8192, 80, 64, 8, 28672, 128256, 500000.0, False),  # Llama-3.1-70B
    "smollm2-135m": (576, 30, 9, 3, 1536, 49152, 100000.0, True),  # the CPU suite's real model (bench/llm.py)
}
R = 8
METHODS = ("full_ft", "lora", "lst_inloop", "lst_cache", "stage_one_forward")


def kept_layers(name: str) -> list[int]:
    n = SHAPES[name][1]
    step = 8 if n >= 80 else 3 if name.startswith("smollm2") else 4
    return list(range(step - 1, n, step))  # every step-th layer, the last one included


def llama_config(name: str):
    from transformers import LlamaConfig

    d, n, h, kv, ff, vocab, theta, tied = SHAPES[name]
    return LlamaConfig(hidden_size=d, num_hidden_layers=n, num_attention_heads=h, num_key_value_heads=kv,
                       intermediate_size=ff, vocab_size=vocab, rope_theta=theta, tie_word_embeddings=tied,
                       max_position_embeddings=8192)


def side_spec(name: str):
    from pipeline.side_spec import spec_from_config

    return spec_from_config(llama_config(name), R, kept_layers(name), "ladder", "classification", 2, [[0], [1]])


def plan(name: str, batch: int, seq: int) -> dict:
    """Shapes only (meta device): parameter counts and the bytes each method must hold, before activations."""
    from transformers import LlamaForCausalLM

    from pipeline.side import SideNetwork

    cfg = llama_config(name)
    spec = side_spec(name)
    with torch.device("meta"):
        backbone = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
        side = SideNetwork(spec, {"embed": torch.empty(cfg.vocab_size, cfg.hidden_size)})
    trainable = side.trainable_parameters()
    table = cfg.vocab_size * cfg.hidden_size
    kept = len(spec.layers)
    states = batch * seq * kept * cfg.hidden_size
    lora = cfg.num_hidden_layers * 32 * (2 * cfg.hidden_size + cfg.hidden_size
                                         + cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads))
    gib = 2**30
    return {"model": name, "backbone_params": backbone, "kept_layers": spec.layers, "side_trainable_params": trainable,
            "side_trainable_share": trainable / backbone, "lora_trainable_params": lora,
            "bytes_gib": {  # weights + optimizer state; activations come on top (measured on a GPU)
                "full_ft_bf16_weights_fp32_adam": (2 * backbone + 12 * backbone) / gib,
                "lora_bf16_backbone": (2 * backbone + 16 * lora) / gib,
                "qlora_4bit_backbone": (0.5 * backbone + 16 * lora) / gib,
                "lst_cache_side_fp32_adam_plus_bf16_table": (16 * trainable + 2 * table) / gib,
                "lst_cache_one_batch_of_states_bf16": 2 * states / gib,
                "embedding_table_bf16": 2 * table / gib,  # inside the side net line above: a classifier needs only its rows
                "stage_one_bf16_backbone": 2 * backbone / gib}}


def run_method(method: str, name: str, batch: int, seq: int, warmup: int, steps: int) -> dict:
    """Peak memory and median step time of one method on CUDA, bf16 backbone, fp32 trainable tensors."""
    from transformers import LlamaForCausalLM

    from bench.baselines import build_decoder, decoder_candidate_loglik
    from bench.gpu_t5 import timed
    from pipeline.batches import LadderBatch
    from pipeline.side import SideNetwork

    dev = "cuda"
    cfg = llama_config(name)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, cfg.vocab_size, (batch, seq), generator=g).to(dev)
    mask = torch.ones(batch, seq, dtype=torch.bool, device=dev)
    cands = [torch.tensor([5]), torch.tensor([6])]
    gold = [(i, i % 2) for i in range(batch)]
    if method in ("full_ft", "lora"):
        with torch.device(dev):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model, params = build_decoder(method, model)
        opt = torch.optim.AdamW(params, lr=1e-5)

        def step():
            with torch.autocast(dev, torch.bfloat16):
                ll, _ = decoder_candidate_loglik(model, ids, mask, cands, gold)
            (-ll.mean()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        trainable = sum(p.numel() for p in params)
    else:
        spec = side_spec(name)
        names = spec.read_states
        side = SideNetwork(spec, {"embed": torch.randn(cfg.vocab_size, cfg.hidden_size, device=dev,
                                                       dtype=torch.bfloat16)}).to(dev)
        params = [p for p in side.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        trainable = 0 if method == "stage_one_forward" else side.trainable_parameters()
        if method in ("lst_inloop", "stage_one_forward"):
            with torch.device(dev):
                model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval().requires_grad_(False)
            out = {}
            for k in spec.layers:
                model.model.layers[k].register_forward_hook(
                    lambda m, a, o, key=f"src_{k:02d}": out.__setitem__(key, o[0] if isinstance(o, tuple) else o))

            def states():
                with torch.no_grad():
                    model.model(input_ids=ids, attention_mask=mask, use_cache=False)
                return dict(out)
        else:
            host = {n: torch.randn(batch, seq, cfg.hidden_size, dtype=torch.bfloat16).pin_memory() for n in names}

            def states():
                return {n: v.to(dev, non_blocking=True) for n, v in host.items()}

        def step():
            st = states()
            if method == "stage_one_forward":
                for v in st.values():
                    v.to("cpu", non_blocking=True)
                return
            b = LadderBatch(ids, mask, st, torch.zeros(batch, device=dev))
            b.tgt_ids, b.tgt_mask = ids[:, :0], mask[:, :0]
            b.tgt_labels = torch.tensor([[5 + i % 2] for i in range(batch)], device=dev)
            b.tgt_row, b.tgt_cand = torch.arange(batch, device=dev), torch.zeros(batch, dtype=torch.long, device=dev)
            with torch.autocast(dev, torch.bfloat16):
                loss = side(b).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    t = timed(step, warmup, steps, dev)
    return {"step_time_s": t, "tokens_per_s": batch * seq / t, "trainable_params": trainable}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama-1b,llama-8b,llama-70b")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--plan", action="store_true", help="shapes, parameter counts and bytes only (any machine)")
    ap.add_argument("--out", default="bench/results/gpu_llm.json")
    ap.add_argument("--plan-out", default="bench/results/gpu_llm_plan.json", help="where --plan writes its JSON")
    a = ap.parse_args()
    if not a.plan and not torch.cuda.is_available():
        sys.exit("error: bench.gpu_llm measures GPU memory and needs a CUDA device; use --plan on this machine")
    import transformers

    head = {"command": " ".join(["python -m bench.gpu_llm"] + sys.argv[1:]),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    plans = [plan(name, a.batch, a.seq) for name in a.models.split(",")]
    if a.plan:
        for p in plans:
            print(json.dumps(p))
        Path(a.plan_out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.plan_out).write_text(json.dumps({**head, "r": R, "config": {"batch": a.batch, "seq": a.seq},
                                                "plans": plans}, indent=1))
        return
    from bench.machine import describe, record_row

    res = {**head, **describe(torch.device("cuda")), "config": vars(a), "results": [], "plans": plans}
    for name in a.models.split(","):
        for method in a.methods.split(","):
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            row = {"model": name, "method": method}
            try:
                row.update(run_method(method, name, a.batch, a.seq, a.warmup, a.steps))
                row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            except torch.OutOfMemoryError:
                row.update({"oom": True, "peak_memory_gb": None})
            record_row(res, row, a.out)


if __name__ == "__main__":
    main()
