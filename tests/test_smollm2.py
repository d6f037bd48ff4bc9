"""The real SmolLM2-135M-Instruct (the embedded GGUF) as a decoder-only backbone: its weights and frozen tensors as
the loaded model has them, the side net on its real config (30 layers, hidden 576, 9 heads, 3 KV heads, head_dim 64,
FF 1536) pruned from its real weights with the rotary pairs at their own frequencies, Fisher against brute force,
and cache == live loss and gradients (fp32 store, every third layer, chat prompts, two-token verbalizers), and
zero-shot prompting from the cache against the live model. Few, short examples: under a minute on 2 cores."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import backbone as bbm
from pipeline import cache_activations, prune
from pipeline.batches import reader
from pipeline.config import CacheConfig, PruneConfig, TrainConfig
from pipeline.ladder_store import LadderStore
from pipeline.layout import SRC
from pipeline.side import build_side
from pipeline.side_spec import spec_from_config
from pipeline.tasks import get_task
from tests.conftest import write_task

pytestmark = pytest.mark.slow
EVERY_THIRD = [2, 5, 8, 11, 14, 17, 20, 23, 26, 29]  # layer dropping: 10 of 30, the last included


@pytest.fixture(scope="module")
def real():
    bb = bbm.load_backbone(bbm.SMOLLM2, "cpu")
    return bb, bbm.state_dict_from_files(bbm.SMOLLM2)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> str:
    """A toy task with two-token verbalizers in SmolLM2's BPE ("not good" / "very good")."""
    path = write_task(tmp_path_factory.mktemp("toy"), n_train=8, n_eval=4)
    Path(path).write_text(Path(path).read_text().replace("verbalizers: [negative, positive]",
                                                         "verbalizers: [not good, very good]"))
    return path


def test_gguf_weights_and_frozen_tensors_are_the_loaded_models(real):
    bb, sd = real
    model = bb.model.state_dict()
    assert set(model) - set(sd) == {"lm_head.weight"}  # tied: the head is the embedding table
    assert all(torch.equal(sd[k], model[k]) for k in sd)  # dequantized, q/k rows un-permuted, as transformers loads
    frozen = bbm.load_frozen_tensors(bbm.SMOLLM2, "decoder", final_norm=True)
    assert set(frozen) == {"embed", "final_norm_src"}
    assert torch.equal(frozen["embed"], model["model.embed_tokens.weight"])
    assert torch.equal(frozen["final_norm_src"], model["model.norm.weight"])
    assert bb.sha256 == bbm.EMBEDDED[bbm.SMOLLM2].weights_sha256  # the GGUF file's own sha256, as a safetensors'


def test_the_side_net_on_the_real_config_is_pruned_from_the_real_weights(real):
    """Every side tensor is an exact slice of the backbone's, and the parameter count has the closed form of a
    Llama block at 1/8 width (no biases, SwiGLU, GQA with 3 KV heads of 8 dims)."""
    bb, sd = real
    spec = spec_from_config(bb.config, 8, EVERY_THIRD, "ladder", "classification", 2, [[3524], [2731]])
    assert (spec.d_model, spec.n_heads, spec.n_kv_heads, spec.d_kv, spec.d_ff, spec.n_layers) == (576, 9, 3, 64, 1536, 30)
    assert (spec.side_d, spec.side_kv, spec.side_ff, spec.act, spec.rope_theta) == (72, 8, 192, "silu", 100000.0)
    net = build_side(spec, bbm.load_frozen_tensors(bbm.SMOLLM2, "decoder"), "magnitude", 0, sd)
    idx = prune.select_indices(spec, sd)
    R = idx["R"]
    for j, k in enumerate(EVERY_THIRD):
        m, blk = prune.layer_map(spec, SRC, k), net.src.blocks[j]
        Hq, Hkv, F = idx[(SRC, k, "attn", "q")], idx[(SRC, k, "attn", "kv")], idx[(SRC, k, "F")]
        assert torch.equal(blk.attn.q.weight, sd[m["attn.q.weight"]][Hq][:, R])
        assert torch.equal(blk.attn.k.weight, sd[m["attn.k.weight"]][Hkv][:, R])
        assert torch.equal(blk.attn.o.weight, sd[m["attn.o.weight"]][R][:, Hq])
        assert torch.equal(blk.ff.wi_0.weight, sd[m["ff.wi_0.weight"]][F][:, R])
        assert torch.equal(blk.ff.wo.weight, sd[m["ff.wo.weight"]][R][:, F])
        assert torch.equal(blk.norm_attn.weight, sd[m["norm_attn.weight"]][R])
        pairs = idx[(SRC, k, "attn", "pairs")]
        assert len(pairs) == 4 and net.spec.rope_pairs[j] == pairs.tolist()  # 8 side dims = 4 rotate-half pairs
        dims = torch.cat([pairs, pairs + 32])  # the same dims in every head, q and k alike
        assert Hq.tolist() == [h * 64 + int(d) for h in range(9) for d in dims]
        assert Hkv.tolist() == [h * 64 + int(d) for h in range(3) for d in dims]
    assert torch.equal(net.src.final_norm.weight, sd["model.norm.weight"][R])
    d, ds, kv, ff, L = 576, 72, 8, 192, len(EVERY_THIRD)
    block = ds * 9 * kv + 2 * ds * 3 * kv + 9 * kv * ds + 2 * ds + 3 * ds * ff
    ladders = (L + 1) * (d * ds + ds)
    assert net.trainable_parameters() == L * block + ladders + L + ds + (ds * d + d)


