"""The side network against the official LST code, with expectations derived independently of pipeline/side.py.

The reference forwards below are written out from the official implementation's structure
(ylsung/Ladder-Side-Tuning: seq2seq/third_party/models/t5/modeling_side_t5.py `T5Stack.forward` with
add_residual_after=False and use_gate="learnable", and `T5ForConditionalGeneration.forward`;
CLIP-ViL/src/lxrt/modeling.py for the BERT-style side net), using Hugging Face's own T5Block / BertLayer /
T5LayerNorm as the side blocks: the block code is not ours, and the fusion loop is the official one:

    side = first_downsample(inputs_embeds)
    for i in side_layers:
        gate = sigmoid(alpha_i / T)
        side = gate * side + (1 - gate) * downsample_i(h_i)     # BEFORE the side block
        side = side_block_i(side)
    side = final_side_layer_norm(side)

Gates are set away from 0.5 so that mixing up mu and 1 - mu would show.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline import backbone as bbm
from pipeline import cache_activations
from pipeline.batches import reader
from pipeline.config import CacheConfig
from pipeline.ladder_store import LadderStore
from pipeline.layout import SRC, TGT, state_name
from pipeline.side import SideNetwork, build_side
from pipeline.side_spec import spec_from_config
from pipeline.tasks import get_task

NEG = -1e9


def _net_and_batch(backbone, task, tmp_path, variant="ladder", layers=None, dec_layers="same", seed=0):
    cfg = CacheConfig(backbone=backbone, task=task, out=str(tmp_path), dtype="fp32", splits=["train"], device="cpu")
    store = LadderStore(cache_activations.run(cfg, log=lambda *a: None)[0])
    hf = bbm.load_config(backbone)
    t = get_task(task)
    verb = [int(c[0]) for c in store.cand] if bbm.family_of_config(hf) == "decoder" else []
    spec = spec_from_config(hf, 4, layers, variant, t.kind, t.num_labels, verb, dropout=0.0, dec_layers=dec_layers)
    net = build_side(spec, bbm.load_frozen_tensors(backbone, spec.family, spec.mixes_final), "magnitude", 0,
                           bbm.state_dict_from_files(backbone))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # gates away from mu = 0.5: mu and 1 - mu differ
        for stack in (net.src, net.tgt):
            if stack is not None and hasattr(stack, "alpha"):
                stack.alpha.copy_(0.3 * torch.randn(stack.alpha.shape, generator=g))
    names = sorted({n for st in spec.stacks for n in spec.state_names(st)})
    batch = next(iter(reader(store).batches(names, 8, shuffle=True, seed=3)))
    return net.eval(), batch


def _copy(dst: torch.nn.Module, pairs: dict):
    with torch.no_grad():
        for name, src in pairs.items():
            dst.get_parameter(name).copy_(src)


# ---------------------------------------------------------------- T5

def _hf_t5_blocks(net, stack, is_decoder: bool):
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Block

    s = net.spec
    cfg = T5Config(vocab_size=s.vocab_size, d_model=s.side_d, d_kv=s.side_kv, d_ff=s.side_ff, num_heads=s.n_heads,
                   relative_attention_num_buckets=s.rel_buckets, relative_attention_max_distance=s.rel_max_distance,
                   dropout_rate=0.0, layer_norm_epsilon=s.norm_eps, feed_forward_proj="relu", is_decoder=is_decoder,
                   attn_implementation="eager")
    blocks = []
    for j, ours in enumerate(stack.blocks):
        blk = T5Block(cfg, has_relative_attention_bias=j == 0, layer_idx=j).eval()
        pairs = {f"layer.0.SelfAttention.{p}.weight": getattr(ours.attn, p).weight for p in "qkvo"}
        pairs["layer.0.layer_norm.weight"] = ours.norm_attn.weight
        ff = 1
        if is_decoder:
            pairs.update({f"layer.1.EncDecAttention.{p}.weight": getattr(ours.cross, p).weight for p in "qkvo"})
            pairs["layer.1.layer_norm.weight"] = ours.norm_cross.weight
            ff = 2
        pairs[f"layer.{ff}.DenseReluDense.wi.weight"] = ours.ff.wi.weight
        pairs[f"layer.{ff}.DenseReluDense.wo.weight"] = ours.ff.wo.weight
        pairs[f"layer.{ff}.layer_norm.weight"] = ours.norm_ff.weight
        if j == 0:  # the first side layer owns the relative-position table (official: first_available_layer)
            pairs["layer.0.SelfAttention.relative_attention_bias.weight"] = (net.rel_tgt if is_decoder else net.rel_src).weight
        _copy(blk, pairs)
        blocks.append(blk)
    return blocks


def _official_t5_stack(net, stack, blocks, emb, ladders, mask4d, enc=None, enc_mask4d=None):
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    side = stack.first_down(emb)  # side_first_downsample(inputs_embeds)
    position_bias = None
    for i, blk in enumerate(blocks):
        gate = torch.sigmoid(stack.alpha[i] / 0.1)
        side = gate * side + (1 - gate) * stack.downs[i](ladders[i])
        side, position_bias, _ = blk(side, attention_mask=mask4d, position_bias=position_bias,
                                     encoder_hidden_states=enc, encoder_attention_mask=enc_mask4d)
    norm = T5LayerNorm(net.spec.side_d, eps=net.spec.norm_eps)
    _copy(norm, {"weight": stack.final_norm.weight})
    return norm(side)


def official_t5_loss(net, batch):
    s = net.spec
    src_mask = batch.src_mask
    enc_mask4d = (~src_mask)[:, None, None, :].float() * NEG
    enc = _official_t5_stack(net, net.src, _hf_t5_blocks(net, net.src, False), F.embedding(batch.src_ids, net.embed),
                             [batch.states[state_name(SRC, k)] for k in s.layers_of(SRC)], enc_mask4d)
    rows = batch.tgt_row
    U = batch.tgt_ids.shape[1]
    causal = torch.triu(torch.full((U, U), NEG), diagonal=1)
    dec_mask4d = causal[None, None] + (~batch.tgt_mask)[:, None, None, :].float() * NEG
    dec = _official_t5_stack(net, net.tgt, _hf_t5_blocks(net, net.tgt, True), F.embedding(batch.tgt_ids, net.embed),
                             [batch.states[state_name(TGT, k)] for k in s.layers_of(TGT)], dec_mask4d,
                             enc=enc[rows], enc_mask4d=enc_mask4d[rows])
    seq = net.up(dec) * s.d_model ** -0.5  # side_final_upsample, then the tied-head rescale
    logits = seq @ net.embed.T
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.tgt_labels.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("dec_layers", ["same", [0, 2]])
def test_t5_side_net_equals_a_reference_written_from_the_official_code(dec_layers, tiny_t5, toy_task, tmp_path):
    net, batch = _net_and_batch(tiny_t5, toy_task, tmp_path, layers=[1, 2], dec_layers=dec_layers)
    with torch.no_grad():
        ours, ref = net(batch).loss, official_t5_loss(net, batch)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), (ours, ref)


def test_t5_side_net_with_the_ladder_fused_after_the_block_is_not_the_official_network(tiny_t5, toy_task, tmp_path):
    net, batch = _net_and_batch(tiny_t5, toy_task, tmp_path, variant="fuse_after", layers=[1, 2])
    with torch.no_grad():
        assert not torch.allclose(net(batch).loss, official_t5_loss(net, batch), atol=1e-3)


# ---------------------------------------------------------------- BERT

def official_bert_loss(net, batch):
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    s = net.spec
    cfg = BertConfig(hidden_size=s.side_d, num_attention_heads=s.n_heads, intermediate_size=s.side_ff,
                     hidden_act="gelu", layer_norm_eps=s.norm_eps, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, attn_implementation="eager")
    mask4d = (~batch.src_mask)[:, None, None, :].float() * NEG
    stack = net.src
    side = stack.first_down(batch.states[state_name(SRC, "emb")])  # side_first_downsample_l(lang_feats)
    for i, ours in enumerate(stack.blocks):
        layer = BertLayer(cfg).eval()
        _copy(layer, {
            "attention.self.query.weight": ours.attn.q.weight, "attention.self.query.bias": ours.attn.q.bias,
            "attention.self.key.weight": ours.attn.k.weight, "attention.self.key.bias": ours.attn.k.bias,
            "attention.self.value.weight": ours.attn.v.weight, "attention.self.value.bias": ours.attn.v.bias,
            "attention.output.dense.weight": ours.attn.o.weight, "attention.output.dense.bias": ours.attn.o.bias,
            "attention.output.LayerNorm.weight": ours.norm_attn.weight,
            "attention.output.LayerNorm.bias": ours.norm_attn.bias,
            "intermediate.dense.weight": ours.ff.wi.weight, "intermediate.dense.bias": ours.ff.wi.bias,
            "output.dense.weight": ours.ff.wo.weight, "output.dense.bias": ours.ff.wo.bias,
            "output.LayerNorm.weight": ours.norm_ff.weight, "output.LayerNorm.bias": ours.norm_ff.bias})
        k = s.layers_of(SRC)[i]
        gate = torch.sigmoid(stack.alpha[i] / 0.1)  # merge_backbone_to_side, before the side layer
        side = gate * side + (1 - gate) * stack.downs[i](batch.states[state_name(SRC, k)])
        side = layer(side, mask4d)
    h = net.up(side)  # side_final_upsample_l
    m = batch.src_mask[..., None].float()
    logits = net.head((h * m).sum(1) / m.sum(1))  # our task head: mean-pooled, as sentence-transformers
    return F.cross_entropy(logits, batch.labels.long())


def test_bert_side_net_equals_a_reference_written_from_the_official_code(tiny_bert, toy_task, tmp_path):
    net, batch = _net_and_batch(tiny_bert, toy_task, tmp_path, layers=[0, 2])
    with torch.no_grad():
        ours, ref = net(batch).loss, official_bert_loss(net, batch)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), (ours, ref)


# ---------------------------------------------------------------- the property that tells the orders apart

@pytest.mark.parametrize("variant,spreads", [("ladder", True), ("fuse_after", False)])
@pytest.mark.parametrize("family", ["bert", "t5", "llama"])
def test_last_kept_backbone_state_reaches_other_tokens_only_when_fused_before_a_block(
        family, variant, spreads, tiny_bert, tiny_t5, tiny_llama, toy_task, tmp_path):
    """Fused before side block j, a change of h_k at one token moves the side output at other tokens
    (the block's attention spreads it). Fused after the last block, it reaches the output at that token only."""
    backbone = {"bert": tiny_bert, "t5": tiny_t5, "llama": tiny_llama}[family]
    net, batch = _net_and_batch(backbone, toy_task, tmp_path, variant=variant)
    last = state_name(SRC, net.spec.layers_of(SRC)[-1])
    seen = []
    hook = net.src.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    changed = dict(batch.states)
    changed[last] = batch.states[last].clone()
    t = 0 if family == "llama" else 1  # causal attention: a change at t can only reach later tokens
    changed[last][0, t] += 3.0
    with torch.no_grad():
        net(batch)
        net(type(batch)(**{**batch.__dict__, "states": changed}))
    hook.remove()
    before, after = seen
    assert not torch.allclose(before[0, t], after[0, t])  # the token itself always sees its ladder
    n_real = int(batch.src_mask[0].sum())
    others = [i for i in range(n_real) if i != t]
    moved = (before[0, others] - after[0, others]).abs().amax()
    assert (moved > 1e-4) == spreads, float(moved)
    assert torch.equal(before[1:], after[1:])  # other examples never see it


# ---------------------------------------------------------------- Side-Tuning (late fusion)

@pytest.mark.parametrize("family", ["bert", "t5"])
def test_late_fusion_reads_only_the_final_state_and_mixes_it_by_a_learned_gate(family, tiny_bert, tiny_t5,
                                                                              toy_task, tmp_path):
    """Official side_tuning.sh: use_gate "one" (no ladder information) + merge_last:
    g * up(side) + (1 - g) * final backbone state, g = sigmoid(alpha / 0.1), alpha = 0 at init."""
    backbone = tiny_bert if family == "bert" else tiny_t5
    net, batch = _net_and_batch(backbone, toy_task, tmp_path, variant="late_fusion")
    s = net.spec
    L = s.n_layers - 1
    if family == "bert":
        assert s.state_names(SRC) == [state_name(SRC, "emb"), state_name(SRC, L)]
    else:  # the merge happens at the decoder output: the encoder's final state is never read
        assert s.state_names(SRC) == [] and s.state_names(TGT) == [state_name(TGT, L)]
    assert torch.sigmoid(net.late_alpha / 0.1).item() == 0.5
    assert not hasattr(net.src, "downs")  # no ladders at all
    with torch.no_grad():
        net.late_alpha.fill_(0.2)
        g = torch.sigmoid(torch.tensor(2.0))
        captured = {}
        hook = net.up.register_forward_hook(lambda mod, args, out: captured.setdefault("up", out))
        out = net(batch)
        hook.remove()
        if family == "bert":
            h = g * captured["up"] + (1 - g) * batch.states[state_name(SRC, L)]
            m = batch.src_mask[..., None].float()
            want = net.head((h * m).sum(1) / m.sum(1))
            assert torch.allclose(out.scores, want, atol=1e-5)
        else:
            hl = batch.states[state_name(TGT, L)]
            normed = net.final_norm_tgt * hl * torch.rsqrt(hl.pow(2).mean(-1, keepdim=True) + s.norm_eps)
            h = (g * captured["up"] + (1 - g) * normed) * s.d_model ** -0.5
            logits = h @ net.embed.T
            want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.tgt_labels.reshape(-1), ignore_index=-100)
            assert torch.allclose(out.loss, want, atol=1e-5)


