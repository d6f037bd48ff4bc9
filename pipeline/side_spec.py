"""The side network's shape, as a plain record: family, backbone sizes, reduction factor r, kept layers, variant,
dropout rates. Saved as side_config.json beside a trained side net; the pruned init (pipeline/prune.py) and the
network (pipeline/side.py) both read it, so the init stage does not depend on the network's code."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from pipeline.config import ALL_DROPOUT_SITES, DROPOUT_SITES, GATES, check_dropout_rates
from pipeline.errors import ConfigError
from pipeline.layout import EMB, SRC, TGT, state_name


@dataclass
class SideSpec:
    """Everything needed to rebuild a side network; saved as side_config.json beside its weights."""

    family: str  # t5 | encoder | decoder
    d_model: int
    n_heads: int
    d_kv: int
    d_ff: int
    n_layers: int  # backbone layers per stack
    layers: list[int]  # kept side layers, 0-based backbone layer indices (T5: the encoder's)
    r: int = 8
    variant: str = "ladder"
    kind: str = "classification"  # or regression, or generation (decoder-only)
    num_labels: int = 2
    act: str = "relu"  # relu | gelu | gated-gelu | silu (SwiGLU)
    norm_eps: float = 1e-6
    vocab_size: int = 0
    n_kv_heads: int = 0  # decoder-only grouped-query attention (0 = n_heads)
    qkv_bias: bool = False
    rel_buckets: int = 32
    rel_max_distance: int = 128
    rope_theta: float = 10000.0
    tie_scale: bool = True  # T5 tied head: scale the final hidden state by d_model^-0.5
    verbalizer_ids: list = field(default_factory=list)  # decoder-only: token ids of each verbalizer (a list per class)
    dropout: float = 0.1  # each residual branch (T5 dropout_rate = 0.1, official side net)
    select_k: int = 0  # token-selective training: gradients through k random source positions (+ the first)
    dec_layers: list[int] | None = None  # T5 side decoder's kept layers (None: the same as `layers`)
    attn_dropout: float = 0.1  # attention probabilities
    ff_dropout: float = 0.1  # inside the feed-forward, after the activation
    emb_dropout: float = 0.1  # embedding output, before the first ladder
    final_dropout: float = 0.1  # after the side stack's final norm
    ladder_dropout: float = 0.0  # not an official site: each backbone state before its down-projection (see side.py)
    mix_final: bool = False  # QST-style: up(side) mixed with the backbone's final state by a learned gate
    downsampler: str = "linear"  # ladder down-projections: linear (LST) or lowrank (QST, pipeline/side.py LowRankDown)
    downsampler_rank: int = 16  # lowrank: inner width (QST's peft_hidden_size)
    gate: str = "lst"  # learned gates: lst (one scalar, sigmoid(alpha / 0.1)) or qst (one per dimension; side.py)
    rope_pairs: list | None = None  # decoder-only pruned init: per side block, the backbone rotary pairs it kept

    def __post_init__(self):
        self.verbalizer_ids = [[int(v)] if isinstance(v, int) else [int(t) for t in v] for v in self.verbalizer_ids]
        for name, size in (("d_model", self.d_model), ("d_ff", self.d_ff), ("head size d_kv", self.d_kv)):
            if size % self.r:
                raise ConfigError(f"r: {self.r} does not divide the backbone's {name} ({size}); pick r dividing it")
        if self.dec_layers is not None and self.family != "t5":
            raise ConfigError(f"decoder_layers: only T5 has a side decoder; {self.family} side nets take `layers` only")
        for name in ("layers", "dec_layers"):
            keep = getattr(self, name)
            if keep is None:
                continue
            field_name = "decoder_layers" if name == "dec_layers" else "layers"
            bad = [k for k in keep if not 0 <= k < self.n_layers]
            if bad:
                raise ConfigError(f"{field_name}: {bad} out of range for a backbone with {self.n_layers} layers "
                                  f"(0..{self.n_layers - 1})")
            if not keep:
                raise ConfigError(f"{field_name}: keep at least one side layer")
            setattr(self, name, sorted(int(k) for k in keep))
        if self.dec_layers == self.layers:
            self.dec_layers = None  # one list for both stacks: the common case keeps one spelling
        check_dropout_rates(self)
        if self.gate not in GATES:
            raise ConfigError(f"gate: {self.gate!r} is not one of {', '.join(GATES)}")
        if self.select_k and (self.family == "decoder" or self.variant not in ("ladder", "fuse_after", "no_ladder")):
            raise ConfigError("select_k: token-selective training is built for the ladder and no_ladder variants of "
                              f"T5 and encoder side networks, not {self.family}/{self.variant}; set select_k: 0")
        if self.select_k < 0:
            raise ConfigError(f"select_k: must be 0 (off) or a positive number of positions, got {self.select_k}")
        if self.family == "decoder" and self.side_kv % 2:
            raise ConfigError(f"r: {self.r} leaves side heads of {self.side_kv} dims (head_dim {self.d_kv} / r); rotary "
                              "embeddings rotate pairs of dims, so pick r with an even head_dim / r")
        if self.kind == "generation" and self.family != "decoder":
            raise ConfigError(f"task: generation (free-text targets) needs a decoder-only backbone, not {self.family}")
        if self.variant == "cross_attention" and (self.continuation or self.kind == "generation"):
            raise ConfigError("variant: cross_attention reads ladders across positions, so it cannot continue a prompt "
                              "from a cache of its keys; with multi-token verbalizers or a generation task pick "
                              "another variant")
        if self.rope_pairs is not None:
            self.rope_pairs = [[int(p) for p in ps] for ps in self.rope_pairs]
            if len(self.rope_pairs) != len(self.layers) or any(len(ps) != self.side_kv // 2 for ps in self.rope_pairs):
                raise ConfigError(f"side init: rope_pairs must list {self.side_kv // 2} rotary pairs for each of the "
                                  f"{len(self.layers)} side layers; the side_init file does not match this side net")

    @property
    def side_d(self) -> int:
        return self.d_model // self.r

    @property
    def side_kv(self) -> int:
        return self.d_kv // self.r

    @property
    def side_ff(self) -> int:
        return self.d_ff // self.r

    @property
    def stacks(self) -> tuple[str, ...]:
        return (SRC, TGT) if self.family == "t5" else (SRC,)

    def layers_of(self, stack: str) -> list[int]:
        """Kept backbone layers of one stack (the T5 decoder may keep its own list)."""
        return self.dec_layers if stack == TGT and self.dec_layers is not None else self.layers

    @property
    def continuation(self) -> bool:
        """Decoder-only classification with a verbalizer longer than one token: the side net also runs over the
        candidate positions after the prompt (their states are the store's tgt_* arrays)."""
        return self.family == "decoder" and self.kind != "generation" and any(len(v) > 1 for v in self.verbalizer_ids)

    @property
    def read_states(self) -> list[str]:
        """Every backbone state this side net reads, sorted (what a batch must carry)."""
        names = {n for st in self.stacks for n in self.state_names(st)}
        if self.continuation:  # the same layers at the candidate positions
            names |= {TGT + n[len(SRC):] for n in self.state_names(SRC)}
        return sorted(names)

    @property
    def uses_ladders(self) -> bool:
        return self.variant not in ("no_ladder", "late_fusion")

    @property
    def mixes_final(self) -> bool:
        """Whether up(side) is mixed with the backbone's final state before the head (late fusion, mix_final)."""
        return self.variant == "late_fusion" or self.mix_final

    @property
    def late_stack(self) -> str:
        """The stack whose final backbone state late fusion mixes in: the one that feeds the head."""
        return TGT if self.family == "t5" else SRC

    def state_names(self, stack: str) -> list[str]:
        """Backbone states this side net reads from the store, in ladder order (only what it uses)."""
        first = [state_name(stack, EMB)] if self.family == "encoder" else []
        final = [state_name(stack, self.n_layers - 1)] if self.mixes_final and stack == self.late_stack else []
        if not self.uses_ladders:  # no_ladder, late_fusion: the embeddings, and the final state if mixed in
            return first + final
        ladders = [state_name(stack, k) for k in self.layers_of(stack)]
        return first + ladders + [n for n in final if n not in ladders]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SideSpec":
        return cls(**json.loads(text))



def spec_from_config(cfg, r: int, layers, variant: str, kind: str, num_labels: int,
                     verbalizer_ids=(), dropout: float = 0.1, select_k: int = 0, dec_layers="same",
                     mix_final: bool = False, downsampler: str = "linear", downsampler_rank: int = 16,
                     gate: str = "lst", **site_dropout) -> SideSpec:
    """SideSpec for a Hugging Face backbone config (T5, BERT, Llama/Qwen/Mistral). layers / dec_layers: a
    list, or None for every layer; dec_layers "same" (T5's side decoder keeps the encoder's list). `dropout`
    is the rate at every official dropout site (as T5's single dropout_rate); `site_dropout` (attn_dropout=...)
    overrides one site; ladder_dropout (not an official site) is 0 unless named."""
    from pipeline.layout import family_of

    family = family_of(cfg.model_type)
    if family == "t5":
        n, act = cfg.num_layers, ("gated-gelu" if getattr(cfg, "is_gated_act", False) else "relu")
        if getattr(cfg, "num_decoder_layers", n) != n:
            raise ConfigError("backbone: T5 with different encoder and decoder depths is not supported")
        base = dict(d_model=cfg.d_model, n_heads=cfg.num_heads, d_kv=cfg.d_kv, d_ff=cfg.d_ff, n_layers=n, act=act,
                    norm_eps=cfg.layer_norm_epsilon, rel_buckets=cfg.relative_attention_num_buckets,
                    rel_max_distance=getattr(cfg, "relative_attention_max_distance", 128),
                    tie_scale=bool(getattr(cfg, "tie_word_embeddings", True)))
    elif family == "encoder":
        n = cfg.num_hidden_layers
        base = dict(d_model=cfg.hidden_size, n_heads=cfg.num_attention_heads,
                    d_kv=cfg.hidden_size // cfg.num_attention_heads, d_ff=cfg.intermediate_size, n_layers=n,
                    act="gelu", norm_eps=cfg.layer_norm_eps, tie_scale=False)
    else:
        n = cfg.num_hidden_layers
        hs = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        base = dict(d_model=cfg.hidden_size, n_heads=cfg.num_attention_heads, d_kv=hs, d_ff=cfg.intermediate_size,
                    n_layers=n, act="silu", norm_eps=cfg.rms_norm_eps, tie_scale=False,
                    n_kv_heads=getattr(cfg, "num_key_value_heads", 0) or 0,
                    qkv_bias=cfg.model_type == "qwen2",
                    rope_theta=float(getattr(cfg, "rope_theta", None) or
                                     (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    keep = list(range(n)) if layers is None else list(layers)
    dec = None if dec_layers == "same" or family != "t5" and dec_layers is None else (
        list(range(n)) if dec_layers is None else list(dec_layers))
    unknown = set(site_dropout) - set(ALL_DROPOUT_SITES)
    if unknown:
        raise TypeError(f"spec_from_config: unknown dropout sites {sorted(unknown)}")
    rates = {site: float(dropout) for site in DROPOUT_SITES}
    rates.update({k: float(v) for k, v in site_dropout.items() if v is not None})
    return SideSpec(family=family, r=r, layers=keep, variant=variant, kind=kind,
                    num_labels=num_labels if family == "encoder" else len(verbalizer_ids) or num_labels,
                    vocab_size=getattr(cfg, "vocab_size", 0), verbalizer_ids=list(verbalizer_ids),
                    select_k=select_k, dec_layers=dec, mix_final=bool(mix_final), downsampler=downsampler,
                    downsampler_rank=int(downsampler_rank), gate=gate, **rates, **base)
