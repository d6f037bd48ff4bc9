"""Fine-tuning baselines LST is compared against, built on the backbone itself:

    full_ft        every weight trains
    lora           PEFT LoRA, r=32 on the attention query/value projections (the paper's setting)
    prompt_tuning  PEFT prompt tuning, 100 virtual tokens
    ia3            PEFT IA3 (learned scaling of keys, values and the feed-forward input)
    bitfit         biases only (BERT has them; T5 has none, so it is not run there)
    selective      token-selective fine-tuning (bench/selective.py), k random positions + the first

Encoder-only models get the head the side network uses: mean pooling over tokens, then a trainable
Linear. T5 models keep their text-to-text LM loss. Decoder-only models (Llama) keep their causal-LM loss on the
gold verbalizer's tokens after the prompt and are scored by each verbalizer's log-likelihood, as the decoder-only
side network is (`decoder_candidate_loglik`). `build_*` return the model and its trainable
parameters; `loss_*` one step's loss, so the accuracy and the memory/time suites share them.
"""
from __future__ import annotations

import torch
from torch import nn

from bench.selective import bert_selective_forward, select_positions, t5_selective_loss

ENCODER_METHODS = ("full_ft", "lora", "prompt_tuning", "ia3", "bitfit", "selective")
T5_METHODS = ("full_ft", "lora", "prompt_tuning", "ia3", "selective")
LORA_TARGETS = {"encoder": ["query", "value"], "t5": ["q", "v"], "decoder": ["q_proj", "v_proj"]}
DECODER_METHODS = ("full_ft", "lora")
IA3_TARGETS = {"encoder": (["key", "value", "output.dense"], ["output.dense"]),
               "t5": (["k", "v", "wo"], ["wo"])}
PROMPT_TOKENS = 100
SELECTIVE_K = 32  # the selective paper: 32 positions come within 0.4 pt of 64 on BERT-base


def _peft(model, method: str, family: str):
    from peft import IA3Config, LoraConfig, PromptTuningConfig, TaskType, get_peft_model

    if method == "lora":
        cfg = LoraConfig(r=32, lora_alpha=32, target_modules=LORA_TARGETS[family], lora_dropout=0.0)
    elif method == "ia3":
        targets, ff = IA3_TARGETS[family]
        cfg = IA3Config(target_modules=targets, feedforward_modules=ff)
    else:
        task = TaskType.SEQ_2_SEQ_LM if family == "t5" else TaskType.FEATURE_EXTRACTION
        cfg = PromptTuningConfig(task_type=task, num_virtual_tokens=PROMPT_TOKENS)
    model = get_peft_model(model, cfg)
    for p in model.parameters():  # adapter weights train in fp32 even when the frozen base is bf16
        if p.requires_grad:
            p.data = p.data.float()
    return model


class EncoderClassifier(nn.Module):
    """Encoder + mean pooling + Linear head (classification logits, or one regression output)."""

    def __init__(self, encoder, hidden: int, n_out: int, method: str, k: int = SELECTIVE_K):
        super().__init__()
        self.encoder, self.method, self.k = encoder, method, k
        self.head = nn.Linear(hidden, n_out)
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, ids, mask):
        if self.method == "selective" and self.training:
            sel, m = select_positions(mask, self.k, self.generator)
            h = bert_selective_forward(self.encoder, ids, mask, sel)
        else:
            h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            h, m = h[:, -ids.shape[1]:], mask  # prompt tuning prepends its virtual tokens
        m = m[..., None].to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1))


def build_encoder(method: str, encoder, n_out: int) -> tuple[EncoderClassifier, list]:
    if method not in ENCODER_METHODS:
        raise ValueError(f"method {method!r} is not one of {ENCODER_METHODS}")
    if method in ("lora", "ia3", "prompt_tuning"):
        encoder = _peft(encoder, method, "encoder")
    else:
        for name, p in encoder.named_parameters():  # the pooler is unused: mean pooling feeds the head
            p.requires_grad_(not name.startswith("pooler.") and (method != "bitfit" or name.endswith("bias")))
    model = EncoderClassifier(encoder, encoder.config.hidden_size, n_out, method)
    return model, [p for p in model.parameters() if p.requires_grad]


