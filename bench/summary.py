"""bench/results/summary.json, the markdown tables (bench/results/tables.md) and the README's results
block (between its `results:begin` / `results:end` markers), all from the newest result files.

    python -m bench.summary
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

RES = Path(__file__).resolve().parent / "results"
README = RES.parents[1] / "README.md"
SWEEP_LRS, SWEEP_EPOCHS = 4, 10  # paper: 10 epochs; a 4-learning-rate sweep
HEADLINE = "t5-base/bf16"  # the paper's Table 1 setting


def load(name):
    p = RES / name
    return json.loads(p.read_text()) if p.exists() else None


def find(rows, **key):
    for r in rows:
        if all(r.get(k) == v for k, v in key.items()):
            return r
    return None


def ratio(a, b, key):
    if not a or not b or a.get(key) is None or b.get(key) is None:
        return None
    return a[key] / b[key]


def gpu_ratios(gpu) -> dict:
    out = {}
    for model in ("t5-base", "t5-large", "t5-3b"):
        for dt in ("bf16", "fp32"):
            c, i, l, f = (find(gpu["results"], model=model, dtype=dt, method=m)
                          for m in ("lst_cache", "lst_inloop", "lora", "stage_one_forward"))
            sweep = None
            if c and i and f and c.get("step_time_s") and i.get("step_time_s"):
                n = SWEEP_LRS * SWEEP_EPOCHS
                sweep = n * i["step_time_s"] / (f["step_time_s"] + n * c["step_time_s"])
            out[f"{model}/{dt}"] = {"peak_memory_ratio_vs_inloop": ratio(c, i, "peak_memory_gb"),
                                    "step_time_ratio_vs_inloop": ratio(c, i, "step_time_s"),
                                    "peak_memory_ratio_vs_lora": ratio(c, l, "peak_memory_gb"),
                                    "sweep_speedup_vs_inloop_from_step_times": sweep}
    return out


def cpu_ratios(cpu) -> dict:
    out = {}
    for model in sorted({r["model"] for r in cpu["results"]}):
        c, i, l = (find(cpu["results"], model=model, method=m) for m in ("lst_cache_fp16", "lst_inloop", "lora"))
        out[model] = {"peak_rss_above_start_ratio_vs_inloop": ratio(c, i, "peak_above_start_mb"),
                      "step_time_ratio_vs_inloop": ratio(c, i, "step_time_s"),
                      "peak_rss_above_start_ratio_vs_lora": ratio(c, l, "peak_above_start_mb")}
    return out


def main():
    gpu, store, cpu = load("gpu_t5.json"), load("store_codecs.json"), load("cpu_methods.json")
    acc, dist = load("accuracy.json"), load("distributed_cpu.json")
    sweeps = {k: load(f"sweep_{k}.json") for k in ("cpu", "gpu")}
    notes = []
    s = {"device": gpu["device"] if gpu else None, "cpu_device": cpu["device"] if cpu else None}
    per_model = gpu_ratios(gpu) if gpu else {}
    head = per_model.get(HEADLINE, {})
    s.update({"stage_two_peak_memory_ratio_vs_inloop": head.get("peak_memory_ratio_vs_inloop"),
              "stage_two_step_time_ratio_vs_inloop": head.get("step_time_ratio_vs_inloop"),
              "stage_two_peak_memory_ratio_vs_lora": head.get("peak_memory_ratio_vs_lora"),
              "sweep_speedup_vs_inloop": head.get("sweep_speedup_vs_inloop_from_step_times")})
    notes.append(f"Headline memory/time/sweep keys: GPU {HEADLINE} (batch 100, 128 source / 4 target tokens); "
                 "per_model has every T5 shape. Their sweep = 4 lrs x 10 epochs from measured step times, stage one "
                 "counted as backbone forward + device-to-host copy per batch.")
    s["per_model"] = per_model
    s["cpu_suite"] = cpu_ratios(cpu) if cpu else None
    s["sweep_speedup_measured_end_to_end"] = {k: v["sweep_speedup_vs_inloop"] for k, v in sweeps.items() if v}
    if any(sweeps.values()):
        notes.append("sweep_speedup_measured_end_to_end: real stage CLIs, real MiniLM + rt-snippets, one stage one "
                     "+ 4 stage twos vs 4 in-loop runs (bench/results/sweep_*.json).")
    if store:
        s["stage_one_tokens_per_s_ratio_vs_forward"] = store["stage_one_tokens_per_s_ratio_vs_forward"]
        s["bytes_per_token"] = {k: v["bytes_per_token_per_layer"] for k, v in store["codecs"].items()}
        notes.append("bytes_per_token: per stored layer (MiniLM, d=384), real rt-snippets, CPU run "
                     f"({store['config']['examples']} examples).")
    else:
        s["stage_one_tokens_per_s_ratio_vs_forward"] = s["bytes_per_token"] = None
    s["cache_vs_inloop_accuracy_delta_pt"] = s["lst_vs_full_ft_accuracy_delta_pt"] = None
    if acc and acc["tasks"]:
        t = acc["tasks"]
        d = [v["cache_vs_inloop_delta_pt"]["mean"] for v in t.values() if v.get("cache_vs_inloop_delta_pt")]
        f = [v["lst_vs_full_ft_delta_pt"] for v in t.values() if v.get("lst_vs_full_ft_delta_pt") is not None]
        s["cache_vs_inloop_accuracy_delta_pt"] = statistics.mean(d) if d else None
        s["lst_vs_full_ft_accuracy_delta_pt"] = statistics.mean(f) if f else None
        s["accuracy_per_task"] = {k: {"headline_metric": v["headline_metric"],
                                      "cache_vs_inloop_delta_pt": v.get("cache_vs_inloop_delta_pt", {}).get("mean"),
                                      "lst_vs_full_ft_delta_pt": v.get("lst_vs_full_ft_delta_pt"),
                                      **{m: round(x["mean"], 2) for m, x in v["methods"].items()}}
                                  for k, v in t.items()}
        notes.append(f"accuracy deltas: mean over tasks {', '.join(t)} of 3-seed means (test split, headline metric), "
                     "MiniLM r=8; cache vs in-loop is paired by seed. See accuracy.json for every run.")
    else:
        notes.append("accuracy deltas: bench/results/accuracy.json not present.")
    if dist:
        s["distributed_cpu"] = {"stage_one_speedup_vs_in_process": dist["stage_one_speedup_vs_in_process"],
                                "stage_two_speedup_vs_1_process": dist["stage_two_speedup_vs_1_process"]}
        notes.append("distributed_cpu: tokens/s ratios within one run of bench/distributed.py on a shared 2-core "
                     "machine (medians of interleaved repeats).")
    stage_two_keys(s, notes, load("stage_two_cpu.json"), load("stage_two_cuda.json"))
    llm = load("llm.json")
    s["llm_accuracy"] = llm["llm_accuracy"] if llm else None
    s["llm_stage_two_peak_memory_ratio_vs_lora"] = llm["llm_stage_two_peak_memory_ratio_vs_lora"] if llm else None
    if llm:
        notes.append("llm_accuracy: SmolLM2-135M-Instruct (GGUF, offline), test accuracy (mean over the seeds run), "
                     f"2-core CPU; null = not run yet (jobs pending: {len(llm['jobs_pending'])}; bench/results/llm.json).")
    else:
        notes.append("llm_accuracy: bench/results/llm.json not present.")
    feed = load("inloop_feed.json")
    s["inloop_backbone_chunked_speedup_cpu"] = feed["chunked_speedup"] if feed else None
    if feed:
        notes.append("inloop_backbone_chunked_speedup_cpu: in-loop LST's backbone forward in length-sorted chunks "
                     f"against one padded forward per batch ({feed['config']['task']}, batches of "
                     f"{feed['config']['batch']}, {feed['config']['threads']} thread; `{feed['command']}`).")
    s.update(gpu_llm_keys(load("gpu_llm_plan.json"), load("gpu_llm.json")))
    notes.append("llm_gpu_plan_gib: GiB before activations on a GPU per Llama-architecture shape, from shapes alone "
                 "(bench/results/gpu_llm_plan.json); llm_gpu_measured: "
                 + ("peak-memory and step-time ratios on CUDA (bench/results/gpu_llm.json)." if s["llm_gpu_measured"]
                    else "null, not measured: no GPU was lent to a session since bench/gpu_llm.py was written."))
    s["notes"] = notes
    (RES / "summary.json").write_text(json.dumps(s, indent=2))
    blocks = readme_blocks()
    (RES / "tables.md").write_text(blocks["results"])
    if README.exists():
        README.write_text(fill_readme(README.read_text(), blocks))
    print(json.dumps(s, indent=2))


def stage_two_keys(s: dict, notes: list, cpu: dict | None, gpu: dict | None) -> None:
    """Issue 11's keys: packed vs padded and the one-pass sweep (bench/stage_two.py), null with the reason."""
    lay, sw = (cpu or {}).get("layouts"), (cpu or {}).get("sweeps")
    s["packed_vs_padded_tokens_per_s_ratio_cpu"] = lay["packed_vs_padded_tokens_per_s_ratio"] if lay else None
    s["sweep16_one_pass_time_ratio_vs_one_run_cpu"] = sw["sweep16_one_pass_time_ratio_vs_one_run"] if sw else None
    if cpu:
        notes.append("packed_vs_padded / sweep16 (CPU): one run of bench/stage_two.py (bench/results/stage_two_cpu.json)"
                     ", real MiniLM cache of rt-snippets; the sweep ratio is one `train_side --sweep` process of 16 "
                     "configs over one process of 1, start-up included, measured with the configs stacked (vmap).")
        st, comp = cpu.get("stacking"), cpu.get("compile") or {}
        if st:
            sp = [r["stacked_vs_in_turn_speedup"] for r in st["results"].values()]
            notes.append(f"CPU stage two is bound by the side net's compute: the data path is "
                         f"{100 * lay['packed']['data_path_share']:.0f}% of a packed step, so one pass over the cache "
                         f"saves only start-up and reads, and stacking {st['configs']} configs (vmap) ran "
                         f"{min(sp):.2f}-{max(sp):.2f}x the speed of stepping them in turn; sweeps therefore step "
                         f"configs in turn on CPU (--sweep-stack auto) and the <= 6x goal for 16 configs is not met.")
            res = st["results"]
            notes.append("The official dropout sites (0.1 at the embedding output, attention probabilities, inside the "
                         "feed-forward and after the final norm) take about half of a CPU step: "
                         f"{res['padded_dropout_official']['in_turn_s_per_batch']:.2f} vs "
                         f"{res['padded_dropout_off']['in_turn_s_per_batch']:.2f} s per batch padded, "
                         f"{res['packed_dropout_official']['in_turn_s_per_batch']:.2f} vs "
                         f"{res['packed_dropout_off']['in_turn_s_per_batch']:.2f} packed (4 configs in turn); "
                         "--dropout 0 etc. trade that for the official recipe.")
        ok = {k: r["compiled_vs_eager_tokens_per_s_ratio"] for k, r in comp.items() if "error" not in r}
        if ok:
            notes.append("torch.compile (dynamic shapes) on CPU: " + ", ".join(f"{k} {v:.2f}x" for k, v in ok.items())
                         + " eager tokens/s after compilation: off (not offered); not assessed on a GPU.")
    else:
        notes.append("packed_vs_padded / sweep16 (CPU): bench/results/stage_two_cpu.json not present.")
    g = (gpu or {}).get("sweeps") or {}
    s["sweep16_speedup_vs_inloop_gpu"] = g.get("sweep16_speedup_vs_inloop")
    s["sweep_tokens_per_s_gpu"] = g.get("sweep_tokens_per_s")
    if not gpu:
        notes.append("sweep16_speedup_vs_inloop_gpu, sweep_tokens_per_s_gpu: null, not measured: no GPU was lent "
                     "after one-pass sweeps were built (bench/stage_two.py --device cuda measures them).")


