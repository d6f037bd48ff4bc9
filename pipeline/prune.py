"""Structural init of the side network from the backbone (paper sec. 3.3), and empirical Fisher.

For each weight W (d_out x d_in) with importance I (I = W for magnitude, I = mean over N examples of
(d log p(y|x) / dW)^2 for Fisher), rows are scored by sum_j |I_ij| (an L1 norm) and the top d_out / r are
kept; the next weight keeps the matching input columns.

Where the index choice differs from the official code, and why. The official `pruning_v2`
(ylsung/Ladder-Side-Tuning, seq2seq/pruning/pruning_methods.py, `pruning_without_residual`, version 2)
walks one chain through the whole T5: embedding columns, then for each block [q, k, v] (columns by the
previous indices, rows by the L1 of the elementwise PRODUCT of the three importances, chosen globally over
all heads), then o (rows chosen afresh), the next layer norm by o's indices, then wi, wo, and so on. So
(1) every sublayer picks its own residual-stream dimensions: block j's attention output writes into the
coordinates o_j picked while the next sublayer reads the ones wo_{j-1} picked. A residual stream is a sum
over layers; with different coordinates per sublayer the pruned sublayers add into misaligned dimensions.
Here one set R of d_model / r residual dimensions serves the whole side net, scored by the rows of every
matrix that writes into the residual stream (attention outputs, cross-attention outputs and FF outputs of
every kept layer, both T5 stacks). (2) Attention rows: the official global top rows of q*k*v can leave a
head with more or fewer than d_kv / r dimensions, which breaks the side net's head layout (n_heads heads of
d_kv / r each); here each head keeps its own top d_kv / r dimensions, scored by the SUM of the q, k and v
row scores (a product of importances is dominated by whichever of the three is near zero). Each FF keeps
its top d_ff / r units (rows of wi; of wi_0 + wi_1 when gated).
Decoder-only models share one set of head dimensions across heads, chosen in rotate-half pairs so
rotary position embedding still rotates matching coordinates, and kv heads (GQA) use the same set.
Only kept layers are pruned (layer dropping, sec. 3.4); the T5 decoder may keep its own list.

Fisher needs gradients through the backbone, so it runs where the backbone lives (prune_init stage).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.durable import atomic_path
from pipeline.errors import ConfigError, FingerprintMismatch
from pipeline.layout import SRC, TGT
from pipeline.side_spec import SideSpec

ATTN = ("q", "k", "v", "o")


def _hf_prefix(spec: SideSpec, stack: str, k: int) -> str:
    if spec.family == "t5":
        return f"{'encoder' if stack == SRC else 'decoder'}.block.{k}"
    if spec.family == "encoder":
        return f"encoder.layer.{k}"
    return f"model.layers.{k}"


def layer_map(spec: SideSpec, stack: str, k: int) -> dict[str, str]:
    """Side-block parameter (relative to the block) -> backbone key, for backbone layer k."""
    p = _hf_prefix(spec, stack, k)
    m: dict[str, str] = {}
    if spec.family == "t5":
        for n in ATTN:
            m[f"attn.{n}.weight"] = f"{p}.layer.0.SelfAttention.{n}.weight"
        m["norm_attn.weight"] = f"{p}.layer.0.layer_norm.weight"
        ff = 1
        if stack == TGT:
            for n in ATTN:
                m[f"cross.{n}.weight"] = f"{p}.layer.1.EncDecAttention.{n}.weight"
            m["norm_cross.weight"] = f"{p}.layer.1.layer_norm.weight"
            ff = 2
        names = ("wi_0", "wi_1", "wo") if spec.act == "gated-gelu" else ("wi", "wo")
        for n in names:
            m[f"ff.{n}.weight"] = f"{p}.layer.{ff}.DenseReluDense.{n}.weight"
        m["norm_ff.weight"] = f"{p}.layer.{ff}.layer_norm.weight"
    elif spec.family == "encoder":
        for n, hf in zip(ATTN, ("attention.self.query", "attention.self.key", "attention.self.value",
                                "attention.output.dense")):
            m[f"attn.{n}.weight"], m[f"attn.{n}.bias"] = f"{p}.{hf}.weight", f"{p}.{hf}.bias"
        m["norm_attn.weight"], m["norm_attn.bias"] = f"{p}.attention.output.LayerNorm.weight", f"{p}.attention.output.LayerNorm.bias"
        m["ff.wi.weight"], m["ff.wi.bias"] = f"{p}.intermediate.dense.weight", f"{p}.intermediate.dense.bias"
        m["ff.wo.weight"], m["ff.wo.bias"] = f"{p}.output.dense.weight", f"{p}.output.dense.bias"
        m["norm_ff.weight"], m["norm_ff.bias"] = f"{p}.output.LayerNorm.weight", f"{p}.output.LayerNorm.bias"
    else:
        for n in ATTN:
            m[f"attn.{n}.weight"] = f"{p}.self_attn.{n}_proj.weight"
            if spec.qkv_bias and n != "o":
                m[f"attn.{n}.bias"] = f"{p}.self_attn.{n}_proj.bias"
        m["norm_attn.weight"] = f"{p}.input_layernorm.weight"
        m["ff.wi_0.weight"], m["ff.wi_1.weight"] = f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"
        m["ff.wo.weight"] = f"{p}.mlp.down_proj.weight"
        m["norm_ff.weight"] = f"{p}.post_attention_layernorm.weight"
    return m


def normalize_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop task-model wrappers ('bert.') so keys match layer_map."""
    return {k[5:] if k.startswith("bert.") else k: v for k, v in sd.items()}


