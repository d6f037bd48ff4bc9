"""Typed stage configs. One source of truth: a params.yaml section per stage, CLI flags override.

Each field's `help` is also its `--help` text (see `click_options`), so the flag, the YAML key and
the dataclass field are the same name (dashes on the command line).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError

DROPOUT_SITES = ("dropout", "attn_dropout", "ff_dropout", "emb_dropout", "final_dropout")  # the official side net's
ALL_DROPOUT_SITES = DROPOUT_SITES + ("ladder_dropout",)  # + ours, off unless set by name


def check_dropout_rates(obj) -> None:
    """Every dropout site of a TrainConfig or SideSpec in [0, 1); the error names the field."""
    for name in ALL_DROPOUT_SITES:
        if not 0.0 <= float(getattr(obj, name)) < 1.0:
            raise ConfigError(f"{name}: must be in [0, 1), got {getattr(obj, name)}")

DTYPES = ("auto", "fp32", "fp16", "bf16")
CODECS = ("zstd", "none", "blosc", "int8", "bitround")
INITS = ("fisher", "magnitude", "random")
FEEDS = ("cache", "backbone")
VARIANTS = ("ladder", "fuse_after", "no_ladder", "late_fusion", "adapter", "cross_attention")
VARIANT_HELP = ("ladder (LST) | fuse_after (ablation: ladder fused after its side block) | no_ladder (network "
                "compression) | late_fusion (Side-Tuning) | adapter | cross_attention (paper ablations).")
DEVICES = ("auto", "cpu", "cuda")
TASK_HELP = ("A built-in task (list: python -m stages.tasks) or a task .yaml file of your own (schema and check: "
             "python -m stages.tasks --help). Given on the command line, the stage's input and output folders default "
             "to that task's (data/<task>/..., runs/<task>/side).")
PROMPT_FORMATS = ("plain", "chat")  # pipeline/prompting.py (config imports no pipeline module but errors)
SWEEP_STACK = ("auto", "always", "never")
DOWNSAMPLERS = ("linear", "lowrank")
GATES = ("lst", "qst")


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def parse_layers(value) -> tuple[int, ...] | None:
    """'all' or None -> None (every layer); '1,2,3' / [1,2,3] -> (1, 2, 3)."""
    if value is None or value == "all":
        return None
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.replace(" ", "").split(",") if v != ""]
        except ValueError:
            raise ConfigError(f"layers: {value!r} is not 'all' or a comma-separated list of layer indices")
    layers = tuple(sorted({int(v) for v in value}))
    if not layers:
        raise ConfigError("layers: the list is empty; give 'all' or at least one layer index")
    return layers


def parse_decoder_layers(value) -> tuple[int, ...] | None | str:
    """T5 side decoder layers: 'same' (the encoder's list), else as parse_layers (None = every layer)."""
    if value in (None, "same"):
        return "same"
    return parse_layers(value)


def yaml_problem(where: str, e: Exception) -> ConfigError:
    """A YAML syntax error as one line: file, line, column and the parser's complaint."""
    mark = getattr(e, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return ConfigError(f"{where}: not valid YAML{at}: {getattr(e, 'problem', None) or e}")


def read_yaml(path: str | Path, what: str, missing_hint: str = ""):
    """A YAML file's content ({} when empty), or one error naming the file (and where its syntax breaks)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} {path} does not exist{missing_hint}")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise yaml_problem(f"{what} {path}", e) from None


def _check_choice(name: str, value, choices):
    if value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, choices))}")


def scheduler_workers(value: str) -> int | None:
    """'local:N' -> N, 'local' -> 0 (one per GPU), '' or an address -> None."""
    if not value or not value.startswith("local"):
        if value and "://" not in value and ":" not in value:
            raise ConfigError(f"scheduler: {value!r} is not '', 'local', 'local:N' or a scheduler address such as "
                              "tcp://host:8786")
        return None
    n = value[len("local"):]
    if n == "":
        return 0
    if not (n.startswith(":") and n[1:].isdigit() and int(n[1:]) >= 1):
        raise ConfigError(f"scheduler: {value!r}: write local:N with N >= 1 workers, e.g. local:2")
    return int(n[1:])


class LayerChoice:
    """The `layers` / `decoder_layers` fields that stage one, prune_init and train_side share, parsed one way."""

    def check_layers(self):
        parse_layers(self.layers)  # validates
        parse_decoder_layers(self.decoder_layers)

    @property
    def layer_list(self) -> tuple[int, ...] | None:
        return parse_layers(self.layers)

    @property
    def decoder_layer_list(self) -> tuple[int, ...] | None | str:
        return parse_decoder_layers(self.decoder_layers)


@dataclass
class CacheConfig(LayerChoice):
    """Stage one: run the frozen backbone once and write the ladder store."""

    backbone: str = _f("sentence-transformers/all-MiniLM-L6-v2", "Hub name or local folder of the frozen backbone.")
    task: str = _f("rt-sentiment", TASK_HELP)
    splits: list = _f(["train", "validation", "test"], "Splits to cache (repeat --splits).", multiple=True)
    max_length: int = _f(64, "Truncate inputs to this many tokens.")
    layers: str = _f("all", "Backbone layers to store, 0-based, e.g. '1,2,3,5', or 'all' (T5: the encoder's).")
    decoder_layers: str = _f("same", "T5 decoder layers to store: 'same' (as --layers), 'all' or a list.")
    dtype: str = _f("auto", "Stored dtype: auto (bf16 if the backbone ran in bf16, else fp16), fp32, fp16, bf16.")
    codec: str = _f("zstd", "zstd|blosc|none (lossless) or int8|bitround (lossy, opt-in).")
    batch_size: int = _f(64, "Examples per backbone forward pass.")
    limit: int = _f(0, "Cache only the first N examples of each split (0 = all).")
    out: str = _f("data/cache", "Output folder; one <split>.zarr store per split.")
    data_dir: str = _f("data/raw", "Where offline datasets are fetched and converted to Parquet.")
    resume: bool = _f(True, "Resume an interrupted store made from the same config.")
    overwrite: bool = _f(False, "Replace an existing store made from a different config (with --no-resume: "
                                "rebuild any existing store, a damaged one included).")
    device: str = _f("auto", "auto|cpu|cuda.")
    seed: int = _f(0, "Seed of the train/validation/test split for tasks without official splits.")
    shard_tokens: int = _f(32768, "Tokens per shard file (also the resume block).")
    chunk_tokens: int = _f(256, "Tokens per inner chunk (the unit of a random read).")
    scheduler: str = _f("", "Where the backbone runs: '' in this process; 'local:N' N dask.distributed workers on "
                            "this machine ('local': one per GPU); or a dask scheduler address (tcp://host:8786) "
                            "whose workers share --out's file system. Same store, bit for bit (see --threads).")
    threads: int = _f(0, "CPU: torch threads of each process running the backbone (0: torch's default here, this "
                         "machine's cores shared out among local:N workers). The CPU forward's last bits can depend "
                         "on it (tiny T5's decoder: 1 vs 2 threads), so fix it to compare stores across schedulers.")
    prompt_format: str = _f("plain", "Decoder-only prompts: plain (the T5-style text, ' <verbalizer>' after it) or "
                                     "chat (the model's chat template with the task's instruction).")
    dropout_passes: int = _f(0, "Also write K stores train.dropout<i>.zarr, each a pass of the backbone over the train "
                                "split in train mode (its own dropout on, masks seeded by --seed, the pass and the "
                                "window), for train_side --dropout-passes: the official code's train-mode backbone "
                                "from a cache, at K times the train store's size (0 = off).")

    def __post_init__(self):
        _check_choice("prompt_format", self.prompt_format, PROMPT_FORMATS)
        _check_choice("dtype", self.dtype, DTYPES)
        scheduler_workers(self.scheduler)  # validates
        if "://" in str(self.out):
            raise ConfigError(f"out: {self.out} is a URL; a ladder store lives in a local or shared POSIX folder "
                              "(its record is replaced atomically, its lock file created exclusively), mounted at "
                              "the same path on every dask worker")
        _check_choice("codec", self.codec, CODECS)
        _check_choice("device", self.device, DEVICES)
        if int(self.max_length) <= 0:
            raise ConfigError(f"max_length: must be a positive number of tokens, got {self.max_length}")
        if int(self.batch_size) <= 0:
            raise ConfigError(f"batch_size: must be positive, got {self.batch_size}")
        if int(self.limit) < 0:
            raise ConfigError(f"limit: must be >= 0 (0 = all examples), got {self.limit}")
        if int(self.threads) < 0:
            raise ConfigError(f"threads: must be >= 0 (0 = torch's default), got {self.threads}")
        if int(self.dropout_passes) < 0:
            raise ConfigError(f"dropout_passes: must be >= 0 (0 = off), got {self.dropout_passes}")
        if self.chunk_tokens <= 0 or self.shard_tokens % self.chunk_tokens:
            raise ConfigError(
                f"shard_tokens: {self.shard_tokens} must be a positive multiple of chunk_tokens ({self.chunk_tokens})"
            )
        if isinstance(self.splits, str):
            self.splits = [self.splits]
        self.splits = list(self.splits)
        if not self.splits:
            raise ConfigError("splits: give at least one split name")
        self.check_layers()


@dataclass
class PruneConfig(LayerChoice):
    """Side-network init from the backbone (paper sec. 3.3); Fisher needs the backbone, so it runs here."""

    backbone: str = _f("sentence-transformers/all-MiniLM-L6-v2", "Hub name or local folder of the frozen backbone.")
    task: str = _f("rt-sentiment", TASK_HELP + " Its training examples estimate the Fisher information.")
    r: int = _f(8, "Reduction factor: side hidden sizes are the backbone's divided by r.",
                aliases=("--reduction-factor",))
    layers: str = _f("all", "Kept side layers (0-based backbone layer indices) or 'all' (T5: the side encoder's).")
    decoder_layers: str = _f("same", "T5 side decoder layers: 'same' (as --layers), 'all' or a list.")
    init: str = _f("fisher", "fisher|magnitude|random.")
    variant: str = _f("ladder", VARIANT_HELP)
    fisher_samples: int = _f(256, "Training examples N of the empirical Fisher.")
    batch_size: int = _f(16, "Examples per backward pass while estimating Fisher.")
    max_length: int = _f(64, "Truncate inputs to this many tokens.")
    out: str = _f("data/side_init.safetensors", "Output safetensors file.")
    data_dir: str = _f("data/raw", "Where offline datasets live.")
    device: str = _f("auto", "auto|cpu|cuda.")
    seed: int = _f(0, "Seed (data split and random init).")
    prompt_format: str = _f("plain", "Decoder-only prompts of the Fisher examples: plain or chat (as the cache's).")

    def __post_init__(self):
        _check_choice("prompt_format", self.prompt_format, PROMPT_FORMATS)
        _check_choice("init", self.init, INITS)
        _check_choice("variant", self.variant, VARIANTS)
        _check_choice("device", self.device, DEVICES)
        if int(self.r) < 1:
            raise ConfigError(f"r: the reduction factor must be >= 1, got {self.r}")
        for name in ("fisher_samples", "batch_size", "max_length"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        self.check_layers()


@dataclass
class TrainConfig(LayerChoice):
    """Stage two: train the side network from the ladder store (or, for comparison, the live backbone)."""

    task: str = _f("rt-sentiment", TASK_HELP + " It must be the cache's.")
    cache: str = _f("data/cache", "Folder with <split>.zarr stores from stage one.")
    out: str = _f("runs/side", "Output folder: side.safetensors, side_config.json, metrics.json, plots.")
    backbone: str = _f("sentence-transformers/all-MiniLM-L6-v2", "Backbone (frozen tensors the side net reuses; --feed backbone).")
    r: int = _f(8, "Reduction factor r.", aliases=("--reduction-factor",))  # torchrun's parser takes --r
    init: str = _f("fisher", "fisher|magnitude|random (paper Fig. 7: Fisher is best). fisher needs --side-init from "
                             "prune_init; magnitude and random can also be built here (--side-init '').")
    side_init: str = _f("data/side_init.safetensors", "side_init.safetensors from the prune_init stage ('' = build "
                                                      "the magnitude or random init here).")
    layers: str = _f("all", "Kept side layers (0-based backbone layer indices) or 'all'; must be stored in the cache "
                            "(T5: the side encoder's).")
    decoder_layers: str = _f("same", "T5 side decoder layers: 'same' (as --layers), 'all' or a list.")
    variant: str = _f("ladder", VARIANT_HELP)
    epochs: int = _f(10, "Epochs (paper: 10, 20 on small sets).")
    lr: float = _f(3e-3, "Peak learning rate (paper: 3e-3 for LST).")
    batch_size: int = _f(100, "Examples per step (paper: 100).")
    batch_tokens: int = _f(0, "Fill each step to this many tokens instead of --batch-size examples (0 = off).")
    pack: bool = _f(False, "Lay a batch's examples end to end in rows as long as the split's longest example, "
                           "attention confined to each example, instead of padding every example to the "
                           "batch's longest (same loss; less work on short texts).")
    warmup_steps: int = _f(500, "Linear warmup steps, capped at 10% of all steps for short runs.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    grad_clip: float = _f(1.0, "Max gradient norm.")
    dropout: float = _f(0.1, "Side-net dropout on each residual branch (official side net: T5's dropout_rate, 0.1).")
    attn_dropout: float = _f(0.1, "Side-net dropout on attention probabilities (official: 0.1).")
    ff_dropout: float = _f(0.1, "Side-net dropout inside the feed-forward, after the activation (official: 0.1).")
    emb_dropout: float = _f(0.1, "Dropout on the embedding output before the first ladder (official: 0.1).")
    final_dropout: float = _f(0.1, "Dropout after the side stack's final norm (official: 0.1).")
    ladder_dropout: float = _f(0.0, "Dropout on each backbone state before its ladder down-projection. Not in the "
                                    "official side net (0 = off): a cache-side stand-in for the official code's "
                                    "train-mode backbone, whose dropout a cache of eval-mode states cannot hold.")
    mix_final: bool = _f(False, "Mix up(side) with the backbone's final state by a learned gate before the head, as "
                                "QST does (and late fusion, on top of the ladders); reads the last layer's states. "
                                "The gate is --gate's.")
    downsampler: str = _f("linear", "Ladder down-projections: linear (LST: d -> d/r with bias) or lowrank (QST: "
                                    "d -> k -> d/r, SiLU between, no biases, LayerNorm after).")
    downsampler_rank: int = _f(16, "lowrank downsamplers: the inner width k (QST's peft_hidden_size, 16 in its "
                                   "scripts).")
    gate: str = _f("lst", "Learned gates of the ladders and of the final mix. lst: one scalar each, sigmoid(alpha / "
                          "0.1), alpha = 0 (the LST paper, sec. 3.2; official merge_last for the mix). qst: one per "
                          "dimension, sigmoid(z) without temperature, z = 0.5 on the side state of each ladder and "
                          "1.0 on the backbone's side of the final mix (QST, modeling_llama_qst.py).")
    backbone_dropout: bool = _f(False, "--feed backbone only: run the frozen backbone in train mode, so the ladders "
                                       "see its dropout as in the official code (eval-mode cached states never do).")
    dropout_passes: int = _f(0, "Train epoch e on the cache's train-mode pass e mod K (train.dropout<i>.zarr, from "
                                "cache_activations --dropout-passes K) instead of its eval-mode train store: the "
                                "official code's backbone dropout from a cache. K = --epochs draws fresh masks every "
                                "epoch, as in the loop (0 = off).")
    seed: int = _f(0, "Seed of init, shuffling and dropout.")
    limit: int = _f(0, "Train on the first N cached examples only (0 = all).")
    feed: str = _f("cache", "cache (ours) or backbone (in-loop LST over the same examples).")
    select_k: int = _f(0, "Token-selective training of the side net: gradients through k random source positions "
                          "plus the first (0 = every position). T5 and encoder side nets.")
    data_seed: int = _f(-1, "Seed of the example order (-1: --seed). Configs of a sweep share one order.")
    sweep: str | dict = _f("", "A YAML file of lists (e.g. 'lr: [0.001, 0.003]' and 'seed: [0, 1]'; a `configs:` list adds "
                        "single configs): train their cartesian product from one read of each batch, each config in "
                        "--out/<name>, the best on validation also in --out. In params.yaml the mapping may be "
                        "inline. Keys that may vary: lr, seed, r, init, side_init, layers, decoder_layers, variant, "
                        "select_k, epochs, mix_final, weight_decay, warmup_steps, grad_clip and the dropouts.")
    sweep_stack: str = _f("auto", "Sweep: how configs share a batch. never: each config steps on its own with its "
                                  "own dropout stream, ending bit for bit where it would alone. always: configs of "
                                  "one side-net shape step as one stacked computation (torch.func.vmap), equal to "
                                  "alone to float tolerance without dropout and in distribution with it. auto: "
                                  "always on CUDA, never on CPU (stacking 4 side nets measured 0.71-0.81x the "
                                  "speed of stepping them in turn on 2 cores: bench/results/stage_two_cpu.json).")
    resume: bool = _f(False, "Continue from the last epoch checkpoint in --out.")
    device: str = _f("auto", "auto|cpu|cuda.")
    max_length: int = _f(64, "Token limit for --feed backbone (must equal the cache's).")
    data_dir: str = _f("data/raw", "Where offline datasets live (for --feed backbone).")
    ram_budget_mb: int = _f(4096, "Hold a split in RAM when its requested layers fit; else stream shard groups.")
    device_cache_mb: int = _f(8192, "CUDA: hold a split on the GPU in its stored dtype (fp16/bf16/int8) when its "
                                    "requested states fit this many MiB, and gather + decode batches there; a "
                                    "split that does not fit is read by the host reader (0 = always the host).")

    def __post_init__(self):
        _check_choice("init", self.init, INITS)
        _check_choice("feed", self.feed, FEEDS)
        _check_choice("variant", self.variant, VARIANTS)
        _check_choice("device", self.device, DEVICES)
        _check_choice("downsampler", self.downsampler, DOWNSAMPLERS)
        _check_choice("gate", self.gate, GATES)
        _check_choice("sweep_stack", self.sweep_stack, SWEEP_STACK)
        for name in ("r", "epochs", "batch_size", "max_length", "ram_budget_mb", "downsampler_rank"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("limit", "warmup_steps", "select_k", "batch_tokens"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name}: must be >= 0 (0 = off / all), got {getattr(self, name)}")
        if not (math.isfinite(float(self.lr)) and float(self.lr) > 0):
            raise ConfigError(f"lr: must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(float(self.grad_clip)) and float(self.grad_clip) > 0):
            raise ConfigError(f"grad_clip: must be a finite number > 0, got {self.grad_clip}")
        if not (math.isfinite(float(self.weight_decay)) and float(self.weight_decay) >= 0):
            raise ConfigError(f"weight_decay: must be a finite number >= 0, got {self.weight_decay}")
        check_dropout_rates(self)
        if self.pack and self.feed == "backbone":
            raise ConfigError("pack: in-loop LST (--feed backbone) runs the backbone on padded batches; drop --pack")
        if self.pack and int(self.select_k):
            raise ConfigError("pack: token-selective training (select_k) takes padded batches; drop one of them")
        if self.backbone_dropout and self.feed != "backbone":
            raise ConfigError("backbone_dropout: only with --feed backbone; from the cache use --dropout-passes")
        if int(self.dropout_passes) < 0:
            raise ConfigError(f"dropout_passes: must be >= 0 (0 = off), got {self.dropout_passes}")
        if int(self.dropout_passes) and self.feed != "cache":
            raise ConfigError("dropout_passes: reads the cache's train-mode passes (--feed cache); in the loop use "
                              "--backbone-dropout")
        self.check_layers()

    @property
    def dropouts(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in ALL_DROPOUT_SITES}


@dataclass
class EvalConfig:
    """Evaluate a trained side network from the cache, with the frozen-features baseline beside it."""

    task: str = _f("", "The run's task ('' = whatever the run was trained on); given on the command line, the run, "
                       "cache and output default to that task's folders (runs/<task>/side, data/<task>/cache).")
    run: str = _f("runs/side", "Folder written by train_side (a sweep's --out holds its best config).")
    cache: str = _f("data/cache", "Folder with <split>.zarr stores.")
    split: str = _f("test", "Split to evaluate.")
    out: str = _f("runs/side/eval", "Output folder: metrics.json, predictions, confusion plot.")
    batch_size: int = _f(256, "Examples per evaluation step.")
    device: str = _f("auto", "auto|cpu|cuda.")

    def __post_init__(self):
        _check_choice("device", self.device, DEVICES)
        if int(self.batch_size) < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")


def load_section(params_file: str | Path | None, section: str) -> dict:
    """The `section` mapping of a params.yaml ({} if the file or section is absent)."""
    if not params_file:
        return {}
    path = Path(params_file)
    if not path.exists():
        return {}
    data = read_yaml(path, "params file")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of stage sections at the top level")
    sec = data.get(section) or {}
    if not isinstance(sec, dict):
        raise ConfigError(f"{path}: section '{section}' must be a mapping")
    return sec


def build(cls, params_file=None, section: str | None = None, **overrides):
    """cls from params.yaml[section] then non-None overrides; unknown keys are an error naming them."""
    from_file = dict(load_section(params_file, section)) if section else {}
    flags = {k: v for k, v in overrides.items() if v is not None and v != ()}
    values = {**from_file, **flags}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"{section or cls.__name__}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}"
        )
    for f in dataclasses.fields(cls):
        if values.get(f.name) is not None:
            where = f"--{f.name.replace('_', '-')}" if f.name in flags else f"{params_file} [{section}] {f.name}"
            values[f.name] = _typed(f, values[f.name], where)
    if flags.get("task") and flags["task"] != from_file.get("task"):
        values.update({k: v for k, v in task_paths(cls, flags["task"]).items() if k not in flags})
    return cls(**values)


def task_name(task: str) -> str:
    """A task's name without loading it: a built-in name as is, a task file's `name:` (else its file stem).
    A file that cannot be read is reported by the stage that loads it."""
    if not task.endswith((".yaml", ".yml")):
        return task
    try:
        spec = yaml.safe_load(Path(task).read_text()) or {}
        return str(spec.get("name") or Path(task).stem) if isinstance(spec, dict) else Path(task).stem
    except (OSError, yaml.YAMLError):
        return Path(task).stem


def task_paths(cls, task: str) -> dict[str, str]:
    """Where each stage reads and writes for a task named on the command line (one flag is enough: the stages
    find each other's outputs): data/<task>/cache, data/<task>/side_init.safetensors, runs/<task>/side."""
    name = task_name(task).replace("/", "_")
    data, run = Path("data") / name, Path("runs") / name / "side"
    init = data / "side_init.safetensors"
    return {CacheConfig: {"out": str(data / "cache")},
            PruneConfig: {"out": str(init)},
            TrainConfig: {"cache": str(data / "cache"), "out": str(run), "side_init": str(init) if init.exists() else ""},
            EvalConfig: {"run": str(run), "cache": str(data / "cache"), "out": str(run / "eval")}}.get(cls, {})


def _typed(f, v, where: str):
    """A params.yaml value of the field's type, or an error naming where it came from. YAML reads
    `epochs: 1.9` as a float and `epochs: true` as a bool; int() would silently make both 1."""
    if f.type == "bool":
        if isinstance(v, bool):
            return v
        raise ConfigError(f"{where}: {v!r} is not true or false")
    if f.type == "int":
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            return int(v)
        raise ConfigError(f"{where}: {v!r} is not a whole number")
    if f.type == "float":
        try:
            x = float(v) if not isinstance(v, bool) else None  # YAML 1.1 reads 1e-3 (no dot) as a string
        except (TypeError, ValueError):
            x = None
        if x is None or not math.isfinite(x):
            raise ConfigError(f"{where}: {v!r} is not a finite number")
        return x
    if f.type == "str":
        if isinstance(v, str):
            return v
        if f.name in ("layers", "decoder_layers") and isinstance(v, (list, tuple)) and all(
                isinstance(x, int) and not isinstance(x, bool) for x in v):
            return v
        hint = (f"; write '{v}' (quoted) to keep layer {v} only, a list like [0, 1, 2], or 'all'"
                if f.name in ("layers", "decoder_layers") and isinstance(v, int) else "; quote it")
        raise ConfigError(f"{where}: {v!r} is not text{hint}")
    if f.metadata.get("multiple") and not (isinstance(v, str) or (isinstance(v, (list, tuple))
                                                                   and all(isinstance(x, str) for x in v))):
        raise ConfigError(f"{where}: {v!r} is not a name or a list of names")
    return v


def click_options(cls, section: str | None = None, params_file: str = "params.yaml"):
    """Decorator adding one click option per dataclass field (help from the field's metadata).

    Defaults are None so that params.yaml stays the source of truth unless a flag is given. The help shows
    the value a run will use without the flag: the `section` of ./params.yaml when it sets the key, else the
    built-in default, and says which.
    """
    import click

    try:
        from_params = load_section(params_file, section) if section else {}
    except ConfigError:  # a broken params.yaml is reported when the stage runs, not by --help
        from_params = {}

    def deco(fn):
        for f in reversed(dataclasses.fields(cls)):
            flag = "--" + f.name.replace("_", "-")
            help_ = f.metadata.get("help", "")
            if f.name in from_params:
                help_ = f"{help_} [default: {from_params[f.name]!r} from {params_file}]"
            else:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                help_ = f"{help_} [default: {default!r}, built in]"
            if f.type == "bool":
                fn = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_)(fn)
            elif f.metadata.get("multiple"):
                fn = click.option(flag, f.name, multiple=True, default=None, help=help_)(fn)
            else:
                typ = {"int": int, "float": float}.get(f.type, str)
                # aliases: torchrun's argument parser reads `--r` as an abbreviation of its own --rdzv-*
                # options and stops (python 3.11 argparse, allow_abbrev), so --r also goes by --reduction-factor
                fn = click.option(flag, *f.metadata.get("aliases", ()), f.name, type=typ, default=None, help=help_)(fn)
        return fn

    return deco


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
