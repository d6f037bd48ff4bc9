"""The baselines the benchmarks compare against must be the methods they claim to be."""
from __future__ import annotations

import pytest
import torch

from bench.baselines import build_encoder, build_t5, loss_encoder, loss_t5
from bench.selective import (
    bert_selective_forward,
    select_positions,
    t5_selective_encoder,
)


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                num_hidden_layers=2, max_position_embeddings=128)).eval()


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=100, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                                               relative_attention_num_buckets=8, decoder_start_token_id=0,
                                               pad_token_id=0, eos_token_id=1)).eval()


def _batch(B=3, T=12):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 100, (B, T), generator=g)
    lengths = torch.tensor([T, T - 4, 5])[:B]
    mask = torch.arange(T)[None] < lengths[:, None]
    return ids.masked_fill(~mask, 0), mask


def test_selected_positions_start_with_the_first_token_and_prefer_real_tokens():
    ids, mask = _batch()
    sel, valid = select_positions(mask, 6, torch.Generator().manual_seed(0))
    assert sel.shape == (3, 7) and (sel[:, 0] == 0).all()
    for row in range(3):
        assert len(set(sel[row].tolist())) == 7  # distinct positions
        assert valid[row].sum() == min(7, int(mask[row].sum()))


def test_selective_bert_forward_equals_the_full_forward_at_selected_rows():
    bert = _bert()
    ids, mask = _batch()
    sel, valid = select_positions(mask, 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        part = bert_selective_forward(bert, ids, mask, sel)
    want = full.gather(1, sel[..., None].expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(part[valid], want[valid], atol=1e-5, rtol=1e-5)


def test_selective_with_every_position_selected_is_full_fine_tuning_bert():
    ids, mask = _batch()
    labels = torch.tensor([0, 1, 1])
    grads = {}
    for method in ("full_ft", "selective"):
        model, params = build_encoder(method, _bert(), 2)
        torch.manual_seed(5)
        model.head.reset_parameters()
        model.k = ids.shape[1]
        model.train()
        model.encoder.eval()  # dropout off in both
        loss_encoder(model, ids, mask, labels).backward()
        grads[method] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["full_ft"].keys() == grads["selective"].keys()
    for n, g in grads["full_ft"].items():
        torch.testing.assert_close(grads["selective"][n], g, atol=2e-5, rtol=1e-4, msg=n)


def test_selective_drops_gradients_of_unselected_positions():
    """With k small, the embedding rows of tokens at unselected positions get no gradient."""
    bert = _bert()
    ids, mask = _batch(B=1, T=12)
    ids = torch.arange(10, 22)[None]  # every position a different token
    sel, _ = select_positions(mask[:1], 3, torch.Generator().manual_seed(0))
    bert_selective_forward(bert, ids, mask[:1], sel).sum().backward()
    g = bert.embeddings.word_embeddings.weight.grad
    touched = {int(i) for i in (g.abs().sum(1) > 0).nonzero()[:, 0]}
    assert touched == {int(ids[0, p]) for p in sel[0]}


def test_selective_t5_encoder_equals_the_full_encoder_and_every_position_gives_full_gradients():
    ids, mask = _batch()
    labels = torch.randint(2, 100, (3, 3), generator=torch.Generator().manual_seed(2))
    model = _t5()
    sel, valid = select_positions(mask, 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        part = t5_selective_encoder(model, ids, mask, sel)
    torch.testing.assert_close(part[mask], full[mask], atol=1e-5, rtol=1e-5)
    grads = {}
    for method in ("full_ft", "selective"):
        m = _t5()
        m, _ = build_t5(method, m)
        loss_t5(method, m, ids, mask, labels, k=ids.shape[1]).backward()
        grads[method] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    for n, g in grads["full_ft"].items():
        torch.testing.assert_close(grads["selective"][n], g, atol=2e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("method,marker", [("lora", "lora_"), ("ia3", "ia3_"), ("bitfit", "bias"),
                                           ("prompt_tuning", "prompt_encoder")])
def test_peft_baselines_train_only_their_own_parameters(method, marker):
    model, params = build_encoder(method, _bert(), 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(marker in n or n.startswith("head.") for n in trainable), trainable
    assert any(marker in n for n in trainable)
    ids, mask = _batch()
    loss_encoder(model, ids, mask, torch.tensor([0, 1, 1])).backward()
    assert all(p.grad is not None for p in params)


def test_accuracy_suite_pairs_cache_and_inloop_by_seed_and_reports_mean_and_std():
    from bench.accuracy import aggregate

    def row(method, seed, acc):
        return {"method": method, "seed": seed, "lr": 1e-3, "trainable_params": 10, "test": {"accuracy": acc}}

    rows = [row("lst_cache", 0, 0.80), row("lst_cache", 1, 0.82), row("lst_cache", 2, 0.84),
            row("lst_inloop", 0, 0.79), row("lst_inloop", 2, 0.85),  # seed 1 missing: not paired
            row("full_ft", 0, 0.90), row("full_ft", 1, 0.90), row("full_ft", 2, 0.93)]
    out = aggregate("rt-sentiment", rows, {"accuracy": 0.7})
    assert out["headline_metric"] == "accuracy"
    assert out["cache_vs_inloop_delta_pt"]["per_seed"] == pytest.approx([1.0, -1.0])
    assert out["methods"]["lst_cache"]["mean"] == pytest.approx(82.0)
    assert out["methods"]["lst_cache"]["std"] == pytest.approx(2.0)
    assert out["lst_vs_full_ft_delta_pt"] == pytest.approx(82.0 - 91.0)
    assert out["methods"]["frozen"]["mean"] == pytest.approx(70.0)


def test_gpu_llm_plan_counts_match_the_built_models_on_the_meta_device():
    """The GPU suite's CPU-safe part: for Llama shapes its plan's LoRA count equals PEFT's own, the backbone count
    equals SmolLM2-135M's published 134.5M, and layer dropping keeps every eighth of 70B's 80 layers, the last one."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from bench import gpu_llm

    p = gpu_llm.plan("smollm2-135m", 8, 32)
    assert p["backbone_params"] == 134_515_008
    with torch.device("meta"):
        peft = get_peft_model(LlamaForCausalLM(gpu_llm.llama_config("llama-1b")),
                              LoraConfig(r=32, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    lora = sum(t.numel() for n, t in peft.named_parameters() if "lora_" in n)
    assert gpu_llm.plan("llama-1b", 8, 32)["lora_trainable_params"] == lora
    assert gpu_llm.kept_layers("llama-70b") == list(range(7, 80, 8))
    big = gpu_llm.plan("llama-70b", 8, 256)["bytes_gib"]
    assert big["lst_cache_side_fp32_adam_plus_bf16_table"] < big["qlora_4bit_backbone"] / 5  # fits a small GPU


def test_llm_driver_plans_cheap_jobs_first_and_collects_the_summary_keys(tmp_path):
    """bench/llm.py: stage one and the baselines that need no training come first; seeds 1-2 and the variants appear
    once seed 0's lr grid has picked an lr on validation; collect() writes llm_accuracy per task (the six methods,
    mean over seeds) and the stage-two memory ratio, from the result records alone."""
    import json

    from bench import llm

    res = tmp_path / "llm_jobs"

    def names():
        return [j.name for j in llm.plan(res)]

    first = names()
    assert first[:3] == [f"{t}/stage1_l10" for t in llm.TASKS]
    assert first.index("memory") < first.index("rt-sentiment/lora_s0") < first.index("rt-sentiment/lora_s1")
    assert not [n for n in first if "lst_cache_s1" in n or "inloop" in n]  # no lr chosen yet

    def put(name, acc, **kw):
        p = res / f"{name}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"job": name, "val": {"accuracy": acc}, "test": {"accuracy": acc}, **kw}))

    t = "pang-lee"
    for lr, acc in zip(llm.LST_LRS, (0.7, 0.9, 0.8)):
        put(f"{t}/lst_cache_s0_lr{lr:g}", acc, lr=lr, seed=0)
    assert llm.best_lr(res, t) == llm.LST_LRS[1]
    now = {j.name: j for j in llm.plan(res)}
    assert now[f"{t}/lst_cache_s1"].kw["lr"] == llm.LST_LRS[1] and f"{t}/lst_inloop_s0" in now
    put(f"{t}/lst_cache_s1", 0.8, seed=1)
    put(f"{t}/lst_cache_s2", 0.7, seed=2)
    for m, acc in (("lst_inloop", 0.85), ("lora", 0.95), ("full_ft", 0.96)):
        put(f"{t}/{m}_s0", acc, seed=0)
    put(f"{t}/zero_shot", 0.6, by_format={})
    put(f"{t}/frozen", 0.75)
    (res / "memory.json").write_text(json.dumps({"job": "memory", "lst_cache_train_peak_ratio_vs_lora": 0.2}))
    out = llm.collect(res)
    assert out["llm_accuracy"][t] == pytest.approx({"lst_cache": 80.0, "lst_inloop": 85.0, "zero_shot": 60.0,
                                                    "frozen": 75.0, "lora": 95.0, "full_ft": 96.0})
    assert out["llm_stage_two_peak_memory_ratio_vs_lora"] == 0.2


def test_llm_driver_leaves_out_skipped_jobs_and_runs_the_next_ready_one(tmp_path, monkeypatch):
    """--skip: jobs matching a pattern are never started (LoRA/full FT take hours on CPU); the driver goes on with
    the first job in plan order whose prerequisites are done, and stops when nothing else is ready."""
    import json
    import subprocess
    from pathlib import Path
    from types import SimpleNamespace

    from bench import llm

    started = []
    res = tmp_path / "llm_jobs"

    def fake_run(cmd, **kw):
        name = cmd[cmd.index("--one") + 1]
        started.append(name)
        p = Path(cmd[cmd.index("--results") + 1]) / f"{name}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"job": name}))
        return SimpleNamespace(returncode=0, stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    llm.drive(tmp_path, "data/raw", False, skip=("*",), results=res)
    assert started == []
    # without stage one, only the Fisher inits have their inputs (they read the raw data); the fake writes a record
    # but no init file, and the driver does not run a job twice in one call to make up for it
    llm.drive(tmp_path, "data/raw", False, skip=("*/stage1_*", "*/lst_*"), results=res)
    assert started == [f"{t}/fisher_l10" for t in llm.TASKS]


def test_llm_suite_resumes_on_a_fresh_machine_from_the_committed_records_rebuilding_only_needed_caches(
        tmp_path, monkeypatch):
    """The result records live in the repository, the caches and inits in a work folder that a new machine lacks: a
    job with a record is not run again; a cache with a record but no files here is rebuilt only if a job still to
    run reads it, and before that job; a cache that only finished jobs read is left alone (status: done)."""
    import json
    import subprocess
    from types import SimpleNamespace

    from bench import llm

    monkeypatch.setattr(llm, "TASKS", {"rt-sentiment": 10})
    res, work = tmp_path / "llm_jobs", tmp_path / "fresh_work"
    t = "rt-sentiment"
    done = [j.name for j in llm.plan(res) if j.name != f"{t}/lora_s0"]
    for lr in llm.LST_LRS:
        done.append(f"{t}/lst_cache_s0_lr{lr:g}")
    for name in done:
        p = res / f"{name}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"job": name, "lr": 1e-3, "val": {"accuracy": 0.8}, "test": {"accuracy": 0.8}}))
    # the seeds, variants and the int8 cache appear once the lr is known: all done but LoRA at seed 0
    for j in llm.plan(res):
        p = res / f"{j.name}.json"
        if j.name != f"{t}/lora_s0" and not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps({"job": j.name, "val": {"accuracy": 0.8}, "test": {"accuracy": 0.8}}))
    st = dict(llm.status(work, res))
    assert st[f"{t}/lora_s0"] == "pending" and st[f"{t}/stage1_l10"] == "rebuild"  # lora_s0 reads the l10 cache
    assert st[f"{t}/stage1_l10_int8"] == "done" and st[f"{t}/fisher_l10"] == "done"  # no pending job reads them

    def stores(complete):
        from pipeline.ladder_store import write_record

        for s in ("train", "validation", "test"):
            (work / t / "cache_l10" / f"{s}.zarr").mkdir(parents=True, exist_ok=True)
            write_record(work / t / "cache_l10" / f"{s}.zarr", {}, {}, {}, complete=complete)

    stores(complete=False)  # a rebuild killed part way: the folder exists, the stores are not whole
    assert dict(llm.status(work, res))[f"{t}/stage1_l10"] == "rebuild"
    started = []

    def fake_run(cmd, **kw):
        name = cmd[cmd.index("--one") + 1]
        started.append(name)
        if name.endswith("stage1_l10"):
            stores(complete=True)
        (res / f"{name}.json").write_text(json.dumps({"job": name}))
        return SimpleNamespace(returncode=0, stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    llm.drive(work, "data/raw", False, results=res)
    assert started == [f"{t}/stage1_l10", f"{t}/lora_s0"]


def test_every_accuracy_and_explore_method_is_a_valid_train_config_differing_from_lst_only_where_it_says():
    """bench.accuracy / bench.explore: each LST method's TrainConfig validates, and differs from the paper's LST
    (lst_cache) in exactly the fields its entry names, so an ablation row measures what its name says."""
    import dataclasses

    from bench import accuracy as A
    from bench.explore import EXPLORE

    def cfg(m):
        c = A.lst_config(m)
        paths = {"zstd": "/c/zstd", "int8": "/c/int8", "bitround": "/c/bitround",
                 f"fisher_{c['variant']}_r{c['r']}": "/c/init"}
        job = dict(method=m, task="rt-sentiment", paths=paths, out="/o", backbone="b", epochs=10, lr=1e-3, seed=0,
                   device="cpu", max_length=64, data_dir="data/raw")
        return A.lst_train_config(job)

    base, _ = cfg("lst_cache")
    for m, over in {**A.LST_VARIANTS, **EXPLORE}.items():
        c, codec = cfg(m)
        assert codec == over.get("codec", "zstd")
        differ = {f.name for f in dataclasses.fields(c) if getattr(c, f.name) != getattr(base, f.name)}
        expect = set(over) - {"codec"}
        if codec != "zstd":
            expect.add("cache")
        if "init" in over:
            expect.add("side_init")  # only the Fisher init reads an init file
        assert differ == expect, m


def test_explore_row_is_the_mean_over_seeds_each_at_its_best_val_lr_and_collect_trains_nothing(tmp_path):
    """bench.explore --collect: per seed the lr with the best validation score is taken (not the best test), the row
    is the mean and sample std over the seeds that finished, and a seed without results is left out untrained."""
    import argparse
    import json

    from bench.explore import method_row

    a = argparse.Namespace(task="rt-sentiment", seeds=[0, 1, 2], lrs=[1e-3, 3e-3], collect=True, one_pass=True,
                           work=str(tmp_path), jobs_dir=str(tmp_path / "jobs"), backbone="b", epochs=0,
                           device="cpu", data_dir="d", jobs=1)
    # (seed, lr) -> (val, test): seed 0 picks lr 3e-3 by val although 1e-3 has the better test; seed 2 never ran
    runs = {(0, 1e-3): (0.80, 0.90), (0, 3e-3): (0.85, 0.82), (1, 1e-3): (0.84, 0.86)}
    for (seed, lr), (val, test) in runs.items():
        p = tmp_path / "jobs" / "rt-sentiment" / f"lst_ladder_dropout_s{seed}_lr{lr:g}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"lr": lr, "val": {"accuracy": val}, "test": {"accuracy": test},
                                 "trainable_params": 1000, "train_tokens_per_s": 5.0, "best_epoch": 3}))
    row = method_row(a, "lst_ladder_dropout", paths={})
    assert row["seeds"] == [0, 1]
    assert row["by_seed"]["0"]["lr"] == 3e-3
    assert row["test"] == pytest.approx((82 + 86) / 2)
    assert row["test_std"] == pytest.approx(2 * 2 ** 0.5)  # sample std of 82 and 86
    assert row["val"] == pytest.approx((85 + 84) / 2)
    assert not (tmp_path / "runs").exists()
    assert method_row(a, "lst_r16", paths={}) is None


def test_explore_collect_command_builds_no_store_and_keeps_other_tasks(tmp_path, monkeypatch):
    """python -m bench.explore --collect: the table is written from the result files alone; no stage one, no
    Fisher init and no run folder is made under --work (it once built every codec's cache first, 10 GB with
    dropout passes), and the rows of the other tasks already in --out stay."""
    import json
    import sys

    from bench import accuracy as A
    from bench import explore

    def no_prepare(*_):
        raise AssertionError("--collect must not build caches or inits")

    monkeypatch.setattr(A, "prepare", no_prepare)
    jobs = tmp_path / "jobs" / "pang-lee"
    jobs.mkdir(parents=True)
    (jobs / "lst_cache_s0_lr0.003.json").write_text(json.dumps(
        {"lr": 3e-3, "val": {"accuracy": 0.8}, "test": {"accuracy": 0.75}, "trainable_params": 10,
         "train_tokens_per_s": 1.0}))
    out = tmp_path / "explore.json"
    out.write_text(json.dumps({"tasks": {"hedge-conll2010": {"rows": ["kept"]}}}))
    work = tmp_path / "work"
    monkeypatch.setattr(sys, "argv", ["explore", "--task", "pang-lee", "--device", "cpu", "--collect", "--work",
                                      str(work), "--jobs-dir", str(tmp_path / "jobs"), "--out", str(out),
                                      "--methods", "lst_cache,lst_r16", "--seeds", "0,1", "--lrs", "0.003"])
    explore.main()
    res = json.loads(out.read_text())["tasks"]
    assert [r["method"] for r in res["pang-lee"]["rows"]] == ["lst_cache"]  # lst_r16 has no result: no row
    assert res["pang-lee"]["rows"][0]["test"] == pytest.approx(75.0)
    assert res["hedge-conll2010"] == {"rows": ["kept"]}
    assert not work.exists()


def test_explore_table_pairs_each_variant_with_lst_cache_or_its_cpu_rerun_on_the_seeds_both_have():
    """bench.summary: the paired column subtracts lst_cache's test score seed by seed, only over common seeds; where
    the task has an lst_cache_cpu row (LST re-run where the variants ran), it is the base instead."""
    from bench.summary import explore_table

    def row(method, by_seed):
        tests = [v for v in by_seed.values()]
        return {"method": method, "best_lr": 1e-3, "seeds": [int(k) for k in by_seed], "val": 80.0, "val_std": 0.0,
                "test": sum(tests) / len(tests), "test_std": 0.0, "trainable_params": 10,
                "trainable_pct_of_backbone": 1.0, "peak_memory_mb": None, "train_tokens_per_s": None,
                "by_seed": {k: {"lr": 1e-3, "val": 80.0, "test": v} for k, v in by_seed.items()}}

    d = {"tasks": {"rt-sentiment": {"headline_metric": "accuracy", "lrs": [1e-3], "run": {"device": "cpu", "command": "c"},
                                    "rows": [row("lst_cache", {"0": 82.0, "1": 83.0, "2": 84.0}),
                                             row("lst_ladder_dropout", {"0": 83.0, "2": 83.0})]}}}
    lines = [x for x in explore_table(d) if x.startswith("| lst_")]
    assert "| +0.00 (+1.0, -1.0) |" in lines[1]  # seed 1 has no pair: left out, not compared with 83.0
    assert "2 seeds" in lines[1] and "3 seeds" in lines[0]

    # a task whose lst_cache ran elsewhere pairs its variants with lst_cache_cpu, and says so in the header
    d["tasks"]["rt-sentiment"]["rows"].append(row("lst_cache_cpu", {"0": 82.0, "1": 82.0, "2": 82.5}))
    table = explore_table(d)
    lines = [x for x in table if x.startswith("| lst_")]
    assert "| +0.83 (+0.0, +1.0, +1.5) |" in lines[0]  # lst_cache itself against the re-run
    assert "| +0.75 (+1.0, +0.5) |" in lines[1]
    assert any("test − lst_cache_cpu, paired by seed" in x for x in table)


def test_llm_plan_limited_to_some_tasks_leaves_out_the_other_tasks_variants(tmp_path, monkeypatch):
    """LLM_BENCH_TASKS=hedge-conll2010: a variant tied to another task (lst_chat runs on rt-sentiment only) is not
    planned, even when that task's lr is known from an earlier run in the same work folder."""
    import json

    from bench import llm

    monkeypatch.setattr(llm, "TASKS", {"hedge-conll2010": 20})
    for t in ("rt-sentiment", "hedge-conll2010"):
        for lr in llm.LST_LRS:
            p = tmp_path / "jobs" / t / f"lst_cache_s0_lr{lr:g}.json"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps({"lr": lr, "val": {"accuracy": 0.8}, "test": {"accuracy": 0.8}}))
    names = [j.name for j in llm.plan(tmp_path / "jobs")]
    assert not [n for n in names if n.startswith("rt-sentiment/")]
    assert "hedge-conll2010/lst_l30_s0" in names and "hedge-conll2010/lst_cache_s1" in names


def test_llm_memory_table_compares_each_row_with_lst_at_the_same_micro_batching():
    """LoRA accumulating micro-batches of 20 holds a fifth of the activations; against whole-batch LST it would look
    3.4x closer than it is. The _micro20 rows divide by LST's _micro20 row, the others by whole-batch LST."""
    from bench.summary import llm_memory_table

    def row(method, peak):
        return {"method": method, "batch_examples": 100, "batch_tokens": 3000, "steps": 3, "trainable_params": 1,
                "train_peak_rss_mb": peak, "step_time_s": 1.0}
    m = {"task": "t", "rows": [row("lst_cache", 2000), row("lora", 10000), row("lora_micro20", 4000),
                               row("lst_cache_micro20", 1000), {"method": "full_ft", "error": "killed"}]}
    ratio = {line.split("|")[1].strip(): line.split("|")[4].strip() for line in llm_memory_table(m)
             if line.startswith("| l")}
    assert ratio == {"lst_cache": "1.00", "lora": "0.20", "lora_micro20": "0.25", "lst_cache_micro20": "1.00"}


def test_accuracy_collect_breaks_val_ties_in_grid_order_keeps_the_device_note_and_lists_what_is_left(tmp_path,
                                                                                                      monkeypatch):
    """bench.accuracy --collect: job files are read in name order (lr1e-4 before lr2e-05), yet a tie on validation
    goes to the grid's first lr, as in the run that made them (bbc-topics' full_ft ties at 100% on validation);
    a `run.device` note set earlier survives the collect; `pending` names each missing (method, seeds) cell."""
    import argparse
    import json
    import sys

    from bench import accuracy as A

    t, jobs = "pang-lee", tmp_path / "jobs"
    (jobs / t).mkdir(parents=True)

    def put(method, seed, lr, val, test):
        (jobs / t / f"{method}_s{seed}_lr{lr:g}.json").write_text(json.dumps(
            {"task": t, "method": method, "seed": seed, "lr": lr, "val": {"accuracy": val},
             "test": {"accuracy": test}, "trainable_params": 10}))

    for m, grid in A.LR_GRID.items():
        for lr in grid:
            put(m, 0, lr, 0.9, 0.5 + grid.index(lr) / 10)  # every lr ties on validation
        for s in (1, 2):
            put(m, s, grid[0], 0.9, 0.5)
    put("lst_random", 0, A.LR_GRID["lst_cache"][0], 0.9, 0.6)
    out = tmp_path / "accuracy.json"
    out.write_text(json.dumps({"tasks": {t: {"run": {"command": "c", "device": "GPU and CPU, as noted"}}}}))
    a = argparse.Namespace(tasks=t, jobs_dir=str(jobs), work=str(tmp_path / "work"), out=str(out), collect="where",
                           seeds="0,1,2")
    monkeypatch.setattr(sys, "argv", ["bench.accuracy"])
    A.collect(a)
    got = json.loads(out.read_text())["tasks"][t]
    for m, grid in A.LR_GRID.items():
        assert got["methods"][m]["lr"] == grid[0] and got["methods"][m]["test"] == [50.0, 50.0, 50.0]
    assert got["run"]["device"] == "GPU and CPU, as noted" and got["run"]["command"] == "where"
    lr = f"{A.LR_GRID['lst_cache'][0]:g}"
    assert f"lst_random (seeds 1, 2 at lr {lr})" in got["pending"]
    assert f"lst_int8 (seeds 0, 1, 2 at lr {lr})" in got["pending"]
    assert "full_ft" not in got["pending"] and "lst_cache" not in got["pending"].split(". ")[0]


def test_llm_collect_from_a_folder_without_records_is_an_error_and_leaves_the_summary_alone(tmp_path, monkeypatch,
                                                                                           capsys):
    """A mistyped --results would otherwise overwrite bench/results/llm.json with an empty summary."""
    import sys

    from bench import llm

    out = tmp_path / "llm.json"
    out.write_text("{}")
    monkeypatch.setattr(sys, "argv", ["bench.llm", "--collect", "--results", str(tmp_path / "nope"), "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        llm.main()
    assert e.value.code == 2 and out.read_text() == "{}"
    assert "error: --results" in capsys.readouterr().err


def test_gpu_llm_summary_shows_oom_rows_and_ratios_only_where_both_methods_ran():
    """bench.summary on a bench.gpu_llm result: an out-of-memory row prints OOM and makes its ratio null (not 0 or
    a division by None); the plan's LST figure is side net + table + one batch of states."""
    from bench.summary import gpu_llm_keys, gpu_llm_table

    g = {"device": "H100", "command": "python -m bench.gpu_llm", "config": {"batch": 8, "seq": 256},
         "versions": {"torch": "t", "transformers": "x"},
         "results": [{"model": "llama-8b", "method": "lst_cache", "peak_memory_gb": 3.0, "step_time_s": 0.1,
                      "tokens_per_s": 20480.0, "trainable_params": 5},
                     {"model": "llama-8b", "method": "lora", "peak_memory_gb": 24.0, "step_time_s": 0.4,
                      "tokens_per_s": 5120.0, "trainable_params": 7},
                     {"model": "llama-8b", "method": "lst_inloop", "peak_memory_gb": 20.0, "step_time_s": 0.5,
                      "tokens_per_s": 4096.0, "trainable_params": 5},
                     {"model": "llama-70b", "method": "lst_cache", "peak_memory_gb": 9.0, "step_time_s": 0.3,
                      "tokens_per_s": 6826.0, "trainable_params": 9},
                     {"model": "llama-70b", "method": "lora", "oom": True, "peak_memory_gb": None}]}
    lines = gpu_llm_table(g)
    assert "| llama-70b | lora | OOM | | | |" in lines
    assert lines.index("| llama-8b | lora | 24.00 | 0.400 | 5,120 | 7 |") < lines.index(
        "| llama-8b | lst_inloop | 20.00 | 0.500 | 4,096 | 5 |")  # the suite's method order, not the file's
    plan = {"plans": [{"model": "llama-70b", "bytes_gib": {
        "lst_cache_side_fp32_adam_plus_bf16_table": 5.0, "lst_cache_one_batch_of_states_bf16": 0.5,
        "qlora_4bit_backbone": 33.0, "lora_bf16_backbone": 132.0, "full_ft_bf16_weights_fp32_adam": 920.0}}]}
    k = gpu_llm_keys(plan, g)
    assert k["llm_gpu_measured"]["llama-8b"] == {"lst_cache_peak_memory_ratio_vs_lora": 0.125,
                                                 "lst_cache_peak_memory_ratio_vs_inloop": 0.15,
                                                 "lst_cache_step_time_ratio_vs_inloop": pytest.approx(0.2)}
    assert k["llm_gpu_measured"]["llama-70b"]["lst_cache_peak_memory_ratio_vs_lora"] is None
    assert k["llm_gpu_plan_gib"]["llama-70b"]["lst_cache"] == 5.5
    assert gpu_llm_keys(None, None) == {"llm_gpu_plan_gib": None, "llm_gpu_measured": None}


def test_inloop_feed_bench_times_both_feeds_on_a_real_store_and_counts_its_padding(tiny_bert, toy_task, tmp_path,
                                                                                   monkeypatch):
    """bench.inloop_feed end to end on a small store: both feeds timed, the padded token count at least the real
    one, and train_side.FEED_CHUNK left as it was."""
    import json
    import sys

    from bench import inloop_feed
    from pipeline import cache_activations, train_side
    from pipeline.config import CacheConfig

    cache_activations.run(CacheConfig(backbone=tiny_bert, task=toy_task, out=str(tmp_path / "c"), dtype="fp32",
                                      splits=["train"], device="cpu"), log=lambda *a: None)
    before, threads = train_side.FEED_CHUNK, torch.get_num_threads()
    # --threads as this process has them: main() sets torch's thread count for the whole process, and a later
    # in-process run compared with a subprocess (test_stage_two's kill -9 resumes) must use the same count
    monkeypatch.setattr(sys, "argv", ["inloop_feed", "--cache", str(tmp_path / "c"), "--backbone", tiny_bert,
                                      "--task", toy_task, "--batch", "12", "--batches", "2", "--threads",
                                      str(threads), "--out", str(tmp_path / "feed.json")])
    inloop_feed.main()
    assert torch.get_num_threads() == threads
    r = json.loads((tmp_path / "feed.json").read_text())
    assert set(r["median_s_per_batch"]) == {"one_padded_forward", f"chunks_of_{before}"}
    assert r["chunked_speedup"] > 0 and r["padded_tokens_per_batch"] >= r["real_tokens_per_batch"] > 0
    assert train_side.FEED_CHUNK == before


def test_job_records_name_their_commit_and_mark_changed_code_but_not_new_results(tmp_path):
    import json
    import subprocess

    from bench import accuracy as A
    from bench.machine import git_commit

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "bench" / "results" / "table.json").write_text("{}")
    git("add", "-A")
    git("commit", "-q", "-m", "c")
    head = git("rev-parse", "HEAD")
    assert git_commit(tmp_path) == head
    (tmp_path / "bench" / "results" / "table.json").write_text('{"new": 1}')  # a result landing is not a code change
    assert git_commit(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == head + "+changes"

    job = {"task": "rt-sentiment", "method": "lst_cache", "seed": 1, "lr": 1e-3, "epochs": 10, "device": "cpu",
           "result": str(tmp_path / "jobs" / "rt-sentiment" / "lst_cache_s1_lr0.001.json")}
    A.save_result(job, {"val": {"accuracy": 0.8}, "test": {"accuracy": 0.79}}, wall_s=1.0)
    rec = json.loads(open(job["result"]).read())
    assert rec["commit"].split("+")[0] == git_commit().split("+")[0] != head
    assert rec["versions"]["torch"] == torch.__version__ and rec["torch_threads"] == torch.get_num_threads()
    assert not list((tmp_path / "jobs" / "rt-sentiment").glob("*.tmp"))
