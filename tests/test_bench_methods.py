"""The baselines the benchmarks compare against must be the methods they claim to be."""
from __future__ import annotations

import pytest
import torch

from bench.baselines import build_encoder, build_t5, loss_encoder, loss_t5
from bench.selective import (
    bert_selective_forward,
    select_positions,
    t5_selective_encoder,
)


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                num_hidden_layers=2, max_position_embeddings=128)).eval()


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=100, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                                               relative_attention_num_buckets=8, decoder_start_token_id=0,
                                               pad_token_id=0, eos_token_id=1)).eval()


def _batch(B=3, T=12):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 100, (B, T), generator=g)
    lengths = torch.tensor([T, T - 4, 5])[:B]
    mask = torch.arange(T)[None] < lengths[:, None]
    return ids.masked_fill(~mask, 0), mask


def test_selected_positions_start_with_the_first_token_and_prefer_real_tokens():
    ids, mask = _batch()
    sel, valid = select_positions(mask, 6, torch.Generator().manual_seed(0))
    assert sel.shape == (3, 7) and (sel[:, 0] == 0).all()
    for row in range(3):
        assert len(set(sel[row].tolist())) == 7  # distinct positions
        assert valid[row].sum() == min(7, int(mask[row].sum()))


def test_selective_bert_forward_equals_the_full_forward_at_selected_rows():
    bert = _bert()
    ids, mask = _batch()
    sel, valid = select_positions(mask, 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        part = bert_selective_forward(bert, ids, mask, sel)
    want = full.gather(1, sel[..., None].expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(part[valid], want[valid], atol=1e-5, rtol=1e-5)


def test_selective_with_every_position_selected_is_full_fine_tuning_bert():
    ids, mask = _batch()
    labels = torch.tensor([0, 1, 1])
    grads = {}
    for method in ("full_ft", "selective"):
        model, params = build_encoder(method, _bert(), 2)
        torch.manual_seed(5)
        model.head.reset_parameters()
        model.k = ids.shape[1]
        model.train()
        model.encoder.eval()  # dropout off in both
        loss_encoder(model, ids, mask, labels).backward()
        grads[method] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["full_ft"].keys() == grads["selective"].keys()
    for n, g in grads["full_ft"].items():
        torch.testing.assert_close(grads["selective"][n], g, atol=2e-5, rtol=1e-4, msg=n)


def test_selective_drops_gradients_of_unselected_positions():
    """With k small, the embedding rows of tokens at unselected positions get no gradient."""
    bert = _bert()
    ids, mask = _batch(B=1, T=12)
    ids = torch.arange(10, 22)[None]  # every position a different token
    sel, _ = select_positions(mask[:1], 3, torch.Generator().manual_seed(0))
    bert_selective_forward(bert, ids, mask[:1], sel).sum().backward()
    g = bert.embeddings.word_embeddings.weight.grad
    touched = {int(i) for i in (g.abs().sum(1) > 0).nonzero()[:, 0]}
    assert touched == {int(ids[0, p]) for p in sel[0]}


def test_selective_t5_encoder_equals_the_full_encoder_and_every_position_gives_full_gradients():
    ids, mask = _batch()
    labels = torch.randint(2, 100, (3, 3), generator=torch.Generator().manual_seed(2))
    model = _t5()
    sel, valid = select_positions(mask, 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        part = t5_selective_encoder(model, ids, mask, sel)
    torch.testing.assert_close(part[mask], full[mask], atol=1e-5, rtol=1e-5)
    grads = {}
    for method in ("full_ft", "selective"):
        m = _t5()
        m, _ = build_t5(method, m)
        loss_t5(method, m, ids, mask, labels, k=ids.shape[1]).backward()
        grads[method] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    for n, g in grads["full_ft"].items():
        torch.testing.assert_close(grads["selective"][n], g, atol=2e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("method,marker", [("lora", "lora_"), ("ia3", "ia3_"), ("bitfit", "bias"),
                                           ("prompt_tuning", "prompt_encoder")])
def test_peft_baselines_train_only_their_own_parameters(method, marker):
    model, params = build_encoder(method, _bert(), 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(marker in n or n.startswith("head.") for n in trainable), trainable
    assert any(marker in n for n in trainable)
    ids, mask = _batch()
    loss_encoder(model, ids, mask, torch.tensor([0, 1, 1])).backward()
    assert all(p.grad is not None for p in params)


def test_accuracy_suite_pairs_cache_and_inloop_by_seed_and_reports_mean_and_std():
    from bench.accuracy import aggregate

    def row(method, seed, acc):
        return {"method": method, "seed": seed, "lr": 1e-3, "trainable_params": 10, "test": {"accuracy": acc}}

    rows = [row("lst_cache", 0, 0.80), row("lst_cache", 1, 0.82), row("lst_cache", 2, 0.84),
            row("lst_inloop", 0, 0.79), row("lst_inloop", 2, 0.85),  # seed 1 missing: not paired
            row("full_ft", 0, 0.90), row("full_ft", 1, 0.90), row("full_ft", 2, 0.93)]
    out = aggregate("rt-sentiment", rows, {"accuracy": 0.7})
    assert out["headline_metric"] == "accuracy"
    assert out["cache_vs_inloop_delta_pt"]["per_seed"] == pytest.approx([1.0, -1.0])
    assert out["methods"]["lst_cache"]["mean"] == pytest.approx(82.0)
    assert out["methods"]["lst_cache"]["std"] == pytest.approx(2.0)
    assert out["lst_vs_full_ft_delta_pt"] == pytest.approx(82.0 - 91.0)
    assert out["methods"]["frozen"]["mean"] == pytest.approx(70.0)