def _rowscore(I: torch.Tensor) -> torch.Tensor:
    return I.abs().float().sum(-1) if I.dim() == 2 else I.abs().float()


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores, k).indices).values


def select_indices(spec: SideSpec, imp: dict[str, torch.Tensor]) -> dict:
    """Kept indices: 'R' residual dims, and per (stack, layer): 'H' attention rows, 'F' FF units."""
    d, hs = spec.d_model, spec.d_kv
    res = torch.zeros(d)
    for stack in spec.stacks:
        for k in spec.layers_of(stack):
            m = layer_map(spec, stack, k)
            for key in ("attn.o.weight", "ff.wo.weight", "cross.o.weight"):
                if key in m:
                    res += _rowscore(imp[m[key]])
    out = {"R": _top(res, spec.side_d)}
    for stack in spec.stacks:
        for k in spec.layers_of(stack):
            m = layer_map(spec, stack, k)
            for part in ("attn", "cross"):
                if f"{part}.q.weight" not in m:
                    continue
                q = _rowscore(imp[m[f"{part}.q.weight"]]).view(spec.n_heads, hs)
                if spec.family == "decoder":
                    kv = sum(_rowscore(imp[m[f"{part}.{n}.weight"]]).view(-1, hs).sum(0) for n in ("k", "v"))
                    s = q.sum(0) + kv  # (hs,) shared across heads
                    pair = s[: hs // 2] + s[hs // 2:]  # rotate-half partners chosen together
                    half = _top(pair, spec.side_kv // 2)
                    out[(stack, k, part, "pairs")] = half  # their rotary frequencies go with them (rope_pairs)
                    dims = torch.cat([half, half + hs // 2])
                    out[(stack, k, part, "q")] = torch.cat([h * hs + dims for h in range(spec.n_heads)])
                    nkv = spec.n_kv_heads or spec.n_heads
                    out[(stack, k, part, "kv")] = torch.cat([h * hs + dims for h in range(nkv)])
                else:
                    s = q + sum(_rowscore(imp[m[f"{part}.{n}.weight"]]).view(spec.n_heads, hs) for n in ("k", "v"))
                    rows = torch.cat([h * hs + _top(s[h], spec.side_kv) for h in range(spec.n_heads)])
                    out[(stack, k, part, "q")] = out[(stack, k, part, "kv")] = rows
            wi = [n for n in ("ff.wi.weight", "ff.wi_0.weight", "ff.wi_1.weight") if n in m]
            out[(stack, k, "F")] = _top(sum(_rowscore(imp[m[n]]) for n in wi), spec.side_ff)
    return out


def _slice(name: str, W: torch.Tensor, idx: dict, stack: str, k: int) -> torch.Tensor:
    R = idx["R"]
    part = name.split(".")[0]
    if part in ("norm_attn", "norm_ff", "norm_cross"):
        return W[R]
    if part in ("attn", "cross"):
        proj = name.split(".")[1]
        rows = idx[(stack, k, part, "q" if proj in ("q", "o") else "kv")]
        if proj == "o":
            return W[R][:, rows] if W.dim() == 2 else W[R]
        return W[rows][:, R] if W.dim() == 2 else W[rows]
    F = idx[(stack, k, "F")]
    if name.startswith("ff.wo"):
        return W[R][:, F] if W.dim() == 2 else W[R]
    return W[F][:, R] if W.dim() == 2 else W[F]


def rope_pairs(spec: SideSpec, idx: dict) -> list[list[int]] | None:
    """Decoder-only: the backbone rotary pairs each side block kept (SideSpec.rope_pairs), so the side net rotates
    them at their own frequencies (pipeline/side.py `rope`). A side head of d_kv / r dims holds d_kv / (2r) pairs,
    so r must divide d_kv (SideSpec checks it) and d_kv / r must be even."""
    if spec.family != "decoder":
        return None
    return [[int(p) for p in idx[(SRC, k, "attn", "pairs")]] for k in spec.layers]


def pruned_state(spec: SideSpec, weights: dict[str, torch.Tensor], importance: dict[str, torch.Tensor]):
    """Side-network tensors sliced from the backbone (block weights, norms, T5 position-bias tables)."""
    weights, importance = normalize_keys(weights), normalize_keys(importance)
    idx = select_indices(spec, importance)
    sd = {}
    for stack in spec.stacks:
        for j, k in enumerate(spec.layers_of(stack)):
            for name, key in layer_map(spec, stack, k).items():
                sd[f"{stack}.blocks.{j}.{name}"] = _slice(name, weights[key].float(), idx, stack, k).clone()
        fn = {"t5": f"{'encoder' if stack == SRC else 'decoder'}.final_layer_norm.weight",
              "decoder": "model.norm.weight"}.get(spec.family)
        if fn:
            sd[f"{stack}.final_norm.weight"] = weights[fn].float()[idx["R"]].clone()
        if spec.family == "t5":
            p = "encoder" if stack == SRC else "decoder"
            sd[f"rel_{stack}.weight"] = weights[f"{p}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].float().clone()
    if spec.variant == "adapter":  # adapter blocks have no attention to take from the backbone
        sd = {k: v for k, v in sd.items() if ".attn." not in k and "norm_attn" not in k and ".ff.wi_" not in k}
    return sd, idx


# ---------------------------------------------------------------- empirical Fisher

class _PerExampleSquares:
    """Hooks on nn.Linear layers accumulating sum_n (dL_n/dW)^2, with dL_n/dW = sum_t g_nt a_nt^T computed
    per example from the layer's input a and output gradient g (exact when the batch loss is a sum of
    per-example losses, as here)."""

    def __init__(self, modules: dict[str, nn.Linear]):
        self.sq = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in modules.items()}
        self.sq_b = {n: torch.zeros_like(m.bias, dtype=torch.float32) for n, m in modules.items() if m.bias is not None}
        self.acts, self.handles = {}, []
        for n, m in modules.items():
            self.handles.append(m.register_forward_hook(self._fwd(n)))
            self.handles.append(m.register_full_backward_hook(self._bwd(n)))

    def _fwd(self, n):
        def fn(mod, args, out):
            self.acts[n] = args[0].detach()
        return fn

    def _bwd(self, n):
        def fn(mod, gin, gout):
            a, g = self.acts[n].float(), gout[0].detach().float()  # (B, T, in), (B, T, out)
            if a.dim() == 2:
                a, g = a[:, None], g[:, None]
            per = torch.einsum("bto,bti->boi", g, a)  # (B, out, in) per-example gradients
            self.sq[n] += per.pow(2).sum(0)
            if n in self.sq_b:
                self.sq_b[n] += g.sum(1).pow(2).sum(0)
        return fn

    def close(self):
        for h in self.handles:
            h.remove()


def example_log_likelihood(bb, batch, probe=None) -> torch.Tensor:
    """(B,) log p(y | x) under the frozen backbone (+ a fitted probe for encoder-only models)."""
    ids, mask = batch["ids"].to(bb.device), batch["mask"].to(bb.device)
    if bb.family == "t5":
        out = bb.model(input_ids=ids, attention_mask=mask, labels=batch["tgt"].to(bb.device))
        lp = torch.log_softmax(out.logits.float(), -1)
        t = batch["tgt"].to(bb.device)
        tok = lp.gather(-1, t.clamp(min=0)[..., None])[..., 0] * (t != -100)
        return tok.sum(1)
    if bb.family == "decoder":  # ids = prompt + target tokens; tgt marks the target tokens (-100 elsewhere)
        logits = bb.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1)  # position t scores token t + 1
        t = batch["tgt"][:, 1:].to(bb.device)
        return (lp.gather(-1, t.clamp(min=0)[..., None])[..., 0] * (t != -100)).sum(1)
    h = bb.model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask[..., None].float()
    pooled = (h * m).sum(1) / m.sum(1)
    z = probe(pooled)
    y = batch["labels"].to(bb.device)
    if z.shape[-1] == 1:
        return -0.5 * (z[:, 0] - y).pow(2)  # Gaussian log-likelihood up to a constant
    return torch.log_softmax(z, -1).gather(-1, y.long()[:, None])[:, 0]


def fit_probe(bb, batches, kind: str) -> nn.Linear:
    """Linear probe on mean-pooled final states (encoder-only Fisher needs some p(y|x))."""
    from sklearn.linear_model import LogisticRegression, Ridge

    X, Y = [], []
    with torch.no_grad():
        for b in batches:
            h = bb.model(input_ids=b["ids"].to(bb.device), attention_mask=b["mask"].to(bb.device)).last_hidden_state
            m = b["mask"][..., None].float().to(bb.device)
            X.append(((h * m).sum(1) / m.sum(1)).float().cpu().numpy())
            Y.append(b["labels"].numpy())
    X, Y = np.concatenate(X), np.concatenate(Y)
    if kind == "regression":
        model = Ridge(alpha=1.0).fit(X, Y)
        W, c = model.coef_[None], np.atleast_1d(model.intercept_)
    else:
        model = LogisticRegression(max_iter=500).fit(X, Y.astype(int))
        W, c = model.coef_, model.intercept_
        if W.shape[0] == 1:  # binary: two-logit form
            W, c = np.concatenate([-W / 2, W / 2]), np.array([-c[0] / 2, c[0] / 2])
    probe = nn.Linear(X.shape[1], W.shape[0]).to(bb.device)
    with torch.no_grad():
        probe.weight.copy_(torch.from_numpy(W).float())
        probe.bias.copy_(torch.from_numpy(c).float())
    return probe


def fisher_importance(bb, batches, kind: str = "classification") -> tuple[dict[str, torch.Tensor], int]:
    """Empirical Fisher of every Linear weight in the backbone's blocks: mean_n (d log p(y_n|x_n)/dW)^2."""
    probe = fit_probe(bb, batches, kind) if bb.family == "encoder" else None
    linears = {n: m for n, m in bb.model.named_modules() if isinstance(m, nn.Linear) and
               any(s in n for s in (".layer.", ".block.", ".layers."))}
    for m in linears.values():
        m.weight.requires_grad_(True)
    acc = _PerExampleSquares(linears)
    n = 0
    try:
        for b in batches:
            bb.model.zero_grad(set_to_none=True)
            example_log_likelihood(bb, b, probe).sum().backward()
            n += b["ids"].shape[0]
    finally:
        acc.close()
        for m in linears.values():
            m.weight.requires_grad_(False)
            m.weight.grad = None
    imp = {f"{k}.weight": v / n for k, v in acc.sq.items()}
    imp.update({f"{k}.bias": v / n for k, v in acc.sq_b.items()})
    return imp, n


# ---------------------------------------------------------------- side_init files

# what a side init must share with the run that loads it: the backbone, the side net's shape, and the task
# (name, and the hash of its whole train split, which stage one records in every store as train_hash)
INIT_FIELDS = ("backbone", "backbone_sha256", "family", "r", "layers", "decoder_layers", "variant", "d_model",
               "task", "train_hash")


def init_fingerprint(spec: SideSpec, backbone: str, sha: str, init: str, n: int, task: str,
                     train_hash: str | None) -> dict:
    dec = "same" if spec.dec_layers is None else ",".join(map(str, spec.dec_layers))
    return {"backbone": backbone, "backbone_sha256": sha, "family": spec.family, "r": spec.r,
            "layers": ",".join(map(str, spec.layers)), "decoder_layers": dec, "variant": spec.variant,
            "d_model": spec.d_model, "init": init, "fisher_samples": n, "task": task, "train_hash": train_hash}


def save_side_init(path: str | Path, tensors: dict[str, torch.Tensor], spec: SideSpec, fp: dict) -> None:
    """The pruned tensors (none for a random init) with the spec and fingerprint they were made for. What is
    not pruned from the backbone (ladders, gates, up-projection, head) is drawn by train_side from its own
    seed, as the official code draws it from the training seed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"fingerprint": json.dumps(fp, sort_keys=True), "spec": spec.to_json()}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


def load_side_init(path: str | Path, expect: dict) -> tuple[dict, dict]:
    """(tensors, fingerprint) of a side_init file made for `expect` (INIT_FIELDS compared); the fingerprint also
    carries `rope_pairs` (decoder-only: the rotary pairs the pruned heads kept, from the file's spec)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"side_init: {path} does not exist; run the prune_init stage or use --init random")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    fp = json.loads(meta.get("fingerprint", "{}"))
    diffs = {k: (fp.get(k), expect[k]) for k in INIT_FIELDS if k in expect and fp.get(k) != expect[k]}
    if diffs:
        raise FingerprintMismatch(f"side_init {path}", diffs)
    spec = json.loads(meta.get("spec", "{}"))
    return load_file(str(path)), dict(fp, rope_pairs=spec.get("rope_pairs"))