# ---------------------------------------------------------------- sizes and dropout sites

def _t5_count(d, ds, H, kv, ff, n_enc, n_dec, buckets):
    attn = 4 * ds * H * kv
    enc_block = attn + ds + (ds * ff + ff * ds) + ds  # self-attn + norm, relu FF + norm, no biases (T5)
    dec_block = enc_block + attn + ds  # + cross-attention and its norm
    ladder = d * ds + ds  # Linear with bias (official add_bias_sampling=True)
    stacks = (n_enc * enc_block + (1 + n_enc) * ladder + n_enc + ds) + (n_dec * dec_block + (1 + n_dec) * ladder + n_dec + ds)
    return stacks + 2 * buckets * H + (ds * d + d)  # two relative-position tables, the up-projection


@pytest.mark.parametrize("dec_layers", ["same", [2]])
def test_trainable_count_equals_closed_form_for_t5(dec_layers, tiny_t5):
    cfg = bbm.load_config(tiny_t5)
    spec = spec_from_config(cfg, 4, [0, 2], "ladder", "classification", 2, [0, 1], dec_layers=dec_layers)
    net = SideNetwork(spec, {"embed": torch.zeros(cfg.vocab_size, cfg.d_model)})
    n_dec = 2 if dec_layers == "same" else 1
    want = _t5_count(cfg.d_model, cfg.d_model // 4, cfg.num_heads, cfg.d_kv // 4, cfg.d_ff // 4, 2, n_dec,
                     cfg.relative_attention_num_buckets)
    assert net.trainable_parameters() == want


