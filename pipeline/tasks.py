"""Task registry: where examples come from, how they are split, prompted, verbalized and scored.

A task yields, per split, a list of `Example(text_a, text_b, label)`; labels are class indices
(classification) or floats (regression). Formatting for each backbone family lives here too so
stage one, stage two (--feed backbone) and predict share one definition.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from pipeline import offline_data
from pipeline.config import read_yaml
from pipeline.errors import ConfigError, DataError


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: str | None
    label: float  # class index for classification (0 for generation)
    target: str | None = None  # generation: the answer text


@dataclass
class Task:
    name: str
    kind: str  # "classification" | "regression" | "generation" (decoder-only: the label is free text)
    label_names: list[str]  # classification: one per class; regression, generation: []
    verbalizers: list[str]  # T5 / decoder-only targets, one per class (regression: rounded bins)
    prompt: str  # T5 prefix, e.g. "sst2"
    field_names: tuple[str, ...] = ("sentence",)
    metric: str = "accuracy"  # the paper's headline metric for the task
    loader: Callable[[Path, int], dict[str, list[Example]]] | None = field(default=None, repr=False)
    regression_bins: list[float] = field(default_factory=list)  # value of each verbalizer (regression)
    instruction: str = ""  # the question a chat prompt asks (pipeline/prompting.py); "" = name the answers

    @property
    def num_labels(self) -> int:
        return len(self.label_names) if self.kind == "classification" else 1

    def instruction_text(self) -> str:
        if self.instruction:
            return self.instruction
        if self.verbalizers:
            return f"Answer with one of: {', '.join(self.verbalizers)}."
        return "Answer the following."

    def load(self, data_dir: str | Path, seed: int = 0) -> dict[str, list[Example]]:
        splits = self.loader(Path(data_dir), seed)
        for split, examples in splits.items():
            validate_examples(self, split, examples)
        return splits

    def source_text(self, ex: Example) -> str:
        """Text-to-text input (T5 / decoder-only): 'prompt field: text [field2: text]'."""
        parts = [self.prompt] if self.prompt else []
        parts.append(f"{self.field_names[0]}: {ex.text_a}")
        if ex.text_b is not None:
            parts.append(f"{self.field_names[1]}: {ex.text_b}")
        return " ".join(parts)

    def target_index(self, label: float) -> int:
        """Which verbalizer is the gold one for a label."""
        if self.kind == "classification":
            return int(label)
        if not self.regression_bins:
            raise ConfigError(f"task {self.name}: regression_bins is empty, so a regression target has no verbalizer; "
                              "add regression_bins (the value of each verbalizer) to the task file")
        return int(np.argmin([abs(b - label) for b in self.regression_bins]))


def check_targets(task: Task, family: str) -> None:
    """T5 and decoder-only backbones score a regression task as one verbalizer per bin (T5 casts STS-B as 26
    classes); encoder backbones regress with a head and need no bins. Free-text targets (generation) are for
    decoder-only backbones."""
    if task.kind == "generation" and family != "decoder":
        raise ConfigError(f"task {task.name}: a generation task (free-text targets) needs a decoder-only backbone, "
                          f"not a {family} one")
    if task.kind == "regression" and family != "encoder" and not task.regression_bins:
        raise ConfigError(f"task {task.name}: regression_bins is empty; a {family} backbone scores regression as one "
                          "verbalizer per bin: add regression_bins to the task file, or use an encoder backbone")


def validate_examples(task: Task, split: str, examples: list[Example]) -> None:
    if not examples:
        raise DataError(f"task {task.name}: split '{split}' is empty; check the data files or --limit")
    for i, ex in enumerate(examples):
        if task.kind == "generation" and (not isinstance(ex.target, str) or not ex.target.strip()):
            raise DataError(f"task {task.name}: split '{split}' row {i} has an empty target text; remove or fill it")
        if not isinstance(ex.text_a, str) or not ex.text_a.strip():
            raise DataError(f"task {task.name}: split '{split}' row {i} has empty text; remove or fill it")
        if ex.text_b is not None and not ex.text_b.strip():
            field = task.field_names[1] if len(task.field_names) > 1 else "second text"
            raise DataError(f"task {task.name}: split '{split}' row {i} has an empty second text ({field}) in a pair "
                            "task; remove or fill it")
        if task.kind == "classification":
            if not (float(ex.label).is_integer() and 0 <= int(ex.label) < task.num_labels):
                raise DataError(
                    f"task {task.name}: split '{split}' row {i} has label {ex.label!r} outside the label set "
                    f"{task.label_names}"
                )
        elif not math.isfinite(float(ex.label)):
            raise DataError(f"task {task.name}: split '{split}' row {i} has a non-finite regression target {ex.label!r}")


def content_hash(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        row = [ex.text_a, ex.text_b, float(ex.label)] + ([ex.target] if ex.target is not None else [])
        h.update(json.dumps(row).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- splitting

def seeded_splits(labels: np.ndarray, seed: int, stratify: bool, n_test: int, n_val: int) -> dict[str, np.ndarray]:
    """Index arrays for train/validation/test, stratified by class when asked, deterministic in seed.
    Each split comes shuffled (not sorted), so `--limit N` takes a random N rather than the file's first."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    if not stratify:
        perm = rng.permutation(n)
        return {"test": perm[:n_test], "validation": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
    out = {"train": [], "validation": [], "test": []}
    classes = np.unique(labels)
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        t = round(n_test * len(idx) / n)
        v = round(n_val * len(idx) / n)
        out["test"].append(idx[:t]); out["validation"].append(idx[t:t + v]); out["train"].append(idx[t + v:])
    return {k: rng.permutation(np.concatenate(v)) for k, v in out.items()}


def _paper_sizes(n: int) -> tuple[int, int]:
    """Test and validation sizes for data with no official split: 10% test; validation 1k (paper) or 10%."""
    n_test = max(1, n // 10)
    n_val = 1000 if n - n_test >= 10_000 else max(1, (n - n_test) // 10)
    return n_test, n_val


def _frame_loader(name: str, loader, text_col: str, label_fn) -> Callable:
    def load(data_dir: Path, seed: int) -> dict[str, list[Example]]:
        df = offline_data.cached_parquet(name, loader, data_dir)
        df = label_fn(df)
        labels = df["label"].to_numpy()
        strat_labels = labels if df.attrs.get("stratify", True) else np.zeros(len(labels))
        n_test, n_val = _paper_sizes(len(df))
        idx = seeded_splits(strat_labels, seed, True, n_test, n_val)
        return {s: [Example(str(df[text_col].iat[i]), None, float(labels[i])) for i in ix] for s, ix in idx.items()}

    return load


def _rt_binary(df):
    df = df[df["rating"] != 0].copy()  # 37 neutral snippets have no binary label
    df["label"] = (df["rating"] > 0).astype(int)
    return df.reset_index(drop=True)


def _rt_rating(df):
    df = df.copy()
    df["label"] = df["rating"].astype(float)
    df.attrs["stratify"] = False
    return df


def _plus_minus(df):
    df = df.copy()
    df["label"] = (df["label"] > 0).astype(int)
    return df


BBC_TOPICS = ["business", "entertainment", "politics", "sports", "tech"]  # the folder names in the wheel


def _bbc(df):
    df = df.copy()
    df["label"] = df["topic"].map(BBC_TOPICS.index)
    return df


# ---------------------------------------------------------------- GLUE (hub, for users online)

GLUE = {  # name: (fields, label names, verbalizers, metric, small set?)
    "cola": (("sentence",), ["unacceptable", "acceptable"], ["unacceptable", "acceptable"], "matthews_correlation", True),
    "sst2": (("sentence",), ["negative", "positive"], ["negative", "positive"], "accuracy", False),
    "mrpc": (("sentence1", "sentence2"), ["not_equivalent", "equivalent"], ["not_equivalent", "equivalent"], "f1_accuracy_mean", True),
    "qqp": (("question1", "question2"), ["not_duplicate", "duplicate"], ["not_duplicate", "duplicate"], "f1_accuracy_mean", False),
    "stsb": (("sentence1", "sentence2"), [], [], "pearson_spearman_mean", True),
    "mnli": (("premise", "hypothesis"), ["entailment", "neutral", "contradiction"], ["entailment", "neutral", "contradiction"], "accuracy", False),
    "qnli": (("question", "sentence"), ["entailment", "not_entailment"], ["entailment", "not_entailment"], "accuracy", False),
    "rte": (("sentence1", "sentence2"), ["entailment", "not_entailment"], ["entailment", "not_entailment"], "accuracy", True),
}


def _glue_loader(name: str, fields: tuple[str, ...], small: bool):
    def load(data_dir: Path, seed: int) -> dict[str, list[Example]]:
        import datasets  # hub access: users online; never at test time

        ds = datasets.load_dataset("glue", name, cache_dir=str(Path(data_dir) / "hf"))

        def rows(split, idx=None):
            d = ds[split] if idx is None else ds[split].select(idx)
            b = d[fields[1]] if len(fields) > 1 else [None] * len(d)
            return [Example(a, bb, float(l)) for a, bb, l in zip(d[fields[0]], b, d["label"])]

        rng = np.random.default_rng(seed)
        # paper (sec. 4, after Mahabadi et al.): 1k of train -> validation, original validation -> test;
        # small sets split the original validation in halves; MNLI: mismatched -> validation, matched -> test.
        if name == "mnli":
            return {"train": rows("train"), "validation": rows("validation_mismatched"), "test": rows("validation_matched")}
        if small:
            perm = rng.permutation(len(ds["validation"]))
            half = len(perm) // 2
            return {"train": rows("train"), "validation": rows("validation", np.sort(perm[:half])),
                    "test": rows("validation", np.sort(perm[half:]))}
        perm = rng.permutation(len(ds["train"]))
        return {"train": rows("train", np.sort(perm[1000:])), "validation": rows("train", np.sort(perm[:1000])),
                "test": rows("validation")}

    return load


SENTIMENT = "Is this movie review negative or positive? Answer with one word: negative or positive."
STSB_BINS = [round(0.2 * i, 1) for i in range(26)]  # T5 casts STS-B as 26 classes, 0.0..5.0 step 0.2
RATING_BINS = [round(-4 + 0.5 * i, 1) for i in range(17)]


def registry() -> dict[str, Task]:
    tasks = {
        "rt-sentiment": Task("rt-sentiment", "classification", ["negative", "positive"], ["negative", "positive"],
                             "sst2", loader=_frame_loader("rt_snippets", offline_data.rt_snippets, "text", _rt_binary),
                             instruction=SENTIMENT),
        "rt-rating": Task("rt-rating", "regression", [], [str(b) for b in RATING_BINS], "rating",
                          metric="pearson_spearman_mean", regression_bins=RATING_BINS,
                          loader=_frame_loader("rt_snippets", offline_data.rt_snippets, "text", _rt_rating),
                          instruction="Rate this movie review from -4.0 (very negative) to 4.0 (very positive) in "
                                      "steps of 0.5. Answer with the number only."),
        "pang-lee": Task("pang-lee", "classification", ["negative", "positive"], ["negative", "positive"], "sst2",
                         loader=_frame_loader("pang_lee", offline_data.pang_lee, "text", _plus_minus),
                         instruction=SENTIMENT),
        "hedge-conll2010": Task("hedge-conll2010", "classification", ["label_-1", "label_1"], ["no", "yes"], "hedge",
                                loader=_frame_loader("hedge_conll2010", offline_data.hedge_conll2010, "text", _plus_minus),
                                instruction="Does this sentence hedge, that is, express uncertainty or speculation "
                                            "rather than a fact? Answer with one word: yes or no."),
        "bbc-topics": Task("bbc-topics", "classification", BBC_TOPICS, BBC_TOPICS, "topic", field_names=("article",),
                           loader=_frame_loader("bbc_topics", offline_data.bbc_topics, "text", _bbc),
                           instruction="Which topic is this news article about: business, entertainment, politics, "
                                       "sports or tech? Answer with one word."),
    }
    for name, (fields, labels, verb, metric, small) in GLUE.items():
        kind = "regression" if name == "stsb" else "classification"
        tasks[f"glue/{name}"] = Task(
            f"glue/{name}", kind, labels, verb if kind == "classification" else [str(b) for b in STSB_BINS],
            name, field_names=fields, metric=metric, regression_bins=STSB_BINS if kind == "regression" else [],
            loader=_glue_loader(name, fields, small))
    return tasks


# ---------------------------------------------------------------- local files

def check_utf8(path: Path) -> None:
    """Name the first line that is not UTF-8 (pandas only says 'codec can't decode byte 0xe9 in position 41')."""
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {number} is not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
                                "re-save the file as UTF-8") from None


def _read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if not path.exists():
        raise DataError(f"task file: data file {path} does not exist")
    if suffix not in (".csv", ".json", ".jsonl", ".parquet"):
        raise DataError(f"task file: {path} has an unsupported extension {suffix!r}; use .csv, .json, .jsonl or .parquet")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes); it needs a header row and at least one example")
    if suffix != ".parquet":
        check_utf8(path)
    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix in (".json", ".jsonl"):
            return pd.read_json(path, lines=suffix == ".jsonl")
        return pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - pandas/pyarrow raise many types for a malformed file
        raise DataError(f"{path}: cannot be read as {suffix[1:]} ({type(e).__name__}: {e}); fix or re-export the file") from None


def _cell_text(x) -> str:
    return x if isinstance(x, str) else ("" if x is None or (isinstance(x, float) and math.isnan(x)) else str(x))


def local_task(spec_path: str | Path) -> Task:
    """A task described by a YAML file:

    name: my-task
    kind: classification          # or regression, or generation (decoder-only: the label column is free text)
    text_columns: [sentence]      # one or two
    label_column: label
    label_names: [neg, pos]       # classification: index i <-> name; values in the file may be names or indices
    verbalizers: [negative, positive]   # optional, default label_names
    prompt: "sst2"      # optional
    instruction: "Is this review negative or positive?"   # optional: the question of a chat prompt
    files: {train: train.csv, validation: dev.csv, test: test.csv}   # paths relative to the YAML file
    """
    spec_path = Path(spec_path)
    spec = read_yaml(spec_path, "task: file")
    if not isinstance(spec, dict) or not isinstance(spec.get("files", {}), dict):
        raise ConfigError(f"task file {spec_path}: expected a mapping with kind, text_columns, label_column and files "
                          "(a mapping of split name to data file)")
    for key in ("kind", "text_columns", "label_column", "files"):
        if key not in spec:
            raise ConfigError(f"task file {spec_path}: missing key '{key}'")
    kind = spec["kind"]
    if kind not in ("classification", "regression", "generation"):
        raise ConfigError(f"task file {spec_path}: kind {kind!r} is not classification, regression or generation")
    text_cols = list(spec["text_columns"])
    if not 1 <= len(text_cols) <= 2:
        raise ConfigError(f"task file {spec_path}: text_columns must list one or two columns, got {text_cols}")
    label_names = [str(x) for x in spec.get("label_names", [])]
    if kind == "classification" and not label_names:
        raise ConfigError(f"task file {spec_path}: classification needs label_names")
    bins = [float(b) for b in spec.get("regression_bins", [])]
    label_col = spec["label_column"]

    def load(data_dir: Path, seed: int) -> dict[str, list[Example]]:
        out = {}
        for split, rel in spec["files"].items():
            df = _read_table(spec_path.parent / rel)
            for col in text_cols + [label_col]:
                if col not in df.columns:
                    raise DataError(f"{spec_path.parent / rel}: missing column '{col}' (has: {', '.join(map(str, df.columns))})")
            # an empty cell reads as NaN: it becomes "" (and is refused by validate_examples), never "nan"
            b = [_cell_text(x) for x in df[text_cols[1]].tolist()] if len(text_cols) > 1 else [None] * len(df)
            a = [_cell_text(x) for x in df[text_cols[0]].tolist()]
            if kind == "generation":
                out[split] = [Example(x, y, 0.0, _cell_text(t)) for x, y, t in zip(a, b, df[label_col].tolist())]
                continue
            labels = []
            for i, v in enumerate(df[label_col].tolist()):
                if kind == "classification" and isinstance(v, str) and v in label_names:
                    v = label_names.index(v)
                try:
                    labels.append(float(v))
                except (TypeError, ValueError):
                    raise DataError(f"{rel}: row {i} label {v!r} is not in {label_names}")
            out[split] = [Example(x, y, l) for x, y, l in zip(a, b, labels)]
        return out

    metric = {"classification": "accuracy", "regression": "pearson_spearman_mean", "generation": "exact_match"}[kind]
    return Task(spec.get("name", spec_path.stem), kind, label_names if kind != "generation" else [],
                [] if kind == "generation" else
                [str(v) for v in spec.get("verbalizers", label_names or [str(b) for b in bins])],
                spec.get("prompt", ""), field_names=tuple(text_cols), metric=spec.get("metric", metric),
                loader=load, regression_bins=bins, instruction=str(spec.get("instruction", "")))


def get_task(name: str) -> Task:
    if name.endswith((".yaml", ".yml")):
        return local_task(name)
    tasks = registry()
    if name not in tasks:
        raise ConfigError(f"task: unknown task {name!r}; known: {', '.join(sorted(tasks))}, or a task .yaml file")
    return tasks[name]
