"""The ladder side network (LST, Sung et al. 2022, sec. 3.2), for T5, encoder-only and decoder-only backbones.

Data flow for one stack (shapes for batch B, tokens T, backbone width d, side width d/r):

    side = down_0(dropout(embedding output))                # (B, T, d/r)  the first ladder
    for j, k in enumerate(kept_layers):                     # k: backbone block index
        side = mu_j * side + (1 - mu_j) * down_{j+1}(h_k)   # gated ladder, mu_j = sigmoid(alpha_j / T)
        side = block_j(side)                                # side block j runs beside backbone block k
    side = dropout(final_norm(side))                        # T5 / decoder-only (BERT layers end in a LayerNorm)

then `up` (d/r -> d) into the frozen LM head (T5, decoder-only) or a trainable task head (encoder-only).
h_k is the output of backbone block k (before any final layer norm). The ladder is fused BEFORE the side
block, so every kept backbone state, the top one included, passes through at least one side block; this is
the official code's default (ylsung/Ladder-Side-Tuning, seq2seq/third_party/models/t5/modeling_side_t5.py,
`T5Stack.forward`, branch `add_residual_after=False`, used by every script of the paper) and the paper's
"the i-th transformer layer of the side network combines the activation of the backbone h_i and the
activation of the previous layer of the side network" (sec. 3.2). mu weights the side branch, alpha is
zero-initialized (mu = 0.5) and T = 0.1, as there.

Variants (paper sec. 5, Fig. 8, and the supplement's side-design ablation):
    ladder           the above (default)
    fuse_after       ablation only: block first, ladder after (the official `add_residual_after=True`); the
                     top backbone state then reaches the head through one linear map and no side block
    no_ladder        network compression: the pruned side net over the embeddings, no backbone states
    late_fusion      Side-Tuning (official `side_tuning.sh`: use_gate "one" + merge_last): the side net over the
                     embeddings with no ladders, then up(side) mixed with the backbone's final state by a learned
                     gate g = sigmoid(alpha / T), alpha zero-init: g * up(side) + (1 - g) * final_norm(h_last)
    adapter          bottleneck blocks instead of transformer blocks (ladders fused before each, as above)
    (mix_final=True) any ladder variant plus late fusion's gated mix with the backbone's final state before the
                     head, as QST (Zhang et al. 2024) mixes its side output with the LLM's final hidden state
    (gate="qst")     QST's gates instead of LST's: one per dimension, sigmoid(z) with no temperature, z = 0.5 on
                     the side state at each ladder and 1.0 on the backbone's side of the final mix
                     (YouAreSpecialToMe/QST, modeling_llama_qst.py). With `downsampler="lowrank"` (QST's
                     AdapterLinear), mix_final and init="random" with no dropout this is QST's side net, except
                     that QST feeds its embedding output and its layer 0 through one shared downsampler
                     (`downsample[0]` twice) where LST, and this module, give each its own
    cross_attention  each ladder enters by a cross-attention from the side state instead of a gate

Dropout sites are the official side net's (T5's `dropout_rate`, 0.1, at each): the embedding output before
the first ladder, attention probabilities, inside the feed-forward, each residual branch, and after the final
norm. The cached backbone states themselves are dropout-free (stage one runs the backbone in eval mode);
the official code runs the frozen backbone in train mode, so its ladders see backbone dropout.
`train_side --feed backbone --backbone-dropout` reproduces that for comparison. `--ladder-dropout p` (ours,
off by default) drops each backbone state's entries before its down-projection: a stand-in for that noise
which a cache can give (bench/explore.py measures both).

The side network sees the backbone only through `states`: a dict name -> (B, T, d) tensor. Stage two
fills it from the ladder store; in-loop LST fills it from a live frozen backbone under no_grad. The
module cannot tell the two apart, which is what makes cached and live training identical.

Blocks are written here (not borrowed from transformers) so the side network does not change when
transformers' internal block signatures do, and so pruning can map every weight by name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import prune
from pipeline.errors import ConfigError
from pipeline.layout import EMB, SRC, TGT, state_name
from pipeline.side_spec import SideSpec

GATE_T = 0.1  # paper sec. 3.2
# QST's gates (YouAreSpecialToMe/QST, modeling_llama_qst.py): one per dimension, sigmoid(z) with no temperature;
# z = 0.5 weighting the side state at each ladder (`self.z`, sigmoid = 0.62) and z = 1.0 weighting the backbone's
# final state in the mix before the head (`lm_head_z`, sigmoid = 0.73, so up(side) starts at 0.27).
QST_LADDER_Z, QST_FINAL_Z = 0.5, 1.0
_MATH_ATTENTION = [False]  # set while pipeline/stacked.py runs side nets under torch.func.vmap


def gate_temperature(spec: SideSpec) -> float:
    """T in sigmoid(alpha / T) for every learned gate: LST's 0.1 (paper sec. 3.2), none (1) for QST's."""
    return GATE_T if spec.gate == "lst" else 1.0


def attention(q, k, v, bias, dropout_p: float, scale: float | None):
    """softmax(q k^T * scale + bias) v, (B, H, T, hs). torch's fused SDPA, except under vmap (the stacked
    configs of a sweep), where the CPU flash kernel has no batching rule and would loop over configs."""
    if not _MATH_ATTENTION[0]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if bias is not None:
        s = s + bias
    return F.dropout(torch.softmax(s.float(), -1).to(q.dtype), dropout_p) @ v
NEG = -1e9  # additive mask value; finite so a fully padded query row cannot turn into NaN


# ---------------------------------------------------------------- building blocks

class RMSNorm(nn.Module):
    """T5 / Llama layer norm: scale only, no mean subtraction, fp32 statistics."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)