def readme_blocks() -> dict[str, str]:
    """The README's generated blocks, each a pure function of the committed result files."""
    acc, sweeps = load("accuracy.json"), {k: load(f"sweep_{k}.json") for k in ("cpu", "gpu")}
    return {"results": tables(load("gpu_t5.json"), load("store_codecs.json"), load("cpu_methods.json"), acc, sweeps,
                              load("distributed_cpu.json"), load("stage_two_cpu.json"), load("lst_explore.json"),
                              load("llm.json"), load("gpu_llm_plan.json"), load("gpu_llm.json")),
            "demo": demo_block(load("demo.json"))}


def fill_readme(text: str, blocks: dict[str, str]) -> str:
    """README text with every `<!-- NAME:begin ... -->` ... `<!-- NAME:end -->` block replaced."""
    for name, body in blocks.items():
        begin, end = f"<!-- {name}:begin", f"<!-- {name}:end -->"
        if begin not in text:
            continue
        pre, rest = text.split(begin, 1)
        marker, rest = rest.split("-->", 1)
        post = rest.split(end, 1)[1]
        text = f"{pre}{begin}{marker}-->\n{body}{end}{post}"
    return text


def demo_block(d) -> str:
    if not d:
        return "Not measured yet: run `make demo` (it writes bench/results/demo.json), then `python -m bench.summary`.\n"
    t, tr, p = d["test"], d["train"], d["params"]
    setup = f", set-up {d['setup_wall_s']:.0f} s" if d.get("setup_wall_s") else ""
    return "\n".join([
        f"`{d['command']}` on {d['device']} ({d['cpu_count']} cores, torch {d['versions']['torch']}): real MiniLM, "
        f"rt-sentiment, r = {p['r']}, {p['init']} init, {p['epochs']} epochs, best validation epoch "
        f"{tr['best_epoch']}. Test split ({t['examples']:,} sentences):", "",
        "| | accuracy | F1 | MCC |", "|---|---:|---:|---:|",
        f"| LST from the cache | **{100 * t['accuracy']:.1f}** | {100 * t['f1']:.1f} | "
        f"{100 * t['matthews_correlation']:.1f} |",
        f"| frozen-features baseline (logistic regression on mean-pooled last layer) | "
        f"{100 * t['baseline_accuracy']:.1f} | {100 * t['baseline_f1']:.1f} | "
        f"{100 * t['baseline_matthews_correlation']:.1f} |", "",
        f"{tr['trainable_params']:,} trainable parameters; stage two peak {tr['peak_memory_mb']:,.0f} MB "
        f"({tr['peak_memory_kind']}), {tr['train_tokens_per_s']:,.0f} training tokens/s; `dvc repro` took "
        f"{d['repro_wall_s']:.0f} s{setup}.", ""])


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