@pytest.mark.parametrize("site", ["dropout", "attn_dropout", "ff_dropout", "emb_dropout", "final_dropout",
                                  "ladder_dropout"])
def test_each_dropout_site_is_active_in_training_only(site, tiny_t5, toy_task, tmp_path):
    net, batch = _net_and_batch(tiny_t5, toy_task, tmp_path)
    hf = bbm.load_config(tiny_t5)

    def side_output(rates: dict, train: bool):
        spec = spec_from_config(hf, 4, None, "ladder", "classification", 2, [0, 1], **rates)
        m = SideNetwork(spec, {"embed": net.embed})
        m.load_state_dict(net.state_dict(), strict=False)
        seen = []
        m.up.register_forward_hook(lambda mod, args, out: seen.append(out))
        torch.manual_seed(0)
        with torch.no_grad():
            m.train(train)(batch)
        return seen[0]

    rates = {"dropout": 0.0, "attn_dropout": 0.0, "ff_dropout": 0.0, "emb_dropout": 0.0, "final_dropout": 0.0,
             "ladder_dropout": 0.0}
    assert torch.equal(side_output(rates, True), side_output(rates, False))  # every site at 0: train == eval
    rates[site] = 0.5
    assert not torch.allclose(side_output(rates, True), side_output(rates, False), atol=1e-4)  # this site drops