def make_norm(spec: SideSpec, d: int) -> nn.Module:
    return nn.LayerNorm(d, eps=spec.norm_eps) if spec.family == "encoder" else RMSNorm(d, spec.norm_eps)


def rope(x, theta: float, pos=None, pairs=None, head_dim: int = 0):
    """Rotary embedding (rotate-half convention) on (B, H, T, hs); pos (B, T) positions (packed rows restart
    them per example, candidate continuations start after their prompt), default 0..T-1.

    Frequencies: `pairs` (a pruned init): the backbone's own frequency of each kept rotary pair, theta^(-2p / head_dim)
    for pair p of the backbone's head_dim-wide head (HF's inv_freq[p]), so a pruned side head rotates each kept
    coordinate pair exactly as the backbone rotated it and q.k at init is the backbone's over the kept coordinates
    (tested against transformers' apply_rotary_pos_emb). Without pairs (random init): a head of hs's own ladder
    theta^(-2i / hs), which is the backbone's pairs 0, k, 2k, ... for k = head_dim / hs."""
    t, hs = x.shape[-2], x.shape[-1]
    if pairs is None:
        inv = 1.0 / (theta ** (torch.arange(0, hs, 2, device=x.device, dtype=torch.float32) / hs))
    else:
        inv = 1.0 / (theta ** (torch.tensor(pairs, device=x.device, dtype=torch.int64).float() * 2 / head_dim))
    p = torch.arange(t, device=x.device, dtype=torch.float32) if pos is None else pos.float()[:, None]  # (B, 1, T)
    ang = p[..., None] * inv  # (T, hs/2) or (B, 1, T, hs/2)
    cos, sin = torch.cat([ang, ang], -1).cos().to(x.dtype), torch.cat([ang, ang], -1).sin().to(x.dtype)
    x1, x2 = x[..., : hs // 2], x[..., hs // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, d: int, n_heads: int, hs: int, bias: bool, out_bias: bool, n_kv_heads: int = 0,
                 scale: float | None = None, dropout: float = 0.0, rope_pairs=None, rope_head_dim: int = 0):
        super().__init__()
        self.h, self.hkv, self.hs = n_heads, n_kv_heads or n_heads, hs
        self.rope_pairs, self.rope_head_dim = (tuple(rope_pairs) if rope_pairs else None), rope_head_dim
        self.q = nn.Linear(d, n_heads * hs, bias=bias)
        self.k = nn.Linear(d, self.hkv * hs, bias=bias)
        self.v = nn.Linear(d, self.hkv * hs, bias=bias)
        self.o = nn.Linear(n_heads * hs, d, bias=out_bias)
        self.scale = scale
        self.dropout = dropout  # on the attention probabilities (T5Attention / BertSelfAttention do the same)

    def _p(self) -> float:
        return self.dropout if self.training else 0.0

    def forward(self, x, kv=None, bias=None, rope_theta: float | None = None, pos=None, past=None, kv_out=None):
        """past: (k, v) of earlier positions (B, Hkv, S0, hs), keys already rotated, attended before this call's
        own keys (a KV cache: candidate continuations after their prompt, generation); kv_out: a list that gets
        this call's (past + own) keys and values appended."""
        B, T, _ = x.shape
        src = x if kv is None else kv
        S = src.shape[1]
        q = self.q(x).view(B, T, self.h, self.hs).transpose(1, 2)  # (B, H, T, hs)
        k = self.k(src).view(B, S, self.hkv, self.hs).transpose(1, 2)  # (B, Hkv, S, hs)
        v = self.v(src).view(B, S, self.hkv, self.hs).transpose(1, 2)
        if rope_theta is not None:
            q = rope(q, rope_theta, pos, self.rope_pairs, self.rope_head_dim)
            k = rope(k, rope_theta, pos, self.rope_pairs, self.rope_head_dim)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)  # (B, Hkv, S0 + S, hs)
        if kv_out is not None:
            kv_out.append((k, v))
        if self.hkv != self.h:
            k = k.repeat_interleave(self.h // self.hkv, dim=1)
            v = v.repeat_interleave(self.h // self.hkv, dim=1)
        y = attention(q, k, v, None if bias is None else bias.to(q.dtype), self._p(), self.scale)
        return self.o(y.transpose(1, 2).reshape(B, T, self.h * self.hs))  # (B, T, d)

    def selective(self, x_sel, x_all, sel, bias_sel):
        """Self-attention output at the selected positions only: their queries attend to every
        position, whose keys/values enter as constants except the selected ones' (token-selective
        training). x_sel (B, k, d) carries grad; x_all (B, T, d) is the no-grad input of every position."""
        B, k, _ = x_sel.shape

        def heads(t):
            return t.view(B, t.shape[1], self.h, self.hs).transpose(1, 2)

        with torch.no_grad():
            k_all, v_all = heads(self.k(x_all)), heads(self.v(x_all))
        idx = sel[:, None, :, None].expand(-1, self.h, -1, self.hs)
        kk = k_all.scatter(2, idx, heads(self.k(x_sel)))
        vv = v_all.scatter(2, idx, heads(self.v(x_sel)))
        y = attention(heads(self.q(x_sel)), kk, vv, bias_sel.to(x_sel.dtype), self._p(), self.scale)
        return self.o(y.transpose(1, 2).reshape(B, k, self.h * self.hs))


class FeedForward(nn.Module):
    """relu/gelu: wo(act(wi x)); gated-gelu (T5 v1.1) and silu (Llama SwiGLU): wo(act(wi_0 x) * wi_1 x)."""

    def __init__(self, d: int, d_ff: int, act: str, bias: bool, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)  # after the activation, as T5DenseReluDense / T5DenseGatedGeluDense
        self.gated = act in ("gated-gelu", "silu")
        if self.gated:
            self.wi_0, self.wi_1 = nn.Linear(d, d_ff, bias=bias), nn.Linear(d, d_ff, bias=bias)
        else:
            self.wi = nn.Linear(d, d_ff, bias=bias)
        self.wo = nn.Linear(d_ff, d, bias=bias)
        self.act = {"relu": F.relu, "gelu": F.gelu, "gated-gelu": lambda x: F.gelu(x, approximate="tanh"),
                    "silu": F.silu}[act]

    def forward(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(self.drop(h))


class Block(nn.Module):
    """One side transformer block at width d/r, in the backbone family's own arrangement:
    T5 / decoder-only: pre-norm residual (self-attn, [cross-attn], FF); BERT: post-norm."""

    def __init__(self, spec: SideSpec, cross: bool, j: int = 0):
        super().__init__()
        d, f = spec.side_d, spec.family
        self.post_norm = f == "encoder"
        scale = 1.0 if f == "t5" else None  # T5 folds 1/sqrt(d_kv) into its weights
        bias = f == "encoder"
        pairs = spec.rope_pairs[j] if spec.rope_pairs else None  # decoder-only: block j's kept rotary pairs
        self.attn = Attention(d, spec.n_heads, spec.side_kv, bias or spec.qkv_bias, bias, spec.n_kv_heads, scale,
                              spec.attn_dropout, pairs, spec.d_kv)
        self.norm_attn = make_norm(spec, d)
        self.cross = Attention(d, spec.n_heads, spec.side_kv, False, False, 0, scale, spec.attn_dropout) if cross else None
        self.norm_cross = make_norm(spec, d) if cross else None
        self.ff = FeedForward(d, spec.side_ff, spec.act, bias, spec.ff_dropout)
        self.norm_ff = make_norm(spec, d)
        self.drop = nn.Dropout(spec.dropout)
        self.rope_theta = spec.rope_theta if f == "decoder" else None

    def forward(self, x, bias, enc=None, enc_bias=None, pos=None, past=None, kv_out=None):
        if self.post_norm:
            x = self.norm_attn(x + self.drop(self.attn(x, bias=bias)))
            return self.norm_ff(x + self.drop(self.ff(x)))
        x = x + self.drop(self.attn(self.norm_attn(x), bias=bias, rope_theta=self.rope_theta, pos=pos, past=past,
                                    kv_out=kv_out))
        if self.cross is not None:
            x = x + self.drop(self.cross(self.norm_cross(x), kv=enc, bias=enc_bias))
        return x + self.drop(self.ff(self.norm_ff(x)))

    def selective(self, x_sel, x_all, sel, bias_sel):
        """forward() at the selected positions (bidirectional self-attention blocks only)."""
        if self.post_norm:
            x = self.norm_attn(x_sel + self.drop(self.attn.selective(x_sel, x_all, sel, bias_sel)))
            return self.norm_ff(x + self.drop(self.ff(x)))
        with torch.no_grad():
            n_all = self.norm_attn(x_all)
        x = x_sel + self.drop(self.attn.selective(self.norm_attn(x_sel), n_all, sel, bias_sel))
        return x + self.drop(self.ff(self.norm_ff(x)))


class AdapterBlock(nn.Module):
    """Ablation (supplement Table 1): a two-layer bottleneck instead of a transformer block. The T5
    side decoder keeps its cross-attention, or it could not see the input at all."""

    def __init__(self, spec: SideSpec, cross: bool, j: int = 0):
        super().__init__()
        d = spec.side_d
        self.norm_ff = make_norm(spec, d)
        self.ff = FeedForward(d, spec.side_ff, "gelu" if spec.act.startswith("gated") else
                              ("relu" if spec.act == "relu" else "gelu"), True, spec.ff_dropout)
        self.cross = Attention(d, spec.n_heads, spec.side_kv, False, False, 0, None, spec.attn_dropout) if cross else None
        self.norm_cross = make_norm(spec, d) if cross else None
        self.drop = nn.Dropout(spec.dropout)

    def forward(self, x, bias, enc=None, enc_bias=None, pos=None, past=None, kv_out=None):
        if kv_out is not None:
            kv_out.append(None)  # no self-attention: positions never see each other, nothing to cache
        if self.cross is not None:
            x = x + self.drop(self.cross(self.norm_cross(x), kv=enc, bias=enc_bias))
        return x + self.drop(self.ff(self.norm_ff(x)))


class LowRankDown(nn.Module):
    """QST's downsampler (Zhang et al. 2024; YouAreSpecialToMe/QST, QSTConfig.py `AdapterLinear`, with the settings
    of its qst.py / glue_qst.py: activation "swish", add_layer_norm_after_adapter=True, before=False, no biases):
    d -> k -> d/r through SiLU, then a LayerNorm over d/r; k = peft_hidden_size (16 there). Parameters:
    d*k + k*d/r + 2*d/r instead of the linear ladder's (d + 1)*d/r. Both matrices kaiming-uniform, as there
    (nn.Linear's default init)."""

    def __init__(self, d: int, ds: int, k: int):
        super().__init__()
        self.a = nn.Linear(d, k, bias=False)
        self.b = nn.Linear(k, ds, bias=False)
        self.norm = nn.LayerNorm(ds)

    @property
    def weight(self):  # the dtype/device probe callers use on a Linear ladder
        return self.a.weight

    def forward(self, x):
        return self.norm(self.b(F.silu(self.a(x))))


def make_down(spec: SideSpec) -> nn.Module:
    """A ladder's down-projection d -> d/r: LST's Linear with bias (official code), or QST's low-rank one."""
    if spec.downsampler == "lowrank":
        return LowRankDown(spec.d_model, spec.side_d, spec.downsampler_rank)
    return nn.Linear(spec.d_model, spec.side_d)


class SideStack(nn.Module):
    """Side blocks for one backbone stack, with their ladders and gates."""

    def __init__(self, spec: SideSpec, stack: str, cross: bool):
        super().__init__()
        self.spec = spec
        n, ds = len(spec.layers_of(stack)), spec.side_d
        block = AdapterBlock if spec.variant == "adapter" else Block
        self.blocks = nn.ModuleList([block(spec, cross, j) for j in range(n)])
        self.emb_drop = nn.Dropout(spec.emb_dropout)
        self.ladder_drop = nn.Dropout(spec.ladder_dropout)  # 0 (identity) unless set: not an official site
        self.first_down = make_down(spec)  # ladder of the embedding output
        self.uses_ladders = spec.uses_ladders
        self.fuse_after = spec.variant == "fuse_after"
        if self.uses_ladders:
            self.downs = nn.ModuleList([make_down(spec) for _ in range(n)])  # Linear with bias, as the official code
        if spec.variant in ("ladder", "fuse_after", "adapter"):  # mu_j = sigmoid(alpha_j / T) weights the side state
            self.alpha = nn.Parameter(torch.zeros(n) if spec.gate == "lst"  # mu = sigmoid(0 / 0.1) = 0.5 at init
                                      else torch.full((n, ds), QST_LADDER_Z))  # qst: per dimension, T = 1
        if spec.variant == "cross_attention":
            self.ladder_attn = nn.ModuleList(
                [Attention(ds, spec.n_heads, spec.side_kv, False, False, 0, None, spec.attn_dropout) for _ in range(n)])
            self.ladder_norm = nn.ModuleList([make_norm(spec, ds) for _ in range(n)])
        self.final_norm = make_norm(spec, ds) if spec.family != "encoder" else None
        self.final_drop = nn.Dropout(spec.final_dropout)

    def gates(self):
        """(n,) or, gate qst, (n, d/r): mu_j for each ladder, the weight of the side state."""
        return torch.sigmoid(self.alpha / gate_temperature(self.spec))

    def fuse(self, j: int, x, ladder, bias, mu=None):
        """Side state x (B, T, d/r) combined with ladder j, the backbone state (B, T, d) it reads."""
        h = self.downs[j](self.ladder_drop(ladder.to(x.dtype)))  # (B, T, d/r)
        if mu is not None:
            return mu[j] * x + (1 - mu[j]) * h
        return x + self.ladder_attn[j](self.ladder_norm[j](x), kv=h, bias=bias)

    def forward(self, emb, ladders: list, bias, enc=None, enc_bias=None, pos=None, past=None, kv_out=None):
        """emb: (B, T, d) embedding output; ladders: per kept layer (B, T, d) backbone states; pos: positions
        (decoder-only RoPE: packed rows, continuations); past / kv_out: per block, a KV cache to attend after /
        a list collecting each block's keys and values (decoder-only; see Attention.forward)."""
        x = self.first_down(self.emb_drop(emb.to(self.first_down.weight.dtype)))  # (B, T, d/r)
        mu = self.gates() if hasattr(self, "alpha") else None
        for j, blk in enumerate(self.blocks):
            if self.uses_ladders and not self.fuse_after:
                x = self.fuse(j, x, ladders[j], bias, mu)  # ladder first, then the block (official order)
            x = blk(x, bias, enc, enc_bias, pos, past=None if past is None else past[j], kv_out=kv_out)
            if self.fuse_after:
                x = self.fuse(j, x, ladders[j], bias, mu)
        return self.final_drop(self.final_norm(x) if self.final_norm is not None else x)

    def selective(self, emb, ladders: list, bias, sel):
        """Token-selective forward: (B, k, d/r) outputs at the selected positions, with gradients, and
        (B, T, d/r) outputs of every position, without. Each block runs twice: once for all positions
        under no_grad, once for the selected ones; only the latter's activations are kept."""
        def rows(t):
            return t.gather(1, sel[..., None].expand(-1, -1, t.shape[-1]))

        H = self.blocks[0].attn.h
        full = bias.expand(sel.shape[0], H, bias.shape[-1], bias.shape[-1])
        bias_sel = full.gather(2, sel[:, None, :, None].expand(-1, H, -1, bias.shape[-1]))
        emb = self.emb_drop(emb.to(self.first_down.weight.dtype))
        x_sel = self.first_down(rows(emb))
        with torch.no_grad():
            x_all = self.first_down(emb)
        mu = self.gates() if hasattr(self, "alpha") else None

        def fuse(j):
            nonlocal x_sel, x_all
            h = self.ladder_drop(ladders[j].to(x_sel.dtype))
            x_sel = mu[j] * x_sel + (1 - mu[j]) * self.downs[j](rows(h))
            with torch.no_grad():
                x_all = mu[j] * x_all + (1 - mu[j]) * self.downs[j](h)

        for j, blk in enumerate(self.blocks):
            if self.uses_ladders and not self.fuse_after:
                fuse(j)
            with torch.no_grad():
                nxt = blk(x_all, bias)
            x_sel, x_all = blk.selective(x_sel, x_all, sel, bias_sel), nxt
            if self.fuse_after:
                fuse(j)
        if self.final_norm is not None:
            with torch.no_grad():
                x_all = self.final_norm(x_all)
            x_sel = self.final_norm(x_sel)
        return self.final_drop(x_sel), x_all


def select_positions(mask: torch.Tensor, k: int, generator: torch.Generator | None = None):
    """(B, k'+1) distinct positions per row: position 0, then up to k random real tokens, filled with
    padding positions when a row is short; and (B, k'+1) bool, True where the position is a real token.
    k' = min(k, T - 1), so k >= T - 1 selects every position (plain training)."""
    B, T = mask.shape
    kk = min(k, T - 1)
    noise = torch.rand(B, T, generator=generator).to(mask.device)
    key = noise + (~mask).float() * 2.0  # real tokens in random order, then padding
    key[:, 0] = -1.0  # always the first token ([CLS] / T5's first source token)
    sel = key.argsort(dim=1)[:, : kk + 1]
    return sel, mask.gather(1, sel)


# ---------------------------------------------------------------- masks and T5 position bias

def pad_bias(mask):
    """(B, S) bool -> (B, 1, 1, S) additive bias hiding padding keys."""
    return (~mask)[:, None, None, :].float() * NEG


def last_slots(batch, n: int) -> torch.Tensor:
    """(n,) flat index (into R * P, or B * T) of each example's last token."""
    if batch.seg is None:
        mask = batch.src_mask
        return torch.arange(mask.shape[0], device=mask.device) * mask.shape[1] + mask.long().sum(1) - 1
    seg = batch.seg.reshape(-1)
    flat = torch.arange(seg.shape[0], device=seg.device)
    valid = seg >= 0
    return torch.zeros(n, dtype=torch.long, device=seg.device).scatter_reduce(0, seg[valid], flat[valid], "amax")


def example_slots(batch, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, L) flat slot (into R * P, or B * T) of each example's tokens in order, and (n, L) bool: a real token.
    L = the longest example; padded batches give slot e * T + t, packed ones gather each example's slots."""
    if batch.seg is None:
        B, T = batch.src_mask.shape
        idx = torch.arange(B * T, device=batch.src_mask.device).view(B, T)
        return idx[:n], batch.src_mask[:n]
    seg, pos = batch.seg.reshape(-1), batch.pos.reshape(-1)
    valid = seg >= 0
    L = int(pos[valid].max()) + 1
    idx = torch.zeros(n, L, dtype=torch.long, device=seg.device)
    mask = torch.zeros(n, L, dtype=torch.bool, device=seg.device)
    flat = torch.arange(seg.shape[0], device=seg.device)
    idx[seg[valid], pos[valid]] = flat[valid]
    mask[seg[valid], pos[valid]] = True
    return idx, mask


def example_rows(batch, n: int) -> torch.Tensor:
    """(n,) packed row that holds each example."""
    R, P = batch.seg.shape
    row = torch.arange(R, device=batch.seg.device)[:, None].expand(R, P).reshape(-1)
    seg = batch.seg.reshape(-1)
    valid = seg >= 0
    return torch.zeros(n, dtype=torch.long, device=seg.device).scatter_reduce(0, seg[valid], row[valid], "amax")


def causal_bias(t: int, device):
    return torch.triu(torch.full((t, t), NEG, device=device), diagonal=1)[None, None]  # (1, 1, T, T)


def relative_buckets(rel, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's log-spaced relative position buckets (Raffel et al. 2020, as in mesh-tensorflow)."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(rel.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(rel < max_exact, rel, large)


# ---------------------------------------------------------------- the network

@dataclass
class SideOutput:
    loss: torch.Tensor | None
    scores: torch.Tensor | None  # (B, C) class logits / candidate log-likelihoods, or (B, 1) regression
    terms: torch.Tensor | int = 0  # how many terms `loss` is the mean of: examples, or target / answer tokens


class SideNetwork(nn.Module):
    """Trainable side network plus the frozen tensors it reuses (buffers, never saved with it).

    frozen: {"embed": (V, d)} for T5 / decoder-only (input embeddings, also the tied LM head),
            {"lm_head": (V, d)} when the head is untied, {"final_norm_src"/"final_norm_tgt": (d,)}
            (the backbone's final norm of the stack that feeds the head) for late fusion on T5 / decoder-only.
    """

    def __init__(self, spec: SideSpec, frozen: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.spec = spec
        frozen = frozen or {}
        self.src = SideStack(spec, SRC, cross=False)
        self.tgt = SideStack(spec, TGT, cross=True) if spec.family == "t5" else None
        self.up = nn.Linear(spec.side_d, spec.d_model)
        if spec.mixes_final:  # g = sigmoid(late_alpha / T) weights up(side), 1 - g the backbone's final state
            # lst: official merge_last, g = sigmoid(0 / 0.1) = 0.5 at init. qst: QST's lm_head_z = 1.0 per dimension
            # on the backbone's side, i.e. g = 1 - sigmoid(z) = sigmoid(-z): late_alpha = -z. QST's own gate is
            # trained only when the model sits on the CPU (`nn.Parameter(...).to(cuda)` returns an unregistered
            # copy); here it is always trained, as on QST's CPU path.
            self.late_alpha = nn.Parameter(torch.zeros(1) if spec.gate == "lst"
                                           else torch.full((spec.d_model,), -QST_FINAL_Z))
        if spec.family == "t5":
            self.rel_src = nn.Embedding(spec.rel_buckets, spec.n_heads)  # copied unpruned from the backbone
            self.rel_tgt = nn.Embedding(spec.rel_buckets, spec.n_heads)
        if spec.family == "encoder":
            self.head = nn.Linear(spec.d_model, spec.num_labels)
        for name, t in frozen.items():
            self.register_buffer(name, t.detach().clone(), persistent=False)
        missing = [k for k in self.required_frozen() if k not in frozen]
        if missing:
            raise ConfigError(f"side network: frozen tensors {missing} were not given (load them from the backbone)")

    def required_frozen(self) -> list[str]:
        s = self.spec
        req = [] if s.family == "encoder" else ["embed"]
        if s.mixes_final and s.family != "encoder":
            req.append(f"final_norm_{s.late_stack}")
        return req

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # -- helpers
    def _embed(self, ids):
        return F.embedding(ids, self.embed)

    def _rel_bias(self, table: nn.Embedding, q: int, k: int, bidirectional: bool, device):
        rel = torch.arange(k, device=device)[None, :] - torch.arange(q, device=device)[:, None]
        b = relative_buckets(rel, bidirectional, self.spec.rel_buckets, self.spec.rel_max_distance)
        return table(b).permute(2, 0, 1)[None]  # (1, H, q, k)

    def _ladders(self, states: dict, stack: str) -> tuple[torch.Tensor | None, list]:
        """The embedding output (encoder-only: stored; else None, recomputed from ids) and the ladder states."""
        s = self.spec
        emb = states[state_name(stack, EMB)] if s.family == "encoder" else None
        if not s.uses_ladders:
            return emb, []
        return emb, [states[state_name(stack, k)] for k in s.layers_of(stack)]

    def _late(self, x_up, h_last):
        """Side-Tuning's late fusion (official `merge_last`), also the QST-style mix_final on top of the
        ladders: g * up(side) + (1 - g) * the backbone's final state, g = sigmoid(alpha / T). T5 / decoder-only:
        the final state is after the backbone's own final RMSNorm (HF's last_hidden_state); BERT's last block
        already ends in a LayerNorm."""
        h = h_last.to(x_up.dtype)
        if self.spec.family != "encoder":
            w = getattr(self, f"final_norm_{self.spec.late_stack}")
            h = w * (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + self.spec.norm_eps)).to(h.dtype)
        g = torch.sigmoid(self.late_alpha / gate_temperature(self.spec))
        return g * x_up + (1 - g) * h

    def _last_state(self, states, stack):
        return states[state_name(stack, self.spec.n_layers - 1)]

    def _lm_logits(self, x):
        if self.spec.tie_scale:
            x = x * self.spec.d_model ** -0.5
        head = self.lm_head if hasattr(self, "lm_head") else self.embed
        return x @ head.to(x.dtype).T  # (..., V)

    def _src_bias(self, batch):
        """Additive attention bias of the source stack: (B, 1|H, 1|T, T) padded, (R, 1|H, P, P) packed."""
        s, ids, mask = self.spec, batch.src_ids, batch.src_mask
        T, dev = ids.shape[1], ids.device
        if batch.seg is None:
            bias = pad_bias(mask)
            if s.family == "t5":
                return bias + self._rel_bias(self.rel_src, T, T, True, dev)
            return bias + causal_bias(T, dev) if s.family == "decoder" else bias
        seg = batch.seg  # packed: attend within the example only, positions restart per example
        keep = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0)  # (R, P, P)
        if s.family == "decoder":
            keep = keep & torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        bias = torch.where(keep, 0.0, NEG)[:, None]  # (R, 1, P, P)
        if s.family == "t5":
            rel = batch.pos[:, None, :] - batch.pos[:, :, None]  # (R, P, P) key - query position
            b = relative_buckets(rel, True, s.rel_buckets, s.rel_max_distance)
            bias = bias + self.rel_src(b).permute(0, 3, 1, 2)  # (R, H, P, P)
        return bias

    def forward(self, batch) -> SideOutput:
        s = self.spec
        ids, mask = batch.src_ids, batch.src_mask  # (B, T) padded, (R, P) packed
        packed = batch.seg is not None
        emb, ladders = self._ladders(batch.states, SRC)
        if emb is None:
            emb = self._embed(ids)
        bias = self._src_bias(batch)
        selective = self.training and s.select_k > 0
        kvs = None
        if selective and packed:
            raise ConfigError("select_k: token-selective training takes padded batches; turn packing off")
        if selective:  # token-selective training: only k source positions keep activations for backward
            sel, sel_mask = select_positions(mask, s.select_k)
            x_sel, x = self.src.selective(emb, ladders, bias, sel)
            if s.family == "t5":  # the side decoder sees every position; only the selected carry grad
                x = x.scatter(1, sel[..., None].expand(-1, -1, x.shape[-1]), x_sel)
        else:
            kvs = [] if s.continuation else None  # decoder-only: the prompt's KV cache for the candidate pass
            x = self.src(emb, ladders, bias, pos=batch.pos if packed else None, kv_out=kvs)  # (B, T, d/r)
        n_ex = batch.labels.shape[0] if batch.labels is not None else (
            int(batch.seg.max()) + 1 if packed else ids.shape[0])

        if s.family == "encoder":
            x, mask = (x_sel, sel_mask) if selective else (x, mask)  # training pools the selected positions
            h = self.up(x)  # (B, T, d)
            if s.mixes_final:
                h_last = self._last_state(batch.states, SRC)
                if selective:
                    h_last = h_last.gather(1, sel[..., None].expand(-1, -1, h_last.shape[-1]))
                h = self._late(h, h_last)
            m = mask.unsqueeze(-1).to(h.dtype)
            if packed:  # mean over each example's slots: (n, d)
                seg = batch.seg.clamp(min=0).reshape(-1)
                # out of place: the sweep's stacked training runs this under torch.func.vmap
                tot = h.new_zeros(n_ex, h.shape[-1]).index_add(0, seg, (h * m).reshape(-1, h.shape[-1]))
                cnt = m.new_zeros(n_ex).index_add(0, seg, m.reshape(-1))
                pooled = tot / cnt.clamp(min=1)[:, None]
            else:
                pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)  # mean pooling, as sentence-transformers MiniLM
            scores = self.head(pooled)  # (B, C) or (B, 1)
            return SideOutput(self._head_loss(scores, batch.labels), scores, n_ex)

        if s.family == "decoder":
            return self._decoder_head(batch, x, kvs, n_ex)

        # T5: side decoder over each target row, cross-attending to its source example's side encoder output
        rows = batch.tgt_row  # (N,) which example each target row belongs to
        if packed:
            row_of = example_rows(batch, n_ex)  # (B,) packed row holding each example
            enc, enc_mask = x[row_of[rows]], batch.seg[row_of[rows]] == rows[:, None]  # (N, P, d/r), (N, P)
        else:
            enc, enc_mask = x[rows], mask[rows]  # (N, T, d/r)
        t_ids, t_mask = batch.tgt_ids, batch.tgt_mask  # (N, U)
        _, t_ladders = self._ladders(batch.states, TGT)
        U = t_ids.shape[1]
        t_bias = pad_bias(t_mask) + causal_bias(U, t_ids.device) + self._rel_bias(self.rel_tgt, U, U, False, t_ids.device)
        y = self.tgt(self._embed(t_ids), t_ladders, t_bias, enc=enc, enc_bias=pad_bias(enc_mask))
        h = self.up(y)  # (N, U, d)
        if s.mixes_final:
            h = self._late(h, self._last_state(batch.states, TGT))
        logits = self._lm_logits(h).float()  # (N, U, V)
        tok_nll = F.cross_entropy(logits.transpose(1, 2), batch.tgt_labels, ignore_index=-100, reduction="none")  # (N, U)
        terms = (batch.tgt_labels != -100).sum()
        loss = tok_nll.sum() / terms.clamp(min=1)
        seq_ll = -tok_nll.sum(1)  # (N,) log p(candidate | source)
        scores = seq_ll.view(-1, batch.n_candidates) if batch.n_candidates else None
        return SideOutput(loss, scores, terms)

    # -- decoder-only: candidate log-likelihoods, answer loss, generation
    def _decoder_head(self, batch, x, kvs, n_ex) -> SideOutput:
        s = self.spec
        if s.kind == "generation":
            return self._answer_loss(batch, x, n_ex)
        flat = x.reshape(-1, x.shape[-1])
        last = last_slots(batch, n_ex)  # (n,) flat slot of each example's last prompt token
        rows = batch.tgt_row  # (N,) example of each candidate row
        h_last = self._last_state(batch.states, SRC) if s.mixes_final else None
        pieces = [self._mix(self.up(flat[last]), h_last, last)[rows][:, None]]  # (N, 1, d): scores token 0
        if batch.tgt_ids.shape[1]:  # candidates longer than one token: their positions after the prompt
            y = self._continue(batch, kvs, rows, n_ex)  # (N, U, d/r)
            t_last = self._last_state(batch.states, TGT) if s.mixes_final else None
            pieces.append(self._mix(self.up(y), t_last))
        logits = self._lm_logits(torch.cat(pieces, 1)).float()  # (N, U + 1, V)
        tok_nll = F.cross_entropy(logits.transpose(1, 2), batch.tgt_labels, ignore_index=-100, reduction="none")
        terms = (batch.tgt_labels != -100).sum()
        loss = tok_nll.sum() / terms.clamp(min=1)
        seq_ll = -tok_nll.sum(1)  # (N,) log p(candidate | prompt), every token of it
        scores = seq_ll.view(-1, batch.n_candidates) if batch.n_candidates else None
        return SideOutput(loss, scores, terms)

    def _mix(self, h, h_last, index=None):
        """mix_final on the up-projected side output h; h_last (.., d) the backbone's last-layer states at the same
        positions (flat slots `index` of them when given)."""
        if h_last is None:
            return h
        if index is not None:
            h_last = h_last.reshape(-1, h_last.shape[-1])[index]
        return self._late(h, h_last)

    def _continue(self, batch, kvs, rows, n_ex: int):
        """The side stack over each candidate's tokens, attending to its example's prompt through the prompt
        pass's keys and values (a KV cache): the same computation as one causal pass over prompt + candidate,
        without repeating the prompt per candidate (tested against that)."""
        idx, ex_mask = example_slots(batch, n_ex)  # (n, L) slot of each token of each example
        past = []
        for kv in kvs:
            if kv is None:
                past.append(None)
                continue
            k, v = kv  # (R, Hkv, P, hs)
            R, H, P, hs = k.shape

            def per_example(t):
                t = t.transpose(1, 2).reshape(R * P, H, hs)[idx]  # (n, L, Hkv, hs)
                return t.transpose(1, 2)[rows]  # (N, Hkv, L, hs)
            past.append((per_example(k), per_example(v)))
        t_ids = batch.tgt_ids  # (N, U); padded candidate slots come after real ones, so the causal mask hides them
        U = t_ids.shape[1]
        start = ex_mask.long().sum(1)[rows]  # (N,) prompt length: the candidate's first position
        pos = start[:, None] + torch.arange(U, device=t_ids.device)[None, :]
        prompt_keys = pad_bias(ex_mask[rows]).expand(-1, -1, U, -1)  # (N, 1, U, L)
        own = causal_bias(U, t_ids.device).expand(t_ids.shape[0], -1, -1, -1)  # (N, 1, U, U)
        bias = torch.cat([prompt_keys, own], -1)
        _, ladders = self._ladders(batch.states, TGT)
        return self.src(self._embed(t_ids), ladders, bias, pos=pos, past=past)

    def _answer_loss(self, batch, x, n_ex) -> SideOutput:
        """Generation: causal-LM loss on the answer tokens (batch.lm_labels), averaged over them. Scores (n, 3) per
        example: [1 if every answer token is the argmax (greedy decoding reproduces the answer exactly), summed
        answer NLL, answer tokens]."""
        h = self._mix(self.up(x), self._last_state(batch.states, SRC) if self.spec.mixes_final else None)
        logits = self._lm_logits(h).float()  # (R, P, V)
        labels = batch.lm_labels
        tok_nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")  # (R, P)
        is_ans = labels != -100
        terms = is_ans.sum()
        loss = tok_nll.sum() / terms.clamp(min=1)
        wrong = ((logits.argmax(-1) != labels) & is_ans).float()
        seg = batch.seg if batch.seg is not None else torch.where(
            batch.src_mask, torch.arange(x.shape[0], device=x.device)[:, None], -1)
        ex = seg.clamp(min=0).reshape(-1)

        def per_example(t):
            return t.new_zeros(n_ex).index_add(0, ex, (t * (seg >= 0)).reshape(-1))
        scores = torch.stack([(per_example(wrong) == 0).float(), per_example(tok_nll), per_example(is_ans.float())], 1)
        return SideOutput(loss, scores, terms)

    @torch.no_grad()
    def step_logits(self, ids, states: dict, pos: int, cache: list | None) -> tuple[torch.Tensor, list]:
        """Incremental decoding (decoder-only): logits (B, T, V) of new tokens ids (B, T) at positions pos..pos+T-1,
        with their backbone states {name: (B, T, d)}, attending to `cache` (per block (k, v) of the earlier
        positions, None at the start). Returns the logits and the cache extended by these positions."""
        T = ids.shape[1]
        past = cache
        S0 = 0 if cache is None or cache[0] is None else cache[0][0].shape[2]
        bias = torch.cat([torch.zeros(1, 1, T, S0, device=ids.device), causal_bias(T, ids.device)], -1)
        p = torch.arange(pos, pos + T, device=ids.device)[None, :].expand(ids.shape[0], -1)
        _, ladders = self._ladders(states, SRC)
        kv_out: list = []
        x = self.src(self._embed(ids), ladders, bias, pos=p, past=past, kv_out=kv_out)
        h = self._mix(self.up(x), self._last_state(states, SRC) if self.spec.mixes_final else None)
        return self._lm_logits(h).float(), kv_out

    def _head_loss(self, scores, labels):
        if labels is None:
            return None
        if self.spec.kind == "regression":
            return F.mse_loss(scores.squeeze(-1).float(), labels.float())
        return F.cross_entropy(scores.float(), labels.long())


def build_side(spec: SideSpec, frozen, init: str, seed: int, weights=None, importance=None) -> SideNetwork:
    """A side network: random init, then (magnitude / Fisher) the pruned backbone tensors copied in (decoder-only:
    with the kept rotary pairs recorded in the spec, spec.rope_pairs)."""
    sd = None
    if init != "random":
        if weights is None:
            raise ConfigError(f"init: {init} needs the backbone weights (or a side_init file)")
        sd, idx = prune.pruned_state(spec, weights, importance if importance is not None else weights)
        spec.rope_pairs = prune.rope_pairs(spec, idx)
    torch.manual_seed(seed)
    net = SideNetwork(spec, frozen)
    if sd is not None:
        missing = set(sd) - set(net.state_dict())
        if missing:
            raise ConfigError(f"internal: pruned tensors without a side parameter: {sorted(missing)[:5]}")
        net.load_state_dict(sd, strict=False)
    return net
