"""Token-selective fine-tuning (../shared/seeds/selective_finetuning.txt), our own implementation, as a
baseline: every parameter trains, but only k random positions per sequence (plus the first token,
[CLS] / T5's first source token) carry gradients through the layers. The other positions run under
no_grad, so their activations are never kept for the backward pass; the selected queries still
attend to every position (keys and values of the unselected ones enter as constants).

Each layer is computed twice: once for all positions without grad (the unselected positions' next
states and their keys/values), once for the k selected positions with grad. Training pools the
selected positions (the paper's Eq. 1); evaluation is the plain full forward of the same weights.

BERT-family encoders (HF BertModel layout) and T5 (selective encoder, full decoder: its few target
tokens all train) are supported; the layer code reads the HF submodules, not HF forward internals.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.side import (
    select_positions,  # shared with the side network's select_k option
)


def _heads(x, H):
    B, L, D = x.shape
    return x.view(B, L, H, D // H).transpose(1, 2)


def _merge(x):
    B, H, L, dh = x.shape
    return x.transpose(1, 2).reshape(B, L, H * dh)


def _mixed(full_nograd, sel_grad, sel):
    """full (B, H, T, dh) constants with the selected rows replaced by grad-carrying ones."""
    idx = sel[:, None, :, None].expand(-1, full_nograd.shape[1], -1, full_nograd.shape[3])
    return full_nograd.scatter(2, idx, sel_grad)


def _gather_rows(x, sel):
    return x.gather(1, sel[..., None].expand(-1, -1, x.shape[-1]))


# ---------------------------------------------------------------- BERT

def _bert_qkv(layer, x):
    att = layer.attention.self
    H = att.num_attention_heads
    return _heads(att.query(x), H), _heads(att.key(x), H), _heads(att.value(x), H)


def _bert_rest(layer, x, ctx):
    """Everything after attention in a post-LN BERT layer."""
    a = layer.attention.output
    x = a.LayerNorm(a.dropout(a.dense(_merge(ctx))) + x)
    o = layer.output
    return o.LayerNorm(o.dropout(o.dense(layer.intermediate(x))) + x)


def bert_selective_forward(bert, ids, mask, sel):
    """Selected positions' last-layer states (B, k+1, d), gradients through those positions only."""
    emb = bert.embeddings(input_ids=ids)
    bias = torch.zeros(mask.shape, dtype=emb.dtype, device=emb.device).masked_fill(~mask, torch.finfo(emb.dtype).min)
    bias = bias[:, None, None, :]
    p = bert.config.attention_probs_dropout_prob if bert.training else 0.0
    h_sel, h_all = _gather_rows(emb, sel), emb.detach()
    for layer in bert.encoder.layer:
        with torch.no_grad():
            q_all, k_all, v_all = _bert_qkv(layer, h_all)
            ctx_all = F.scaled_dot_product_attention(q_all, k_all, v_all, attn_mask=bias, dropout_p=p)
            h_all_next = _bert_rest(layer, h_all, ctx_all)
        q, k_s, v_s = _bert_qkv(layer, h_sel)
        ctx = F.scaled_dot_product_attention(q, _mixed(k_all, k_s, sel), _mixed(v_all, v_s, sel), attn_mask=bias,
                                             dropout_p=p)
        h_sel, h_all = _bert_rest(layer, h_sel, ctx), h_all_next
    return h_sel


# ---------------------------------------------------------------- T5

def _t5_qkv(sub, x):
    """T5 self-attention sublayer pieces: pre-norm input -> q, k, v heads (no 1/sqrt(d) scaling in T5)."""
    a = sub.SelfAttention
    n = sub.layer_norm(x)
    return _heads(a.q(n), a.n_heads), _heads(a.k(n), a.n_heads), _heads(a.v(n), a.n_heads)


def _t5_rest(block, x, ctx):
    sa = block.layer[0]
    x = x + sa.dropout(sa.SelfAttention.o(_merge(ctx)))
    ff = block.layer[-1]
    return x + ff.dropout(ff.DenseReluDense(ff.layer_norm(x)))


def t5_selective_encoder(model, ids, mask, sel):
    """Encoder output (B, T, d) for the decoder: selected rows carry gradients, the others are constants."""
    enc = model.encoder
    emb = enc.embed_tokens(ids)
    T = ids.shape[1]
    p = model.config.dropout_rate if model.training else 0.0
    pos = enc.block[0].layer[0].SelfAttention.compute_bias(T, T, device=ids.device)  # (1, H, T, T)
    neg = torch.zeros(mask.shape, dtype=emb.dtype, device=emb.device).masked_fill(~mask, torch.finfo(emb.dtype).min)
    bias_all = pos.to(emb.dtype) + neg[:, None, None, :]  # (B, H, T, T)
    bias_sel = bias_all.gather(2, sel[:, None, :, None].expand(-1, bias_all.shape[1], -1, T))
    h_sel, h_all = enc.dropout(_gather_rows(emb, sel)), enc.dropout(emb).detach()
    for block in enc.block:
        with torch.no_grad():
            q_all, k_all, v_all = _t5_qkv(block.layer[0], h_all)
            ctx_all = F.scaled_dot_product_attention(q_all, k_all, v_all, attn_mask=bias_all, dropout_p=p, scale=1.0)
            h_all_next = _t5_rest(block, h_all, ctx_all)
        q, k_s, v_s = _t5_qkv(block.layer[0], h_sel)
        ctx = F.scaled_dot_product_attention(q, _mixed(k_all, k_s, sel), _mixed(v_all, v_s, sel), attn_mask=bias_sel,
                                             dropout_p=p, scale=1.0)
        h_sel, h_all = _t5_rest(block, h_sel, ctx), h_all_next
    with torch.no_grad():
        out_all = enc.final_layer_norm(h_all)
    out_sel = enc.dropout(enc.final_layer_norm(h_sel))
    idx = sel[..., None].expand(-1, -1, out_all.shape[-1])
    return out_all.scatter(1, idx, out_sel)


def t5_selective_loss(model, ids, mask, labels, k, generator=None):
    """Teacher-forced text-to-text loss with a selective encoder and a fully trained decoder."""
    sel, _ = select_positions(mask, k, generator)
    enc = t5_selective_encoder(model, ids, mask, sel)
    from transformers.modeling_outputs import BaseModelOutput

    return model(encoder_outputs=BaseModelOutput(last_hidden_state=enc), attention_mask=mask, labels=labels).loss