def test_ladder_dropout_is_off_unless_named_since_the_official_side_net_has_no_such_site(tiny_t5):
    """`dropout=` sets the official sites only (T5's single dropout_rate); the cache-side ladder dropout stays 0,
    and an old run folder's side_config.json without the field loads with it off."""
    import json

    hf = bbm.load_config(tiny_t5)
    spec = spec_from_config(hf, 4, None, "ladder", "classification", 2, [0, 1], dropout=0.3)
    assert spec.ladder_dropout == 0.0 and spec.dropout == spec.final_dropout == 0.3
    old = {k: v for k, v in json.loads(spec.to_json()).items() if k != "ladder_dropout"}
    assert type(spec).from_json(json.dumps(old)).ladder_dropout == 0.0
    assert spec_from_config(hf, 4, None, "ladder", "classification", 2, [0, 1], ladder_dropout=0.2).ladder_dropout == 0.2


@pytest.mark.parametrize("family", ["bert", "t5", "llama"])
def test_mix_final_adds_the_gated_final_state_to_the_ladder_net(family, tiny_bert, tiny_t5, tiny_llama, toy_task,
                                                               tmp_path):
    """QST-style mix on top of LST: with the gate fully on the side (g = 1) the output is plain LST's."""
    backbone = {"bert": tiny_bert, "t5": tiny_t5, "llama": tiny_llama}[family]
    net, batch = _net_and_batch(backbone, toy_task, tmp_path, layers=[0, 1])  # the last layer (2) is not a ladder
    spec = net.spec
    mixed_spec = type(spec)(**{**spec.__dict__, "mix_final": True})
    L = state_name(mixed_spec.late_stack, spec.n_layers - 1)
    assert L in mixed_spec.state_names(mixed_spec.late_stack) and L not in spec.state_names(spec.late_stack)
    mixed = SideNetwork(mixed_spec, bbm.load_frozen_tensors(backbone, spec.family, True)).eval()
    mixed.load_state_dict(net.state_dict(), strict=False)
    names = {n for st in mixed_spec.stacks for n in mixed_spec.state_names(st)}
    cfg = CacheConfig(backbone=backbone, task=toy_task, out=str(tmp_path / "all"), dtype="fp32", splits=["train"],
                      device="cpu")
    store = LadderStore(cache_activations.run(cfg, log=lambda *a: None)[0])
    full = next(iter(reader(store).batches(sorted(names), 8, shuffle=True, seed=3)))
    with torch.no_grad():
        plain = net(full).scores if family == "bert" else net(full).loss  # T5 / decoder-only: the gold candidate's loss
        mixed.late_alpha.fill_(50.0)  # g = sigmoid(500) = 1: all side
        all_side = mixed(full).scores if family == "bert" else mixed(full).loss
        mixed.late_alpha.fill_(0.0)
        half = mixed(full).scores if family == "bert" else mixed(full).loss
    assert torch.allclose(plain, all_side, atol=1e-6)
    assert not torch.allclose(plain, half, atol=1e-4)
    assert mixed.trainable_parameters() == net.trainable_parameters() + 1
