"""The side network: cache/live equivalence, gates, pruning, Fisher, parameter counts, variants, errors."""
from __future__ import annotations

import pytest
import torch

from pipeline import backbone as bbm
from pipeline import cache_activations, prune
from pipeline.batches import reader
from pipeline.config import CacheConfig, PruneConfig
from pipeline.errors import BackboneError, ConfigError
from pipeline.ladder_store import LadderStore
from pipeline.layout import SRC
from pipeline.prune_init import fisher_batches
from pipeline.side import SideNetwork, build_side
from pipeline.side_spec import spec_from_config
from pipeline.tasks import get_task

FAMILIES = ["bert", "t5", "llama"]


def backbone_for(family, tiny_bert, tiny_t5, tiny_llama):
    return {"bert": tiny_bert, "t5": tiny_t5, "llama": tiny_llama}[family]


def side_for(backbone, task, variant="ladder", init="magnitude", layers=None, r=4, store=None):
    cfg = bbm.load_config(backbone)
    t = get_task(task)
    verb = [int(c[0]) for c in store.cand] if store is not None and bbm.family_of_config(cfg) == "decoder" else []
    spec = spec_from_config(cfg, r, layers, variant, t.kind, t.num_labels, verb, dropout=0.0)
    frozen = bbm.load_frozen_tensors(backbone, spec.family, spec.mixes_final)
    weights = bbm.state_dict_from_files(backbone) if init != "random" else None
    return build_side(spec, frozen, init, 0, weights)


@pytest.mark.parametrize("chunk", [32, 5])  # 5: the live backbone runs the batch of 16 in 4 length-sorted chunks
@pytest.mark.parametrize("family", FAMILIES)
def test_cache_and_live_backbone_give_identical_loss_and_gradients(family, chunk, tiny_bert, tiny_t5, tiny_llama,
                                                                   toy_task, tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.train_side.FEED_CHUNK", chunk)
    backbone = backbone_for(family, tiny_bert, tiny_t5, tiny_llama)
    cfg = CacheConfig(backbone=backbone, task=toy_task, out=str(tmp_path), dtype="fp32", splits=["train"], device="cpu")
    store = LadderStore(cache_activations.run(cfg, log=lambda *a: None)[0])
    net = side_for(backbone, toy_task, store=store)
    from pipeline.config import TrainConfig
    from pipeline.train_side import BackboneFeed

    feed = BackboneFeed(TrainConfig(backbone=backbone, task=toy_task, device="cpu"), store)
    names = sorted({n for st in net.spec.stacks for n in net.spec.state_names(st)})
    for batch in list(reader(store).batches(names, 16, shuffle=True, seed=1))[:2]:
        grads = []
        for b in (batch, feed(batch, names)):
            net.zero_grad()
            loss = net(b).loss
            loss.backward()
            grads.append((loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}))
        (l1, g1), (l2, g2) = grads
        assert torch.allclose(l1, l2, atol=1e-6, rtol=0)
        assert g1.keys() == g2.keys() and len(g1) > 10
        for n in g1:
            assert torch.allclose(g1[n], g2[n], atol=1e-6, rtol=1e-5), n


@pytest.mark.parametrize("family", FAMILIES)
def test_gates_start_at_one_half_and_only_side_parameters_train(family, tiny_bert, tiny_t5, tiny_llama, toy_task):
    backbone = backbone_for(family, tiny_bert, tiny_t5, tiny_llama)
    net = side_for(backbone, toy_task)
    for stack in (net.src, net.tgt):
        if stack is not None:
            assert torch.equal(stack.gates(), torch.full_like(stack.alpha, 0.5))
    # frozen tensors are buffers: never trained, never saved with the side network
    assert all(not n.startswith(("embed", "lm_head")) for n, _ in net.named_parameters())
    buffers = set(dict(net.named_buffers()))
    assert set(net.required_frozen()) <= buffers <= {"embed", "lm_head", "final_norm_src", "final_norm_tgt"}
    assert set(net.state_dict()) == {n for n, _ in net.named_parameters()}