ACC_ORDER = ["lst_cache", "lst_inloop", "full_ft", "lora", "selective", "frozen", "lst_fuse_after", "lst_magnitude",
             "lst_random", "lst_int8", "lst_bitround"]
ACC_LABEL = {"lst_cache": "**LST from the cache (ours)**", "lst_inloop": "LST, backbone in the loop",
             "full_ft": "full fine-tuning", "lora": "LoRA r=32 (q, v)", "selective": "token-selective FT (k=32)",
             "frozen": "frozen features + linear model", "lst_fuse_after": "LST, ladder after the block (old order)",
             "lst_magnitude": "LST, magnitude init", "lst_random": "LST, random init", "lst_int8": "LST, int8 cache",
             "lst_bitround": "LST, BitRound cache"}


def accuracy_table(acc) -> list[str]:
    tasks = list(acc["tasks"])
    T = acc["tasks"]
    out = ["Accuracy (real MiniLM, full splits, 3 seeds, mean ± std of the test headline metric: accuracy, "
           "rt-rating Pearson/Spearman mean; lr picked on validation with seed 0; every trained method's test score "
           "is its best validation epoch's; `python -m bench.accuracy --tasks ...`, run per task as listed below "
           "the table):", "",
           "| method | trainable params | " + " | ".join(tasks) + " |", "|---|---:|" + "---:|" * len(tasks)]
    for m in ACC_ORDER:
        cells = []
        for t in tasks:
            x = T[t]["methods"].get(m)
            if x is None:
                cells.append("pending" if m in T[t].get("missing_methods", []) else "")
            else:
                n = len(x.get("seeds", [0, 1, 2]))  # fewer seeds than the suite's 3: say so, not "± 0.0"
                cells.append(f"{x['mean']:.1f}" if m == "frozen" else f"{x['mean']:.1f} ± {x['std']:.1f}" if n > 1
                             else f"{x['mean']:.1f} (1 seed)")
        if not any(cells):
            continue
        # parameter count of the classification tasks (a regression head has one output, not two)
        tp = next((T[t]["methods"][m]["trainable_params"] for t in sorted(tasks, key=lambda t: T[t]["headline_metric"] != "accuracy")
                   if m in T[t]["methods"]), None)
        out.append(f"| {ACC_LABEL[m]} | {_fmt(tp, ',')} | " + " | ".join(cells) + " |")
    out.append("| LST − full fine-tuning (pt) | | " + " | ".join(
        _fmt(T[t].get("lst_vs_full_ft_delta_pt"), "+.2f") for t in tasks) + " |")
    out.append("| LST cache − in-loop, paired by seed (pt) | | " + " | ".join(
        _fmt((T[t].get("cache_vs_inloop_delta_pt") or {}).get("mean"), "+.2f") for t in tasks) + " |")
    out += ["", "Where each task ran:", ""]
    for t in tasks:
        run = T[t]["run"]
        where = run.get("device", "see the command")
        note = f"; {T[t]['pending']}" if T[t].get("pending") else ""
        out.append(f"- {t}: {where}; `{run['command']}`{note}")
    return out + [""]


