"""Backbone + trained side network as one module on raw text (no cache): classification scores, and for a
generation task (decoder-only), greedy generation with a KV cache in the backbone and one in the side network."""
from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from pipeline import backbone as bbm
from pipeline.batches import LadderBatch
from pipeline.device import pick_device
from pipeline.errors import DataError, FingerprintMismatch
from pipeline.layout import SRC, TGT
from pipeline.metrics import predictions
from pipeline.padding import candidate_inputs, pad
from pipeline.prompting import encode_prompts, end_token
from pipeline.run_folder import load_side
from pipeline.tasks import Example, get_task


def read_inputs(lines, source: str) -> list[tuple[str, str | None]]:
    """One example per line of raw bytes, a tab between the two texts of a pair. The output has one record
    per input line, so a blank line inside the input is refused with its number (trailing ones are ignored),
    and so is a line that is not UTF-8."""
    texts = []
    for number, raw in enumerate(lines, 1):
        try:
            texts.append(raw.decode("utf-8").rstrip("\r\n"))
        except UnicodeDecodeError as e:
            raise DataError(f"{source}: line {number} is not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                            f"{e.start + 1}); re-save it as UTF-8") from None
    while texts and not texts[-1].strip():
        texts.pop()
    if not texts:
        raise DataError(f"{source}: no input lines; give a text file with one example per line")
    out = []
    for number, line in enumerate(texts, 1):
        if not line.strip():
            raise DataError(f"{source}: line {number} is blank; each line is one example and gets one output "
                            "record: remove the line or put text on it")
        a, tab, b = line.partition("\t")
        out.append((a, b if tab else None))
    return out


