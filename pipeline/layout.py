"""Names shared by stage one, the store and the side network (one place, no repeated strings).

Stacks: "src" reads the input tokens (T5 encoder, BERT encoder, or a decoder-only model);
"tgt" is the T5 decoder run with teacher forcing over each candidate verbalizer.
"""
from __future__ import annotations

FAMILIES = ("t5", "encoder", "decoder")
# Hugging Face model_type -> family
MODEL_TYPES = {
    "t5": "t5", "mt5": "t5",
    "bert": "encoder",
    "llama": "decoder", "qwen2": "decoder", "mistral": "decoder",
}
SRC, TGT = "src", "tgt"
EMB = "emb"


def state_name(stack: str, layer: int | str) -> str:
    """'src_03' for block 3's output, 'src_emb' for the embedding output."""
    return f"{stack}_{layer}" if layer == EMB else f"{stack}_{int(layer):02d}"


def family_of(model_type: str) -> str:
    from pipeline.errors import BackboneError

    if model_type not in MODEL_TYPES:
        raise BackboneError(
            f"backbone: model_type {model_type!r} is not supported; supported: "
            + ", ".join(f"{k} ({v})" for k, v in MODEL_TYPES.items())
        )
    return MODEL_TYPES[model_type]


def stores_embedding(family: str) -> bool:
    """BERT's embedding output needs position/type tables and a LayerNorm: store it (one more layer).
    T5 and decoder-only embedding outputs are a lookup in the table the side net holds anyway for the
    LM head: stage two recomputes them from token ids, so they are not stored."""
    return family == "encoder"


def tgt_lengths(family: str, cands) -> list[int]:
    """Stored target rows of each candidate: T5 keeps the teacher-forced decoder states of all its tokens; a
    decoder-only model keeps the states at the candidate's own positions except the last (the state at token u
    scores token u + 1; the first token is scored from the prompt's last state, the last token's state scores
    nothing), so single-token verbalizers store no target rows at all."""
    if family == "t5":
        return [len(c) for c in cands]
    if family == "decoder":
        return [len(c) - 1 for c in cands]
    return []