def distributed_table(d) -> list[str]:
    out = [f"Past one process ({d['device']}, {d['cpu_count']} cores, shared with other jobs: ratios within this run "
           f"only; real MiniLM, {d['config']['examples']} rt-snippets, medians of {d['config']['repeats']} interleaved "
           f"repeats; `{d['command']}`):", "",
           "| stage | how | tokens/s | x vs one process | wall (s, start-up included) | store identical |",
           "|---|---|---:|---:|---:|---|"]
    for k, r in d["stage_one"].items():
        out.append(f"| one | {k.replace('_', ' ')} | {r['median_tokens_per_s']:,.0f} | "
                   f"{d['stage_one_speedup_vs_in_process'][k]:.2f} | {r['median_wall_s']:.0f} | "
                   f"{'yes' if r['store_identical_to_in_process'] else 'no'} |")
    for k, r in d["stage_two"].items():
        out.append(f"| two | {k.replace('_', ' ')} | {r['median_tokens_per_s']:,.0f} | "
                   f"{d['stage_two_speedup_vs_1_process'][k]:.2f} | {r['median_wall_s']:.0f} | |")
    return out + [""]


def stage_two_table(d) -> list[str]:
    """bench/stage_two.py: what bounds a stage-two step, torch.compile, and one-pass sweeps against separate runs."""
    lay, comp, sw = d.get("layouts"), d.get("compile"), d.get("sweeps")
    out = [f"Stage two at the speed of the side net ({d['device']}, {d['cpu_count']} cores, torch "
           f"{d['versions']['torch']}; real MiniLM cache of {d['config']['examples']} rt-snippets, r = 8, batch 100; "
           f"ratios within this one run; `{d['command']}`):", ""]
    if lay:
        out += ["| layout | tokens/s | x vs padded | data path share | padding share |", "|---|---:|---:|---:|---:|"]
        for k in ("padded", "packed"):
            r = lay[k]
            out.append(f"| {k} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / lay['padded']['tokens_per_s']:.2f} | "
                       f"{100 * r['data_path_share']:.1f}% | {100 * r['padding_share']:.1f}% |")
        out.append("")
    if comp:
        out += ["| layout | torch.compile (dynamic) vs eager, tokens/s | first epoch: compile cost (s) |", "|---|---:|---:|"]
        for k, r in comp.items():
            out.append(f"| {k} | error: {r['error']} | |" if "error" in r else
                       f"| {k} | {r['compiled_vs_eager_tokens_per_s_ratio']:.2f} | {r['compile_overhead_s']:.0f} |")
        out.append("")
    st = d.get("stacking")
    if st:
        out += [f"| {st['configs']} configs on one batch: layout, dropout | in turn (s per batch) | stacked, vmap (s per "
                "batch) | stacked speedup |", "|---|---:|---:|---:|"]
        for k, r in st["results"].items():
            out.append(f"| {k.replace('_dropout_', ', dropout ')} | {r['in_turn_s_per_batch']:.2f} | "
                       f"{r['stacked_s_per_batch']:.2f} | {r['stacked_vs_in_turn_speedup']:.2f}x |")
        out.append("")
    if sw:
        out += ["End to end, configs stacked (the CPU default before the stacking measurement above):", "",
                "| configs K | one `--sweep` process (s) | K separate runs (s) | speedup | one pass vs K = 1 |",
                "|---:|---:|---:|---:|---:|"]
        ks = [k for k in sw if str(k).isdigit()]
        for k in ks:
            r = sw[k]
            out.append(f"| {r['configs']} | {r['one_pass_s']:.0f} | {r['separate_runs_s']:.0f} | {r['speedup']:.2f}x | "
                       f"{r['one_pass_s'] / sw[ks[0]]['one_pass_s']:.2f} |")
        out.append("")
    return out