def test_fisher_on_the_real_model_equals_brute_force_per_example_gradients(real, task):
    from pipeline.prune_init import fisher_batches

    bb, _ = real
    for p in bb.model.parameters():
        p.requires_grad_(False)
    t = get_task(task)
    exs = t.load("unused", 0)["train"][:3]
    batches = fisher_batches(bb, t, exs, PruneConfig(backbone=bbm.SMOLLM2, task=task, batch_size=3, prompt_format="chat", max_length=128))
    imp, n = prune.fisher_importance(bb, batches, t.kind)
    name = "model.layers.29.mlp.down_proj.weight"
    module = bb.model.get_submodule(name.rsplit(".", 1)[0])
    module.weight.requires_grad_(True)
    brute = torch.zeros_like(module.weight)
    b = batches[0]
    for i in range(3):  # one example at a time, unpadded: log p(gold verbalizer, both tokens | chat prompt)
        L = int(b["mask"][i].sum())
        one = {k: v[i:i + 1, :L] for k, v in b.items() if k in ("ids", "mask", "tgt")}
        module.weight.grad = None
        prune.example_log_likelihood(bb, one).sum().backward()
        brute += module.weight.grad.pow(2)
    module.weight.requires_grad_(False)
    assert n == 3 and torch.allclose(imp[name], brute / 3, rtol=1e-3, atol=1e-12)


@pytest.fixture(scope="module")
def store(real, task, tmp_path_factory) -> LadderStore:
    bb, _ = real
    cfg = CacheConfig(backbone=bbm.SMOLLM2, task=task, out=str(tmp_path_factory.mktemp("cache")), dtype="fp32",
                      layers=",".join(map(str, EVERY_THIRD)), device="cpu", prompt_format="chat", splits=["train"],
                      max_length=128)
    t = get_task(task)
    return LadderStore(cache_activations.cache_split(cfg, bb, t, "train", t.load("unused", 0)["train"],
                                                     log=lambda *a: None))


def test_cache_equals_live_on_the_real_model_with_an_fp32_store(real, store, task, monkeypatch):
    from pipeline.train_side import BackboneFeed

    bb, sd = real
    assert [len(c) for c in store.cand] == [2, 2] and store.fingerprint["prompt_format"] == "chat"
    spec = spec_from_config(bb.config, 8, EVERY_THIRD, "ladder", "classification", 2,
                            [c.tolist() for c in store.cand], dropout=0.0, mix_final=True)
    net = build_side(spec, bbm.load_frozen_tensors(bbm.SMOLLM2, "decoder", True), "magnitude", 0, sd)
    monkeypatch.setattr(bbm, "load_backbone", lambda *a, **k: bb)  # the in-loop feed reuses the loaded model
    feed = BackboneFeed(TrainConfig(backbone=bbm.SMOLLM2, task=task, device="cpu"), store)
    names = spec.read_states
    batch = next(reader(store).batches(names, 8, shuffle=True, seed=0, all_candidates=True))
    out = []
    for b in (batch, feed(batch, names)):
        net.zero_grad()
        o = net(b)
        o.loss.backward()
        out.append((o.loss.detach(), o.scores.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}))
    (l1, s1, g1), (l2, s2, g2) = out
    assert torch.allclose(l1, l2, atol=1e-5, rtol=1e-6) and torch.allclose(s1, s2, atol=1e-4)
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-5, rtol=1e-4), n


def test_zero_shot_from_the_cache_equals_the_live_instruct_model(real, store):
    from pipeline.evaluate import zero_shot_scores

    bb, _ = real
    got = zero_shot_scores(store, bbm.load_frozen_tensors(bbm.SMOLLM2, "decoder", True), bb.config.rms_norm_eps)
    for i in range(3):
        prompt = store.src_ids[store.offsets[i]:store.offsets[i + 1]].tolist()
        for c, cand in enumerate(store.cand):
            with torch.no_grad():
                lp = torch.log_softmax(bb.model(torch.tensor([prompt + cand.tolist()])).logits[0], -1)
            want = sum(float(lp[len(prompt) - 1 + u, t]) for u, t in enumerate(cand.tolist()))
            assert got[i, c] == pytest.approx(want, abs=2e-3)