def loss_encoder(model: EncoderClassifier, ids, mask, labels, kind: str = "classification"):
    out = model(ids, mask)
    if kind == "regression":
        return nn.functional.mse_loss(out[:, 0].float(), labels.float())
    return nn.functional.cross_entropy(out.float(), labels.long())


def build_t5(method: str, model) -> tuple[nn.Module, list]:
    if method not in T5_METHODS:
        raise ValueError(f"method {method!r} is not one of {T5_METHODS} (T5 has no biases: no BitFit)")
    if method in ("lora", "ia3", "prompt_tuning"):
        model = _peft(model, method, "t5")
    return model, [p for p in model.parameters() if p.requires_grad]


def loss_t5(method: str, model, ids, mask, labels, k: int = SELECTIVE_K, generator=None):
    if method == "selective":
        return t5_selective_loss(model, ids, mask, labels, k, generator)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def build_decoder(method: str, model) -> tuple[nn.Module, list]:
    """A causal LM for full fine-tuning (every weight, the tied embedding / head included) or LoRA (r = 32 on the
    attention q / v projections, as the encoder and T5 baselines)."""
    if method not in DECODER_METHODS:
        raise ValueError(f"method {method!r} is not one of {DECODER_METHODS}")
    if method == "lora":
        model = _peft(model, "lora", "decoder")
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model, [p for p in model.parameters() if p.requires_grad]


def causal_lm(model):
    """The LlamaForCausalLM inside a PEFT wrapper (or the model itself): `.model` body, `.lm_head` head."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_candidate_loglik(model, ids, mask, cands: list, pairs: list[tuple[int, int]]):
    """(len(pairs),) log p(candidate c | prompt i) for each (i, c), summed over the candidate's tokens, and the
    number of tokens of each. ids / mask (B, T) right-padded prompts; cands: token ids of each candidate. The head
    runs only where a candidate token is scored (SmolLM2's 49152-row head at every position would cost ~40% of
    the forward). One-token candidates need one forward of the prompts; longer ones run prompt + candidate."""
    from pipeline.padding import continuation_inputs

    lm = causal_lm(model)
    inp, labels, cmask = continuation_inputs(cands)  # (C, U - 1), (C, U), (C, U - 1)
    dev = ids.device
    inp, labels, cmask = inp.to(dev), labels.to(dev), cmask.to(dev)
    ex = torch.tensor([i for i, _ in pairs], device=dev)
    cs = torch.tensor([c for _, c in pairs], device=dev)
    lens = mask.long().sum(1)[ex]  # (N,)
    if inp.shape[1] == 0:
        h = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, d)
        last = h[torch.arange(h.shape[0], device=dev), mask.long().sum(1) - 1][ex]  # (N, d)
        lp = torch.log_softmax(lm.lm_head(last).float(), -1)
        return lp.gather(1, labels[cs, :1])[:, 0], torch.ones(len(pairs), device=dev)
    U = inp.shape[1]
    seq = torch.cat([ids[ex], torch.zeros(len(pairs), U, dtype=ids.dtype, device=dev)], 1)
    smask = torch.cat([mask[ex], torch.zeros(len(pairs), U, dtype=torch.bool, device=dev)], 1)
    at = lens[:, None] + torch.arange(U, device=dev)[None, :]
    seq.scatter_(1, at, inp[cs])
    smask.scatter_(1, at, cmask[cs])
    h = lm.model(input_ids=seq, attention_mask=smask, use_cache=False).last_hidden_state
    pos = torch.cat([lens[:, None] - 1, at], 1)  # (N, U + 1): the positions that score each candidate token
    hs = h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))
    lp = torch.log_softmax(lm.lm_head(hs).float(), -1)
    t = labels[cs]
    tok = lp.gather(-1, t.clamp(min=0)[..., None])[..., 0] * (t != -100)
    return tok.sum(1), (t != -100).sum(1).float()
