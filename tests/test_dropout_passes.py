"""Train-mode dropout passes: the official code runs the frozen backbone in train mode, so its ladders see the
backbone's dropout; stage one's --dropout-passes K stores K such passes of the train split and stage two's
--dropout-passes K reads pass e mod K in epoch e."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline import cache_activations
from pipeline.config import CacheConfig, TrainConfig
from pipeline.errors import ConfigError, StoreError
from pipeline.ladder_store import LadderStore
from pipeline.train_side import train
from tests.conftest import BERT_DROPOUT as P
from tests.conftest import write_task


def cache(backbone: str, task: str, out: Path, passes: int, **kw) -> Path:
    cache_activations.run(CacheConfig(backbone=backbone, task=task, out=str(out), dtype="fp32", device="cpu",
                                      batch_size=8, dropout_passes=passes, **kw), log=lambda *a: None)
    return out


def states(path: Path, name: str) -> np.ndarray:
    st = LadderStore(path)
    return st.rows(name, 0, int(st.offsets[-1]))


def test_a_pass_holds_the_embedding_output_under_bert_dropout_and_is_reproducible(dropout_bert, tmp_path):
    # BertEmbeddings is LayerNorm then Dropout(hidden_dropout_prob): in train mode each element of the embedding
    # output is either 0 or the eval-mode value / (1 - p), with about a fraction p of zeros
    task = write_task(tmp_path / "toy", n_train=64)
    out = cache(dropout_bert, task, tmp_path / "c", passes=2)
    assert sorted(p.name for p in out.glob("*.zarr")) == ["test.zarr", "train.dropout0.zarr", "train.dropout1.zarr",
                                                          "train.zarr", "validation.zarr"]
    ev, p0, p1 = (states(out / f, "src_emb") for f in ("train.zarr", "train.dropout0.zarr", "train.dropout1.zarr"))
    zero = p0 == 0
    np.testing.assert_allclose(p0[~zero], ev[~zero] / (1 - P), rtol=1e-5, atol=1e-6)
    assert abs(zero.mean() - P) < 0.02, zero.mean()
    assert (p0 != p1).mean() > 0.1  # each pass draws its own masks
    deep = [states(out / f, "src_02") for f in ("train.zarr", "train.dropout0.zarr")]
    assert not np.allclose(*deep, atol=1e-3)  # dropout inside the blocks reaches the top layer
    fp = LadderStore(out / "train.dropout1.zarr").fingerprint
    assert fp["dropout_pass"] == 1 and fp["split"] == "train"
    assert fp["backbone_dropout"] == {"attention_probs_dropout_prob": P, "hidden_dropout_prob": P}
    assert "dropout_pass" not in LadderStore(out / "train.zarr").fingerprint
    # masks are seeded by (seed, pass, window): a second stage one writes the same pass bit for bit
    again = cache(dropout_bert, task, tmp_path / "again", passes=1, splits=["train"])
    np.testing.assert_array_equal(states(again / "train.dropout0.zarr", "src_02"),
                                  states(out / "train.dropout0.zarr", "src_02"))


def test_a_backbone_without_dropout_is_refused_before_anything_is_written(tiny_bert, tmp_path):
    task = write_task(tmp_path / "toy")
    with pytest.raises(ConfigError, match="dropout_passes: backbone .* has no dropout"):
        cache(tiny_bert, task, tmp_path / "c", passes=2)
    assert not (tmp_path / "c").exists()


def side(backbone, task, cache_dir, out, **kw):
    kw = dict(dict(r=4, init="random", side_init="", device="cpu", epochs=1, batch_size=16, lr=1e-3), **kw)
    train(TrainConfig(backbone=backbone, task=task, cache=str(cache_dir), out=str(out), **kw), log=lambda *a: None)
    return load_file(str(Path(out) / "checkpoint.safetensors"))


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a if k.startswith("net/"))


def test_a_run_trains_on_the_pass_as_if_it_were_the_train_store_and_a_sweep_reads_the_same(dropout_bert, tmp_path):
    task = write_task(tmp_path / "toy", n_train=64)
    out = cache(dropout_bert, task, tmp_path / "c", passes=2)
    # reference caches whose (eval-mode) train store holds one pass: training from them must match epoch by epoch
    refs = {}
    for i in (0, 1):
        refs[i] = tmp_path / f"ref{i}"
        refs[i].mkdir()
        for split in ("validation", "test"):
            shutil.copytree(out / f"{split}.zarr", refs[i] / f"{split}.zarr")
        shutil.copytree(out / f"train.dropout{i}.zarr", refs[i] / "train.zarr")
    one = side(dropout_bert, task, out, tmp_path / "k1", dropout_passes=1)
    assert same(one, side(dropout_bert, task, refs[0], tmp_path / "ref_run0"))
    assert not same(one, side(dropout_bert, task, out, tmp_path / "eval_mode"))
    # a sweep reads each epoch's pass as a single run does (its configs end bit for bit where they would alone)
    k2 = side(dropout_bert, task, out, tmp_path / "k2", dropout_passes=2, epochs=2)
    side(dropout_bert, task, out, tmp_path / "sweep", dropout_passes=2, epochs=2, sweep={"lr": [1e-3]})
    assert same(k2, load_file(str(tmp_path / "sweep" / "lr0.001" / "checkpoint.safetensors")))
    assert not same(k2, side(dropout_bert, task, out, tmp_path / "k1_2", dropout_passes=1, epochs=2))


def test_each_epoch_reads_pass_epoch_mod_k_one_at_a_time(dropout_bert, tmp_path, monkeypatch):
    from pipeline import batches

    task = write_task(tmp_path / "toy")
    out = cache(dropout_bert, task, tmp_path / "c", passes=2)
    read = []
    init = batches.Reader.__init__
    monkeypatch.setattr(batches.Reader, "__init__", lambda self, store: (read.append(store.path.name),
                                                                         init(self, store))[1])
    side(dropout_bert, task, out, tmp_path / "run", dropout_passes=2, epochs=5)
    passes = [n for n in read if n.startswith("train.dropout")]
    assert passes == ["train.dropout0.zarr", "train.dropout1.zarr"] * 2 + ["train.dropout0.zarr"]


def test_missing_passes_are_named_with_the_stage_one_flag_that_writes_them(dropout_bert, tmp_path):
    task = write_task(tmp_path / "toy")
    out = cache(dropout_bert, task, tmp_path / "c", passes=1)
    with pytest.raises(StoreError, match=r"dropout_passes: .*train\.dropout1\.zarr does not exist; run stage one "
                                         r"with --dropout-passes 3"):
        side(dropout_bert, task, out, tmp_path / "run", dropout_passes=3)
    with pytest.raises(ConfigError, match="dropout_passes: .* in the loop use --backbone-dropout"):
        TrainConfig(task=task, feed="backbone", dropout_passes=2)
    with pytest.raises(ConfigError, match="dropout_passes: must be >= 0"):
        CacheConfig(dropout_passes=-1)