class LSTModel(nn.Module):
    """Frozen backbone feeding the side network live: what a user deploys after stage two."""

    def __init__(self, run: str, device: str = "auto"):
        super().__init__()
        dev = pick_device(device)
        self.side, self.meta = load_side(run, dev)
        self.bb = bbm.load_backbone(self.meta["backbone"], device)
        if self.bb.sha256 != self.meta["backbone_sha256"]:
            raise FingerprintMismatch(f"run {run} (trained with backbone {self.meta['backbone']})",
                                      {"backbone_sha256": (self.meta["backbone_sha256"], self.bb.sha256)})
        self.task = get_task(self.meta["task"])
        spec = self.side.spec
        self.names = spec.read_states
        self.max_length = int(self.meta["max_length"])
        self.prompt_format = self.meta.get("prompt_format", "plain")
        self.device = dev

    def check_inputs(self, texts: list[tuple[str, str | None]], source: str) -> None:
        """Pair tasks need both texts on every line (tab-separated); single-text tasks take no tab."""
        fields = self.task.field_names
        for number, (a, b) in enumerate(texts, 1):
            if not a.strip():
                raise DataError(f"{source}: line {number} has an empty first text ({fields[0]})")
            if len(fields) > 1 and (b is None or not b.strip()):
                raise DataError(f"{source}: line {number} lacks its second text ({fields[1]}): task {self.task.name} "
                                f"takes pairs, written '{fields[0]}<TAB>{fields[1]}'")
            if len(fields) == 1 and b is not None:
                raise DataError(f"{source}: line {number} has a tab, but task {self.task.name} takes one text "
                                f"({fields[0]}); remove the tab")

    @torch.no_grad()
    def scores(self, texts: list[tuple[str, str | None]]) -> np.ndarray:
        exs = [Example(a, b, 0.0) for a, b in texts]
        enc = bbm.encode(self.task, exs, self.bb.tokenizer, self.bb.family, self.max_length, self.prompt_format)
        ids, mask = pad(enc.src_ids)
        cand = None
        if enc.cand_ids:  # T5 decoder inputs / decoder-only continuations of every candidate
            cand = candidate_inputs(self.bb.family, enc.cand_ids,
                                    int(getattr(self.bb.config, "decoder_start_token_id", 0) or 0))
        st = bbm.forward_states(self.bb, ids, mask, self.names, cand)
        batch = LadderBatch(ids, mask, {n: v.float() for n, v in st.items() if n.startswith(SRC)})
        if cand is not None:  # every candidate of every example, in order: scores come back (B, C)
            dec_in, dec_labels, dec_mask = cand
            B, C = ids.shape[0], dec_in.shape[0]
            batch.tgt_ids, batch.tgt_labels, batch.tgt_mask = dec_in.repeat(B, 1), dec_labels.repeat(B, 1), dec_mask.repeat(B, 1)
            batch.tgt_row = torch.arange(B).repeat_interleave(C)
            batch.tgt_cand = torch.arange(C).repeat(B)
            batch.n_candidates = C
            batch.states.update({n: v.float() for n, v in st.items() if n.startswith(TGT)})
        return self.side(batch.to(self.device)).scores.float().cpu().numpy()

    @torch.no_grad()
    def generate(self, text: tuple[str, str | None], max_new_tokens: int = 32) -> list[int]:
        """Greedy decoding of one example: the backbone runs with its own KV cache (Hugging Face past_key_values),
        its hooks capture each new position's kept states, and the side net continues from its KV cache of every
        earlier position (SideNetwork.step_logits); tested equal to recomputing the whole sequence each step."""
        ids, _ = encode_prompts(self.task, [Example(text[0], text[1], 0.0, "")], self.bb.tokenizer,
                                self.prompt_format, self.max_length, with_answer=False)
        step = torch.from_numpy(ids[0].astype(np.int64))[None].to(self.bb.device)  # (1, T)
        stop, out = end_token(self.bb.tokenizer), []
        past, cache, pos = None, None, 0
        src_names = [n for n in self.names if n.startswith(SRC)]
        for _ in range(max_new_tokens):
            cap = bbm.Capture(self.bb, src_names)
            try:
                res = self.bb.body(input_ids=step, past_key_values=past, use_cache=True)
            finally:
                cap.close()
            past = res.past_key_values
            states = {n: cap.out[n].float().to(self.device) for n in src_names}
            logits, cache = self.side.step_logits(step.to(self.device), states, pos, cache)
            pos += step.shape[1]
            nxt = int(logits[0, -1].argmax())
            if nxt == stop:
                break
            out.append(nxt)
            step = torch.tensor([[nxt]], device=self.bb.device)
        return out

    def predict(self, texts, batch_size: int = 64, raw_scores: bool = False, max_new_tokens: int = 32):
        """One JSON line per input: the label name and every label's probability (softmax of the side net's
        class logits, or of the candidate log-likelihoods for T5 / decoder-only rank classification), or the
        predicted value for regression; raw scores only on request. Generation tasks: the greedy answer."""
        if self.task.kind == "generation":
            for a, b in texts:
                tokens = self.generate((a, b), max_new_tokens)
                row = {"text": a, "generation": self.bb.tokenizer.decode(tokens), "tokens": tokens}
                if b is not None:
                    row["text_pair"] = b
                yield json.dumps(row)
            return
        for i in range(0, len(texts), batch_size):
            chunk = texts[i:i + batch_size]
            sc = self.scores(chunk)
            pred = predictions(sc, self.task.kind, self.task.regression_bins)
            for (a, b), p, s in zip(chunk, pred, sc):
                row = {"text": a}
                if b is not None:
                    row["text_pair"] = b
                if self.task.kind == "classification":
                    prob = np.exp(s - s.max())
                    prob /= prob.sum()
                    row["label"] = self.task.label_names[int(p)]
                    row["label_index"] = int(p)
                    row["probabilities"] = {n: round(float(q), 6) for n, q in zip(self.task.label_names, prob)}
                else:
                    row["prediction"] = float(p)
                if raw_scores:
                    row["scores"] = [float(x) for x in s]
                yield json.dumps(row)
