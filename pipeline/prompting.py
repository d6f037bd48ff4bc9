"""Decoder-only prompts: how an example becomes the token ids a causal LM reads, and what it is asked to continue with.

Two formats (`prompt_format`, recorded in the store fingerprint):

    plain   the text-to-text input T5 reads ("sst2 sentence: <text>"), continued by " <verbalizer>"
    chat    the model's own chat template around one user turn, "<instruction>\\n\\n<Field>: <text>", with the
            generation prompt (SmolLM2: "<|im_start|>assistant\\n"), continued by "<verbalizer>" then the turn's
            end token; what the instruct model was tuned on, so zero-shot prompting can work at all

Classification: each class's verbalizer is a candidate continuation (possibly several tokens); its score is the sum of
its tokens' log-probabilities (rank classification, as T5 does). Generation (a task whose label is free text): the
answer's tokens followed by the end token are appended to the prompt; the loss is the causal-LM loss on them.

Truncation cuts the example's text only, never the template around it (a cut chat suffix would lose the
"assistant" cue the verbalizer follows): chat prompts are tokenized in pieces, prefix / text / suffix, the text
truncated to what max_length leaves. Pieces join at a space (the text piece starts with one), which is where a BPE
tokenizer such as SmolLM2's splits anyway.
"""
from __future__ import annotations

import numpy as np

from pipeline.config import PROMPT_FORMATS
from pipeline.errors import ConfigError

_SLOT = "\u0000{slot}\u0000"  # placeholder the chat template renders verbatim, split out again afterwards


def check_format(fmt: str, tokenizer, family: str, backbone: str) -> None:
    if fmt not in PROMPT_FORMATS:
        raise ConfigError(f"prompt_format: {fmt!r} is not one of {', '.join(PROMPT_FORMATS)}")
    if fmt == "chat" and family != "decoder":
        raise ConfigError(f"prompt_format: chat formats decoder-only prompts; {backbone} is a {family} backbone "
                          "(use prompt_format: plain)")
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"prompt_format: chat needs a tokenizer with a chat template; {backbone}'s has none "
                          "(use prompt_format: plain)")


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def end_token(tokenizer) -> int:
    """The token a generated answer ends with: the tokenizer's EOS (SmolLM2: <|im_end|>, the end of a chat turn)."""
    for tid in (tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None)):
        if tid is not None:
            return int(tid)
    raise ConfigError("task: a generation target needs an end token, and the tokenizer has no EOS or SEP token")


def chat_pieces(task, tokenizer, n_texts: int) -> list[list[int]]:
    """Token ids of the chat template around the texts: [prefix, (between,) suffix]."""
    fields = [f[:1].upper() + f[1:] for f in task.field_names[:n_texts]]
    body = task.instruction_text() + "\n\n" + "\n".join(f"{f}:{_SLOT.format(slot=i)}" for i, f in enumerate(fields))
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                             add_generation_prompt=True)
    pieces, rest = [], rendered
    for i in range(n_texts):
        before, rest = rest.split(_SLOT.format(slot=i), 1)
        pieces.append(before)
    pieces.append(rest)
    return [_ids(tokenizer, p) for p in pieces]


def _fit(texts: list[list[int]], budget: int) -> list[list[int]]:
    """Cut the longest text first until they fit the budget (tokenizers' 'longest_first')."""
    texts = [list(t) for t in texts]
    while sum(map(len, texts)) > budget:
        longest = max(range(len(texts)), key=lambda i: len(texts[i]))
        texts[longest].pop()
    return texts


def encode_prompts(task, examples, tokenizer, fmt: str, max_length: int,
                   with_answer: bool = True) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Token ids per example (prompt, or prompt + answer + end token for a generation task) and, for generation,
    where each answer starts (n,). with_answer=False: the prompts alone (what generation starts from)."""
    gen = task.kind == "generation" and with_answer
    answers = [_ids(tokenizer, (" " if fmt == "plain" else "") + ex.target) + [end_token(tokenizer)]
               for ex in examples] if gen else [[] for _ in examples]
    cap = max(2, max_length // 2)  # an answer takes at most half of max_length: the prompt keeps the rest
    answers = [a[:cap - 1] + a[-1:] if len(a) > cap else a for a in answers]
    out = []
    if fmt == "plain":
        for ex, ans in zip(examples, answers):
            ids = tokenizer(task.source_text(ex), truncation=True, max_length=max_length - len(ans))["input_ids"]
            out.append(np.asarray(list(ids) + ans, np.int32))
    else:
        pair = bool(examples) and examples[0].text_b is not None
        pieces = chat_pieces(task, tokenizer, 2 if pair else 1)
        fixed = sum(map(len, pieces))
        for ex, ans in zip(examples, answers):
            texts = [_ids(tokenizer, " " + ex.text_a)] + ([_ids(tokenizer, " " + ex.text_b)] if pair else [])
            budget = max_length - fixed - len(ans)
            if budget < len(texts):
                raise ConfigError(f"max_length: {max_length} tokens leave no room for the text: the chat template "
                                  f"takes {fixed} tokens (and the answer {len(ans)}); raise --max-length")
            texts = _fit(texts, budget)
            ids = pieces[0] + texts[0] + (pieces[1] + texts[1] + pieces[2] if pair else pieces[1])
            out.append(np.asarray(ids + ans, np.int32))
    starts = np.array([len(ids) - len(a) for ids, a in zip(out, answers)], np.int32) if gen else None
    return out, starts


def candidate_ids(task, tokenizer, fmt: str) -> list[np.ndarray]:
    """Token ids of each class's verbalizer as the continuation of a prompt (plain: after a space)."""
    cands = [np.asarray(_ids(tokenizer, (" " if fmt == "plain" else "") + v), np.int32) for v in task.verbalizers]
    empty = [v for v, c in zip(task.verbalizers, cands) if len(c) == 0]
    if empty:
        raise ConfigError(f"task {task.name}: verbalizers {empty} tokenize to nothing; give each class a word")
    return cands