def test_trainable_count_equals_closed_form_for_bert(tiny_bert, toy_task):
    net = side_for(tiny_bert, toy_task, r=4)
    s = net.spec
    d, ds, ff, L = s.d_model, s.side_d, s.side_ff, len(s.layers)
    attn = 4 * (ds * s.n_heads * s.side_kv) + 3 * s.n_heads * s.side_kv + ds
    block = attn + 2 * ds + (ds * ff + ff) + (ff * ds + ds) + 2 * ds
    ladders = (L + 1) * (d * ds + ds)
    expected = L * block + ladders + L + (ds * d + d) + (d * s.num_labels + s.num_labels)
    assert net.trainable_parameters() == expected


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_pruned_weights_are_exact_slices_of_the_backbone(family, tiny_bert, tiny_t5, toy_task):
    backbone = tiny_bert if family == "bert" else tiny_t5
    cfg = bbm.load_config(backbone)
    spec = spec_from_config(cfg, 2, [0, 2], "ladder", "classification", 2, [0, 1])
    W = prune.normalize_keys(bbm.state_dict_from_files(backbone))
    net = build_side(spec, bbm.load_frozen_tensors(backbone, spec.family), "magnitude", 0, W)
    idx = prune.select_indices(spec, W)
    R = idx["R"]
    for j, k in enumerate(spec.layers):
        m = prune.layer_map(spec, SRC, k)
        H, F = idx[(SRC, k, "attn", "q")], idx[(SRC, k, "F")]
        blk = net.src.blocks[j]
        assert torch.equal(blk.attn.q.weight, W[m["attn.q.weight"]][H][:, R])
        assert torch.equal(blk.attn.o.weight, W[m["attn.o.weight"]][R][:, H])
        wi = "ff.wi.weight"
        assert torch.equal(blk.ff.wi.weight, W[m[wi]][F][:, R])
        assert torch.equal(blk.ff.wo.weight, W[m["ff.wo.weight"]][R][:, F])
        assert torch.equal(blk.norm_ff.weight, W[m["norm_ff.weight"]][R])
        # each head keeps d_kv / r of its own rows
        hs = spec.d_kv
        assert [int((H // hs == h).sum()) for h in range(spec.n_heads)] == [spec.side_kv] * spec.n_heads
    assert len(R) == spec.side_d and len(set(R.tolist())) == spec.side_d
    if family == "t5":
        assert torch.equal(net.rel_src.weight, W["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"])


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_fisher_equals_brute_force_per_example_gradients(family, tiny_bert, tiny_t5, toy_task):
    backbone = tiny_bert if family == "bert" else tiny_t5
    bb = bbm.load_backbone(backbone, "cpu", for_grad=True)
    task = get_task(toy_task)
    exs = task.load("unused", 0)["train"][:6]
    batches = fisher_batches(bb, task, exs, PruneConfig(backbone=backbone, task=toy_task, batch_size=3))
    imp, n = prune.fisher_importance(bb, batches, task.kind)
    assert n == 6
    probe = prune.fit_probe(bb, batches, task.kind) if bb.family == "encoder" else None
    name = next(k for k in imp if k.endswith("weight") and ("wi" in k or "intermediate" in k))
    module = bb.model.get_submodule(name.rsplit(".", 1)[0])
    module.weight.requires_grad_(True)
    brute = torch.zeros_like(module.weight)
    for b in batches:
        for i in range(b["ids"].shape[0]):
            one = {k: v[i:i + 1] for k, v in b.items()}
            one["ids"], one["mask"] = one["ids"][:, : int(one["mask"].sum())], one["mask"][:, : int(one["mask"].sum())]
            module.weight.grad = None
            prune.example_log_likelihood(bb, one, probe).sum().backward()
            brute += module.weight.grad.pow(2)
    assert torch.allclose(imp[name], brute / 6, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("variant", ["fuse_after", "no_ladder", "late_fusion", "adapter", "cross_attention"])
@pytest.mark.parametrize("family", FAMILIES)
def test_ablation_variants_train_a_step(variant, family, tiny_bert, tiny_t5, tiny_llama, toy_task, tmp_path):
    backbone = backbone_for(family, tiny_bert, tiny_t5, tiny_llama)
    cfg = CacheConfig(backbone=backbone, task=toy_task, out=str(tmp_path), splits=["train"], device="cpu")
    store = LadderStore(cache_activations.run(cfg, log=lambda *a: None)[0])
    net = side_for(backbone, toy_task, variant=variant, store=store)
    names = sorted({n for st in net.spec.stacks for n in net.spec.state_names(st)})
    batch = next(reader(store).batches(names, 8, shuffle=False))
    loss = net(batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    if variant == "no_ladder":
        assert not hasattr(net.src, "downs")


def test_clear_errors_for_bad_sizes_layers_and_families(tiny_bert):
    cfg = bbm.load_config(tiny_bert)
    with pytest.raises(ConfigError, match="does not divide the backbone's d_model"):
        spec_from_config(cfg, 3, None, "ladder", "classification", 2)
    with pytest.raises(ConfigError, match=r"\[5\] out of range"):
        spec_from_config(cfg, 2, [0, 5], "ladder", "classification", 2)
    from transformers import GPT2Config

    with pytest.raises(BackboneError, match="supported: t5"):
        spec_from_config(GPT2Config(), 8, None, "ladder", "classification", 2)


PAPER = {  # name: (config kwargs, kept layers, paper's "update param. per task" %)
    "t5-base": (dict(d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12), [1, 2, 3, 5, 6, 7, 9, 10, 11], 1.74),
    "t5-large": (dict(d_model=1024, d_ff=4096, d_kv=64, num_heads=16, num_layers=24), list(range(1, 24, 2)), 1.23),
    "t5-3b": (dict(d_model=1024, d_ff=16384, d_kv=128, num_heads=32, num_layers=24), [23], 0.08),
}


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_t5_shapes_build_on_meta_with_closed_form_parameter_counts(name):
    """Exact counts at the paper's T5 settings (r = 8, its kept layers), which are also the paper's "update
    param. per task" (1.74 / 1.23 / 0.08 % of the backbone, Tables 1-2; 0.0875 % for T5-3B, printed 0.08)."""
    from transformers import T5Config, T5ForConditionalGeneration

    from tests.test_ladder_order import _t5_count

    kw, layers, paper_pct = PAPER[name]
    cfg = T5Config(vocab_size=32128, **kw)
    spec = spec_from_config(cfg, 8, layers, "ladder", "classification", 2, [0, 1])
    with torch.device("meta"):
        net = SideNetwork(spec, {"embed": torch.empty(32128, kw["d_model"])})
        backbone = sum(p.numel() for p in T5ForConditionalGeneration(cfg).parameters())
    assert abs(100 * net.trainable_parameters() / backbone - paper_pct) < 0.01
    n = len(layers)
    d = kw["d_model"]
    assert net.trainable_parameters() == _t5_count(d, d // 8, kw["num_heads"], kw["d_kv"] // 8, kw["d_ff"] // 8, n, n,
                                                   cfg.relative_attention_num_buckets)


@pytest.mark.parametrize("kind,kw", [
    ("bert", dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)),
    ("bert", dict(hidden_size=384, intermediate_size=1536, num_attention_heads=12, num_hidden_layers=6)),
    ("llama", dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                   num_hidden_layers=22)),
])
def test_encoder_and_decoder_shapes_build_on_meta(kind, kw):
    from transformers import BertConfig, LlamaConfig

    cfg = BertConfig(**kw) if kind == "bert" else LlamaConfig(vocab_size=32000, **kw)
    spec = spec_from_config(cfg, 8, None, "ladder", "classification", 2, [5, 6])
    with torch.device("meta"):
        frozen = {} if kind == "bert" else {"embed": torch.empty(32000, kw["hidden_size"])}
        net = SideNetwork(spec, frozen)
        ids = torch.zeros(2, 5, dtype=torch.long)
        states = {n: torch.empty(2, 5, kw["hidden_size"]) for n in spec.state_names(SRC)}
        from pipeline.batches import LadderBatch

        batch = LadderBatch(ids, torch.ones(2, 5, dtype=torch.bool), states, torch.zeros(2))
        if kind == "llama":  # decoder-only: rank classification over both (one-token) candidates of each example
            batch.tgt_ids, batch.tgt_mask = torch.zeros(4, 0, dtype=torch.long), torch.zeros(4, 0, dtype=torch.bool)
            batch.tgt_labels = torch.tensor([[5], [6], [5], [6]])
            batch.tgt_row, batch.tgt_cand, batch.n_candidates = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]), 2
        out = net(batch)
    assert out.scores.shape == (2, 2)


def _store_and_net(family, tiny_bert, tiny_t5, toy_task, tmp_path, select_k):
    backbone = backbone_for(family, tiny_bert, tiny_t5, None)
    cfg = CacheConfig(backbone=backbone, task=toy_task, out=str(tmp_path), dtype="fp32", splits=["train"], device="cpu")
    store = LadderStore(cache_activations.run(cfg, log=lambda *a: None)[0])
    net = side_for(backbone, toy_task, store=store)
    net.spec.select_k = select_k
    names = sorted({n for st in net.spec.stacks for n in net.spec.state_names(st)})
    return store, net, names


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_token_selective_side_net_with_every_position_selected_equals_plain_training(family, tiny_bert, tiny_t5,
                                                                                    toy_task, tmp_path):
    store, net, names = _store_and_net(family, tiny_bert, tiny_t5, toy_task, tmp_path, select_k=0)
    batch = next(iter(reader(store).batches(names, 8, shuffle=True, seed=2)))
    net.train()  # dropout is 0: train mode only switches the selective path on
    out = {}
    for k in (0, batch.src_ids.shape[1]):
        net.spec.select_k = k
        net.zero_grad()
        loss = net(batch).loss
        loss.backward()
        out[k] = (loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    (l0, g0), (l1, g1) = out.values()
    assert torch.allclose(l0, l1, atol=1e-5)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-5, rtol=1e-4), n


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_token_selective_side_net_keeps_the_full_forward_values_at_selected_positions(family, tiny_bert, tiny_t5,
                                                                                     toy_task, tmp_path):
    from pipeline.side import pad_bias, select_positions

    store, net, names = _store_and_net(family, tiny_bert, tiny_t5, toy_task, tmp_path, select_k=2)
    batch = next(iter(reader(store).batches(names, 8, shuffle=False)))
    emb, ladders = net._ladders(batch.states, SRC)
    if emb is None:
        emb = net._embed(batch.src_ids)
    T = batch.src_ids.shape[1]
    bias = pad_bias(batch.src_mask)
    if family == "t5":
        bias = bias + net._rel_bias(net.rel_src, T, T, True, bias.device)
    sel, valid = select_positions(batch.src_mask, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = net.src(emb, ladders, bias)
        x_sel, x_all = net.src.selective(emb, ladders, bias, sel)
    want = full.gather(1, sel[..., None].expand(-1, -1, full.shape[-1]))
    assert torch.allclose(x_sel[valid], want[valid], atol=1e-5)
    assert torch.allclose(x_all[batch.src_mask], full[batch.src_mask], atol=1e-5)
    net.train()
    assert torch.isfinite(net(batch).loss)  # the selective training path runs end to end


def test_token_selective_side_net_is_refused_where_it_is_not_built(tiny_llama):
    cfg = bbm.load_config(tiny_llama)
    with pytest.raises(ConfigError, match="select_k"):
        spec_from_config(cfg, 4, None, "ladder", "classification", 2, [5, 6], select_k=4)


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_no_ladder_with_the_final_mix_reads_only_the_embeddings_and_the_final_state(family, tiny_bert, tiny_t5,
                                                                                   toy_task, tmp_path):
    backbone = tiny_bert if family == "bert" else tiny_t5
    cfg = CacheConfig(backbone=backbone, task=toy_task, out=str(tmp_path), splits=["train"], device="cpu")
    store = LadderStore(cache_activations.run(cfg, log=lambda *a: None)[0])
    hf = bbm.load_config(backbone)
    spec = spec_from_config(hf, 4, None, "no_ladder", "classification", 2, [0, 1], mix_final=True)
    names = sorted({n for st in spec.stacks for n in spec.state_names(st)})
    last = f"{spec.late_stack}_{spec.n_layers - 1:02d}"
    assert names == sorted(["src_emb", last] if family == "bert" else [last])
    net = build_side(spec, bbm.load_frozen_tensors(backbone, spec.family, True), "random", 0)
    loss = net(next(iter(reader(store).batches(names, 8, shuffle=False)))).loss
    assert torch.isfinite(loss)