def _seeds_cell(mean: float, std: float | None, n: int) -> str:
    """A mean over n seeds with its std, or "(1 seed)" where there is no spread to show."""
    return f"{mean:.2f} ± {std:.2f} ({n} seeds)" if n > 1 else f"{mean:.2f} (1 seed)"


def _paired_delta(row: dict, base: dict | None) -> str:
    """Mean test difference to the base row over the seeds both have (a seed's noise cancels in the pair)."""
    if base is None or row is base:
        return ""
    common = [k for k in row.get("by_seed", {}) if k in base.get("by_seed", {})]
    if not common:
        return ""
    d = [row["by_seed"][k]["test"] - base["by_seed"][k]["test"] for k in common]
    return f"{sum(d) / len(d):+.2f} ({', '.join(f'{x:+.1f}' for x in d)})"


def explore_table(d) -> list[str]:
    """bench/explore.py: side-net variants (mean over the seeds each has), accuracy beside trainable share,
    memory and speed."""
    out = []
    for task, t in d["tasks"].items():
        lrs = ", ".join(f"{x:g}" for x in t["lrs"])
        # variants pair with LST run where they ran: lst_cache_cpu where the task's lst_cache ran elsewhere
        rows = {r["method"]: r for r in t["rows"]}
        base_name = "lst_cache_cpu" if "lst_cache_cpu" in rows else "lst_cache"
        base = rows.get(base_name)
        why = (" (LST from the cache re-run on this CPU at the current code: the CPU variants' base; the lst_cache "
               "row ran on the H100 with seeds 1-2 on seed 0's side init)") if base_name == "lst_cache_cpu" else ""
        out += [f"What closes the gap on {task} ({t['headline_metric']}, mean ± std over the seeds each variant has "
                f"run, each seed at its best lr on validation of {lrs}; tokens/s and peak memory are each row's own "
                f"run, on the device it names, CPU runs shared with other jobs: not comparable across rows; "
                f"paired with {base_name}{why}; `{t['run']['command']}`):", "",
                f"| variant | lr | val | test | test − {base_name}, paired by seed (pt) | trainable (% of backbone) "
                "| stage-two peak (MB) | train tokens/s | ran on |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in t["rows"]:
            n = len(r.get("seeds", [0]))  # rows written before --seeds had one seed
            out.append(f"| {r['method']} | {r['best_lr']:g} | {_seeds_cell(r['val'], r.get('val_std'), n)} | "
                       f"{_seeds_cell(r['test'], r.get('test_std'), n)} | {_paired_delta(r, base)} | "
                       f"{r['trainable_params']:,} ({r['trainable_pct_of_backbone']:.2f}%) | "
                       f"{_fmt(r['peak_memory_mb'], ',.0f')} | {_fmt(r['train_tokens_per_s'], ',.0f')} | "
                       f"{r.get('device') or 'as the suite’s LST rows (where each task ran, above)'} |")
        out.append("")
    return out


LLM_ORDER = ["lst_cache", "lst_inloop", "lora", "full_ft", "frozen", "zero_shot"]  # zero_shot: chat template
LLM_ABLATIONS = {"lora_b100": "lora, one step per 100 examples (ablation)",
                 "full_ft_b100": "full_ft, one step per 100 examples (ablation)"}  # rows shown once run


def llm_table(d) -> list[str]:
    """bench/llm.py: SmolLM2-135M-Instruct per task, what has finished (null = not run yet)."""
    tasks = [t for t, v in d["tasks"].items() if v["methods"]]
    if not tasks:
        return []
    out = ["SmolLM2-135M-Instruct (GGUF, offline; test accuracy, mean over the seeds run; `python -m bench.llm`, "
           f"2-core CPU; {len(d['jobs_pending'])} jobs pending, blank = not run yet):", "",
           "| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]

    def row(m):
        cells = [d["tasks"][t]["methods"].get(m) for t in tasks]
        out.append(f"| {LLM_ABLATIONS.get(m, m)} | " + " | ".join("" if c is None else f"{c['mean']:.1f} ({len(c['seeds'])} seed"
                                                f"{'s' if len(c['seeds']) > 1 else ''})" for c in cells) + " |")
    for m in LLM_ORDER:
        row(m)
    plain = [(d["tasks"][t].get("zero_shot_by_format") or {}).get("plain_test") for t in tasks]
    if any(plain):
        out.append("| zero_shot, plain prompt (the chat template is the row above) | " + " | ".join(
            "" if p is None else f"{100 * p['accuracy']:.1f}" for p in plain) + " |")
    for m in LLM_ABLATIONS:
        if any(m in d["tasks"][t]["methods"] for t in tasks):
            row(m)
    for t in tasks:
        st = d["tasks"][t].get("stores", {}).get("l10")
        if st:
            out.append(f"\n{t}: every third layer in fp16/zstd takes {st['bytes_per_token']:,.0f} bytes per token on "
                       f"disk (all 30 layers raw: 34,560); stage one ran at {st['stage_one_tokens_per_s']:.0f} tokens/s (one torch thread beside another job: a log figure, not a speed measurement).")
    ratio = d.get("llm_stage_two_peak_memory_ratio_vs_lora")
    if ratio is not None:
        out.append(f"\nStage-two peak memory on one batch, LST from the cache / LoRA: {ratio:.2f}.")
    return out + [""] + llm_memory_table(d.get("memory")) + llm_variant_table(d)


def llm_memory_table(m) -> list[str]:
    """bench/llm.py's memory job: every method's peak RSS over 3 training steps on one batch, each in a fresh
    process. The `_micro20` rows accumulate gradients over micro-batches of 20 (what the accuracy jobs run), which
    trades LoRA's and full FT's activation memory for time; the headline ratio is on the whole batch at once."""
    rows = [r for r in (m or {}).get("rows", []) if "error" not in r]
    if not rows:
        return []
    by = {r["method"]: r for r in rows}
    b = rows[0]
    out = [f"SmolLM2 stage-two memory on one batch ({m['task']}, {b['batch_examples']} examples, "
           f"{b['batch_tokens']:,} tokens; {b['steps']} AdamW steps, each method in a fresh process; peak RSS over "
           "the steps, model load excluded; `_micro20`: gradients accumulated over micro-batches of 20 examples; "
           "CPU, one torch thread, step times not comparable across rows; `python -m bench.llm --one memory`):", "",
           "| method | trainable | peak RSS (MB) | LST from the cache at the same micro-batching / this | step (s) |",
           "|---|---:|---:|---:|---:|"]
    for r in rows:
        peak = r.get("train_peak_rss_mb")
        ref = by.get("lst_cache" + ("_micro20" if r["method"].endswith("_micro20") else ""), {}).get("train_peak_rss_mb")
        out.append(f"| {r['method']} | {r['trainable_params']:,} | {_fmt(peak, ',.0f')} | "
                   f"{_fmt(ref / peak if ref and peak else None, '.2f')} | {r['step_time_s']:.1f} |")
    return out + [""]


def llm_variant_table(d) -> list[str]:
    """bench/llm.py's LST variants (QST options, layer choices, codecs, init) against plain LST, seed 0 each."""
    out = []
    for t, v in d["tasks"].items():
        ms = v["methods"]
        rows = [m for m in ["lst_cache", *d["settings"]["variants"]] if m in ms]
        if len(rows) < 2:
            continue
        size = {r["method"]: r["bytes_per_token"] for r in v.get("accuracy_vs_bytes", [])}
        for m, over in d["settings"]["variants"].items():  # the variants that read lst_cache's store
            if not {"layers", "cache"} & set(over) and "lst_cache" in size:
                size[m] = size["lst_cache"]
        out += [f"SmolLM2 LST variants on {t} (seed 0, lr {v['best_lst_lr']:g} chosen for lst_cache on validation; "
                "store bytes per token of the layers each reads):", "",
                "| variant | val | test | trainable | store bytes/token |", "|---|---:|---:|---:|---:|"]
        for m in rows:
            c = ms[m]
            out.append(f"| {m} | {c['val_accuracy'][0]:.2f} | {c['test_accuracy'][0]:.2f} | "
                       f"{_fmt(c.get('trainable_params'), ',')} | {_fmt(size.get(m), ',.0f')} |")
        out.append("")
    return out


LLM_GPU_ORDER = ["full_ft", "lora", "lst_inloop", "lst_cache", "stage_one_forward"]


def _lst_cache_gib(b: dict) -> float:
    """A plan's GiB for LST from the cache: side net with AdamW and the table, plus one batch of states."""
    return b["lst_cache_side_fp32_adam_plus_bf16_table"] + b["lst_cache_one_batch_of_states_bf16"]


def gpu_llm_plan_table(p) -> list[str]:
    """bench/gpu_llm.py --plan: what each method must hold on a GPU for Llama-architecture shapes, from shapes alone
    (weights and optimizer state; activations come on top and are what bench.gpu_llm measures on CUDA)."""
    out = [f"Decoder-only shapes on a GPU, from shapes alone (GiB of weights and optimizer state, before activations; "
           f"LST from the cache: its side net in fp32 with AdamW, one frozen vocab x hidden table in bf16 (the side "
           f"net's input embeddings; an untied head adds only its verbalizer rows), one batch of "
           f"{p['config']['batch']} x {p['config']['seq']} cached bf16 states of the kept layers; r = {p['r']}; "
           f"`{p['command']}`):", "",
           "| shape | backbone params | kept layers | side net trainable (% of backbone) | LoRA trainable (r = 32 on "
           "q, v) | full FT | LoRA, bf16 backbone | QLoRA, 4-bit backbone | LST from the cache: side net + table "
           "+ states | of which the table | stage one: bf16 backbone |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in p["plans"]:
        b = r["bytes_gib"]
        out.append(f"| {r['model']} | {r['backbone_params'] / 1e9:.2f}B | {len(r['kept_layers'])} | "
                   f"{r['side_trainable_params'] / 1e6:.1f}M ({100 * r['side_trainable_share']:.2f}%) | "
                   f"{r['lora_trainable_params'] / 1e6:.1f}M | {b['full_ft_bf16_weights_fp32_adam']:.1f} | "
                   f"{b['lora_bf16_backbone']:.1f} | {b['qlora_4bit_backbone']:.1f} | {_lst_cache_gib(b):.1f} | "
                   f"{b['embedding_table_bf16']:.1f} | {b['stage_one_bf16_backbone']:.1f} |")
    return out + [""]


def gpu_llm_table(g) -> list[str]:
    """bench/gpu_llm.py on CUDA: peak memory and step time per shape and method (random init)."""
    c = g["config"]
    out = [f"GPU memory and step time, Llama-architecture shapes ({g['device']}, torch {g['versions']['torch']}, "
           f"transformers {g['versions']['transformers']}; random init, bf16 backbone, batch {c['batch']} x "
           f"{c['seq']} tokens, r = 8 with layer dropping as in the table above; `{g['command']}`):", "",
           "| shape | method | peak memory (GiB) | step (s) | tokens/s | trainable params |",
           "|---|---|---:|---:|---:|---:|"]
    shapes = list(dict.fromkeys(r["model"] for r in g["results"]))
    rows = sorted(g["results"], key=lambda r: (shapes.index(r["model"]), LLM_GPU_ORDER.index(r["method"])
                                               if r["method"] in LLM_GPU_ORDER else 99))
    for r in rows:
        if r.get("oom"):
            out.append(f"| {r['model']} | {r['method']} | OOM | | | |")
            continue
        out.append(f"| {r['model']} | {r['method']} | {_fmt(r['peak_memory_gb'], '.2f')} | {r['step_time_s']:.3f} | "
                   f"{r['tokens_per_s']:,.0f} | {r['trainable_params']:,} |")
    return out + [""]


def gpu_llm_keys(plan, measured) -> dict:
    """summary.json's decoder-only GPU keys: GiB before activations per shape (from --plan), and the measured
    peak-memory and step-time ratios of LST from the cache (null where a method ran out of memory or did not run)."""
    out = {"llm_gpu_plan_gib": None, "llm_gpu_measured": None}
    if plan:
        out["llm_gpu_plan_gib"] = {r["model"]: {
            "lst_cache": _lst_cache_gib(r["bytes_gib"]),
            "qlora_4bit": r["bytes_gib"]["qlora_4bit_backbone"], "lora_bf16": r["bytes_gib"]["lora_bf16_backbone"],
            "full_ft": r["bytes_gib"]["full_ft_bf16_weights_fp32_adam"]} for r in plan["plans"]}
    if measured:
        res = {}
        for model in dict.fromkeys(r["model"] for r in measured["results"]):
            c, i, lo = (find(measured["results"], model=model, method=m) for m in ("lst_cache", "lst_inloop", "lora"))
            res[model] = {"lst_cache_peak_memory_ratio_vs_lora": ratio(c, lo, "peak_memory_gb"),
                          "lst_cache_peak_memory_ratio_vs_inloop": ratio(c, i, "peak_memory_gb"),
                          "lst_cache_step_time_ratio_vs_inloop": ratio(c, i, "step_time_s")}
        out["llm_gpu_measured"] = res
    return out


def tables(gpu, store, cpu, acc, sweeps, dist=None, stage_two=None, explore=None, llm=None, gpu_llm_plan=None,
           gpu_llm=None) -> str:
    out = []
    if acc and acc["tasks"]:
        out += accuracy_table(acc)
    if explore and explore.get("tasks"):
        out += explore_table(explore)
    if llm:
        out += llm_table(llm)
    if gpu:
        cmds = sorted({r.get("command", gpu["command"]) for r in gpu["results"]})
        out += [f"GPU memory and step time ({gpu['device']}, torch {gpu['versions']['torch']}, transformers "
                f"{gpu['versions']['transformers']}; random-init T5 shapes, batch {gpu['config']['batch']}, "
                f"{gpu['config']['src_len']} source + {gpu['config']['tgt_len']} target tokens; "
                + "; ".join(f"`{c}`" for c in cmds) + "):", "",
                "| model | dtype | method | peak memory (GiB) | step (s) | tokens/s | trainable params |",
                "|---|---|---|---:|---:|---:|---:|"]
        order = ["full_ft", "lora", "prompt_tuning", "ia3", "selective", "lst_inloop", "lst_cache", "stage_one_forward"]
        rows = sorted(gpu["results"], key=lambda r: (["t5-base", "t5-large", "t5-3b"].index(r["model"]), r["dtype"],
                                                     order.index(r["method"]) if r["method"] in order else 99))
        for r in rows:
            oom = r.get("oom")
            out.append(f"| {r['model']} | {r['dtype']} | {r['method']} | {'OOM' if oom else _fmt(r['peak_memory_gb'], '.2f')} | "
                       f"{'' if oom else _fmt(r['step_time_s'], '.3f')} | {'' if oom else _fmt(r['tokens_per_s'], ',.0f')} | "
                       f"{'' if oom else _fmt(r['trainable_params'], ',')} |")
        out.append("")
    if gpu_llm_plan:
        out += gpu_llm_plan_table(gpu_llm_plan)
    if gpu_llm:
        out += gpu_llm_table(gpu_llm)
    if cpu:
        b = cpu["config"]["batch"]
        out += [f"CPU memory and step time ({cpu['device']}, {cpu['cpu_count']} cores, torch {cpu['versions']['torch']}; "
                f"minilm: batch {b['minilm'][0]} x {b['minilm'][1]} tokens, t5-small: batch {b['t5-small'][0]} x "
                f"({b['t5-small'][1]} + {b['t5-small'][2]}) tokens; one process per method; `{cpu['command']}`):", "",
                "| model | method | peak RSS (MB) | above start (MB) | step (s) | tokens/s | trainable params |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for r in cpu["results"]:
            if "error" in r:
                out.append(f"| {r['model']} | {r['method']} | error: {r['error']} | | | | |")
                continue
            out.append(f"| {r['model']} | {r['method']} | {r['peak_rss_mb']:,.0f} | {r['peak_above_start_mb']:,.0f} | "
                       f"{r['step_time_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['trainable_params']:,} |")
        out.append("")
    if any(sweeps.values()):
        out += ["End-to-end sweep (real stage CLIs, real MiniLM + rt-snippets, 4 learning rates; every process timed "
                "from outside):", "",
                "| device | examples x epochs | stage one (s) | 4 x stage two from cache (s) | 4 x in-loop LST (s) | speedup | "
                "stage-two peak memory, cache / in-loop (MB) |", "|---|---|---:|---:|---:|---:|---:|"]
        for k, v in sweeps.items():
            if not v:
                continue
            c = [r for r in v["runs"] if r["feed"] == "cache"]
            i = [r for r in v["runs"] if r["feed"] == "backbone"]
            n = v["config"]["examples"] or "all"
            out.append(f"| {v['device']} | {n} x {v['config']['epochs']} | {v['stage_one_wall_s']:.0f} | "
                       f"{sum(r['wall_s'] for r in c):.0f} | {v['inloop_total_s']:.0f} | {v['sweep_speedup_vs_inloop']:.2f}x | "
                       f"{max(r['peak_memory_mb'] for r in c):,.0f} / {max(r['peak_memory_mb'] for r in i):,.0f} "
                       f"({c[0]['peak_memory_kind']}) |")
        out.append("")
    if stage_two:
        out += stage_two_table(stage_two)
    if dist:
        out += distributed_table(dist)
    if store:
        out += [f"Store size per codec (CPU, real MiniLM over {store['config']['examples']} rt-snippets, {store['tokens']} "
                f"tokens; `{store['command']}`): forward alone {store['forward_only_tokens_per_s']:.0f} tokens/s", "",
                "| codec/dtype | bytes/token/layer | x vs raw fp16 | x vs padded fp16 | rel. error | stage one tokens/s | reader batches/s |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for k, v in store["codecs"].items():
            err = f"{v['max_relative_error_vs_fp16']:.4f}" if "max_relative_error_vs_fp16" in v else "0 (ref)"
            out.append(f"| {k} | {v['bytes_per_token_per_layer']:.0f} | {v['vs_raw_fp16']:.2f} | {v['vs_padded_fp16']:.2f} | "
                       f"{err} | {v['stage_one_tokens_per_s']:.0f} | {v['reader_batches_per_s']:.1f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
