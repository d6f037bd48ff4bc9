"""Fixtures: tiny random-init backbones saved to disk (so the real local-path loading is exercised),
the real MiniLM from its registry package, and small GLUE-shaped local task files."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.backbone import MINILM, resolve

MINILM_DIR = Path(resolve(MINILM))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _save(model, folder: Path) -> str:
    model.save_pretrained(folder)
    for f in TOKENIZER_FILES:  # a real WordPiece tokenizer: tiny models need no tokenizer of their own
        if (MINILM_DIR / f).exists():
            shutil.copy(MINILM_DIR / f, folder / f)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> str:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=30522, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=3,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=102)
    return _save(T5ForConditionalGeneration(cfg).eval(), tmp_path_factory.mktemp("tiny_t5"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                     num_hidden_layers=3, max_position_embeddings=128, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return _save(BertModel(cfg).eval(), tmp_path_factory.mktemp("tiny_bert"))


BERT_DROPOUT = 0.1  # BERT's hidden_dropout_prob and attention_probs_dropout_prob (all-MiniLM-L6-v2 has both at 0.1)


@pytest.fixture(scope="session")
def dropout_bert(tmp_path_factory) -> str:
    """tiny_bert with BERT's own dropout rates, for train-mode passes (tiny_bert has none)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                     num_hidden_layers=3, max_position_embeddings=128, hidden_dropout_prob=BERT_DROPOUT,
                     attention_probs_dropout_prob=BERT_DROPOUT)
    return _save(BertModel(cfg).eval(), tmp_path_factory.mktemp("dropout_bert"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=3, max_position_embeddings=128, pad_token_id=0)
    return _save(LlamaForCausalLM(cfg).eval(), tmp_path_factory.mktemp("tiny_llama"))


WORDS = ("good great fine nice lovely bad awful poor dull boring movie film plot actor scene story the a "
         "was is very quite not really").split()


def write_task(folder: Path, n_train=48, n_eval=24, kind="classification", pair=False, seed=0) -> str:
    """A GLUE-shaped local task (csv files + task yaml)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_eval), ("test", n_eval)):
        rows = []
        for _ in range(n):
            toks = list(rng.choice(WORDS, size=rng.integers(3, 12)))
            pos = sum(t in WORDS[:5] for t in toks) - sum(t in WORDS[5:11] for t in toks)
            label = float(pos) if kind == "regression" else int(pos >= 0)
            row = {"sentence1": " ".join(toks), "label": label}
            if pair:
                row["sentence2"] = " ".join(rng.choice(WORDS, size=4))
            rows.append(row)
        pd.DataFrame(rows).to_csv(folder / f"{split}.csv", index=False)
    cols = "[sentence1, sentence2]" if pair else "[sentence1]"
    extra = ("label_names: [negative, positive]\nverbalizers: [negative, positive]\n" if kind == "classification"
             else "regression_bins: [-3, -2, -1, 0, 1, 2, 3]\n")
    (folder / "task.yaml").write_text(
        f"name: toy\nkind: {kind}\ntext_columns: {cols}\nlabel_column: label\n{extra}prompt: toy\n"
        "files: {train: train.csv, validation: validation.csv, test: test.csv}\n")
    return str(folder / "task.yaml")


@pytest.fixture
def toy_task(tmp_path) -> str:
    return write_task(tmp_path / "toy")
