"""The ladder store: one Zarr v3 group per (backbone, task, split). This file is the cache format.

Layout of `<out>/<split>.zarr` (format version 2):

    offsets            (n + 1,) int64     example i's source tokens are rows offsets[i]:offsets[i+1]
    src_ids            (total_tokens,) int32   token ids, no padding anywhere
    labels             (n,) float32       class index or regression target
    layers/<name>      (rows, d)          one array per stored state, e.g. src_emb, src_03, tgt_05
    layers/<name>_scale (rows, 1) float32  int8 codec only: per-token absmax / 127
    cand_ids           int32              T5 / decoder-only: all candidate verbalizers' token ids, concatenated
    cand_offsets       (C + 1,) int64     candidate c is cand_ids[cand_offsets[c]:cand_offsets[c+1]]
    answer_start       (n,) int32         decoder-only generation tasks: where the answer starts in each example
                                          (src_ids hold prompt + answer + end token)
    _progress.json     the completion record (see Integrity); the only source of truth for completeness

`src_*` arrays have one row per source token (ragged, rows = offsets). `tgt_*` arrays hold, for every example,
the states of every candidate verbalizer: T5's teacher-forced decoder states of all its tokens; a decoder-only
model's states at the candidate's positions after the example's prompt, all but the last token (layout.tgt_lengths:
single-token verbalizers need none, and then no tgt_* array exists). K rows per example (row i*K + tgt_offsets[c]
+ u), so evaluation ranks candidates from the cache and training uses the gold candidate's rows. The embedding
output is stored only for encoder-only backbones (see layout.stores_embedding); T5 / decoder-only side nets
recompute it from token ids.

Writes go through `StoreWriter`, which only ever writes whole shards (plus the final partial one)
and records each array's shard count atomically after the write: a kill at any point loses at most
the shards in flight. A resumed run restarts at the forward batch holding the first unwritten row
(stage one's batches start at multiples of batch_size from example 0, so they are the clean run's
batches: the CPU forward is not bit-stable across batch shapes) and writes byte-identical files;
tests/test_ladder_store.py kills it at every shard write. Stored dtypes: fp32, fp16, bf16 (a uint16
view: zarr 3.1 has no bfloat16), int8 (per-token absmax) and fp16 with BitRound; see `CODEC_NOTES`.

Integrity. `_progress.json` is {fingerprint, shards, files, complete, record_sha256}: `files` maps every
file of the store (zarr.json metadata, small-array chunks, each layer's shard files) to its size and
sha256, taken by the writer right after writing it; `record_sha256` hashes the rest of the record, so an
edit of the record itself is caught. Chunks also carry zarr's crc32c. Readers check, by cost:

  at open (`LadderStore(path)`: train_side, evaluate, inspect_cache, the writer before it resumes):
      the record parses and matches its digest and says complete; every recorded file exists with its
      recorded size and no unrecorded file sits in the store; the metadata files and the small arrays
      (offsets, src_ids, labels, cand_*) are hashed in full; array shapes and dtypes match what the
      fingerprint and offsets imply. 23-31 ms for a 1.07 GiB, 74-file store.
  on read (`rows`, `load_group`: every batch reader): each shard file is hashed the first time this
      LadderStore reads from it.
      A swapped or copied shard of the same size passes every crc32c (each chunk is self-consistent);
      only its hash shows it. Cost: one more read of each file per process: loading that whole store
      into RAM took 4.1-4.4 s with the hashes vs 3.1-4.1 s without (warm page cache).
  on decode: a crc32c mismatch (a file changed after it was hashed) becomes the same error.
  in full (`python -m stages.inspect_cache --verify PATH`, and before every inspect_cache summary):
      every recorded file hashed: 0.98-0.99 s/GiB warm, 1.18 s/GiB with the files evicted from the
      page cache (the 1.07 GiB real-MiniLM rt-sentiment train store, 2-core AMD EPYC, sha256 at
      ~1.5 GB/s with SHA-NI; `python -m stages.inspect_cache --verify data/cache/train.zarr`).
`pipeline.inspect_cache.open_ladders` (dask) runs the open-time checks; its lazy reads get crc32c only.
Every failure is one StoreError naming the store, the array and the file, and the stage-one command
that rebuilds the split (`--overwrite`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from pipeline.durable import atomic_json, crash_point, sha256_file
from pipeline.errors import FingerprintMismatch, StoreError
from pipeline.layout import TGT, tgt_lengths

FORMAT_VERSION = 2  # 2: _progress.json records every file's size and sha256
PROGRESS = "_progress.json"
LAYERS = "layers"
BITROUND_KEEPBITS = 7  # mantissa bits kept (bf16 keeps 7): max relative error 2^-8
CODEC_NOTES = {
    "zstd": "lossless; default: 1.08x over raw fp16 on real MiniLM states, fastest lossless write (bench/store_codecs.py)",
    "blosc": "lossless, blosc zstd + bitshuffle (measured 1.10x vs 1.08x for zstd, slower to write)",
    "none": "no compression, checksums only",
    "int8": "lossy: per-token absmax int8 + fp32 scale, ~2x smaller than fp16",
    "bitround": f"lossy: fp16 with BitRound(keepbits={BITROUND_KEEPBITS}) then zstd",
}
# Fingerprint fields that must match between a store and the config reading it.
FINGERPRINT_FIELDS = ("format_version", "backbone", "backbone_sha256", "tokenizer", "max_length", "task", "split",
                      "content_hash", "train_hash", "layers", "decoder_layers", "dtype", "codec", "limit", "seed")


def _compressors(codec: str):
    if codec == "none":
        return [Crc32cCodec()]
    if codec == "blosc":
        return [BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"), Crc32cCodec()]
    return [ZstdCodec(level=1), Crc32cCodec()]


def storage_dtype(dtype: str, codec: str) -> str:
    if codec == "int8":
        return "int8"
    if codec == "bitround":
        return "float16"
    return {"fp32": "float32", "fp16": "float16", "bf16": "uint16"}[dtype]


def bytes_per_value(dtype: str, codec: str) -> int:
    return np.dtype(storage_dtype(dtype, codec)).itemsize


class NonFiniteStates(StoreError):
    """The backbone gave inf/NaN (or values the stored dtype cannot hold): no store is kept."""


def encode_rows(x: torch.Tensor, dtype: str, codec: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(rows, d) float tensor -> stored numpy rows (+ per-row scale for int8). Fails on inf/NaN."""
    x = x.detach()
    if not torch.isfinite(x).all():
        raise NonFiniteStates("backbone produced inf/NaN states; run in fp32 (--device cpu) or check the checkpoint")
    if codec == "int8":
        xf = x.float()
        scale = xf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127.0  # (rows, 1)
        q = torch.round(xf / scale).clamp(-127, 127).to(torch.int8)
        return q.cpu().numpy(), scale.cpu().numpy().astype(np.float32)
    if codec == "bitround" or dtype == "fp16":
        y = x.to(torch.float16)
        if not torch.isfinite(y).all():
            raise NonFiniteStates("states overflow fp16 (T5 activations often do); use --dtype bf16 or fp32")
        return y.cpu().numpy(), None
    if dtype == "bf16":
        return x.to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16), None
    return x.float().cpu().numpy(), None


def decode_rows(a: np.ndarray, scale: np.ndarray | None, dtype: str, codec: str) -> np.ndarray:
    """Stored rows -> float32."""
    if codec == "int8":
        return a.astype(np.float32) * scale
    if a.dtype == np.uint16:  # bf16 bits
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


KILL_ENV = "LADDER_CACHE_KILL_AFTER_WRITES"  # test hook: SIGKILL after this many shard writes
RECORD_DIGEST = "record_sha256"


# ---------------------------------------------------------------- the completion record and its checks

def file_entry(path: Path) -> dict | None:
    """{"bytes", "sha256"} of a file just written; None where zarr wrote no file (a chunk or shard that is
    all fill value is skipped by zarr's write_empty_chunks=False default), which must then stay absent."""
    if not path.exists():
        return None
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _digest(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != RECORD_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_record(store: Path, fingerprint: dict, shards: dict, files: dict, complete: bool) -> None:
    """_progress.json: shards written per array, every file's size and sha256, `complete`, and a digest of
    all of it, so that an edit of the record itself is caught too."""
    record = {"fingerprint": fingerprint, "shards": shards, "files": files, "complete": complete}
    record[RECORD_DIGEST] = _digest(record)
    atomic_json(store / PROGRESS, record)


def damaged(store: Path, what: str, verdict: str = "the store is damaged") -> StoreError:
    """One message for every kind of damage: the store, the array and file, and what to do."""
    split, _, k = store.name.removesuffix(".zarr").partition(".dropout")  # train.dropout<i>: a train-mode pass
    passes = f" --dropout-passes {int(k) + 1}" if k.isdigit() else ""
    return StoreError(f"ladder store {store}: {what}; {verdict}: rerun stage one for split '{split}' "
                      f"(python -m stages.cache_activations --splits {split}{passes} --out {store.parent} --overwrite "
                      "--no-resume)")


def array_of(rel: str) -> str:
    """'layers/src_01/c/3/0' -> 'array src_01, file layers/src_01/c/3/0'."""
    parts = rel.split("/")
    if parts[0] == LAYERS and len(parts) > 2:
        return f"array {parts[1]}, file {rel}"
    if len(parts) > 1 and parts[0] != LAYERS:
        return f"array {parts[0]}, file {rel}"
    return f"group metadata, file {rel}"


def read_record(store: Path) -> dict:
    """The completion record, checked against its own digest."""
    try:
        record = json.loads((store / PROGRESS).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise damaged(store, f"file {PROGRESS} is not valid JSON ({e})") from None
    if not isinstance(record, dict) or RECORD_DIGEST not in record or "files" not in record:
        version = record.get("fingerprint", {}).get("format_version") if isinstance(record, dict) else None
        if version is not None and version != FORMAT_VERSION:
            raise damaged(store, f"written by format version {version}, which records no file hashes "
                                 f"(this is version {FORMAT_VERSION})", "it cannot be verified")
        raise damaged(store, f"file {PROGRESS} lacks its {RECORD_DIGEST} or file list")
    if _digest(record) != record[RECORD_DIGEST]:
        raise damaged(store, f"file {PROGRESS} was edited or damaged: its content does not match its {RECORD_DIGEST}")
    return record


def check_files_present(store: Path, files: dict, resuming: bool = False) -> None:
    """Cheap check (one stat per file): every recorded file is there with its recorded size, and no data
    file the writer did not record sits among them (a shard copied to a new name would be read). A
    resumed write expects unrecorded shards (written as it died) and rewrites them."""
    for rel, entry in files.items():
        f = store / rel
        if entry is None:
            if f.exists():
                raise damaged(store, f"{array_of(rel)}: unexpected file (stage one wrote none there)")
            continue
        if not f.is_file():
            raise damaged(store, f"{array_of(rel)}: file is missing (deleted or moved)")
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise damaged(store, f"{array_of(rel)}: {size} bytes, {entry['bytes']} when written (truncated or replaced)")
    for f in [] if resuming else store.rglob("*"):
        rel = f.relative_to(store).as_posix()
        if f.is_file() and rel != PROGRESS and not f.name.startswith(".") and rel not in files:
            raise damaged(store, f"{array_of(rel)}: unexpected file (not written by stage one)")


def check_file_hash(store: Path, rel: str, entry: dict | None) -> int:
    """Full check of one file against its recorded sha256; returns the bytes read."""
    if entry is None:
        return 0
    f = store / rel
    try:
        digest = sha256_file(f)
    except FileNotFoundError:
        raise damaged(store, f"{array_of(rel)}: file is missing (deleted or moved)") from None
    if digest != entry["sha256"]:
        raise damaged(store, f"{array_of(rel)}: content differs from the sha256 recorded when it was written "
                             "(edited, swapped with or copied over by another file)")
    return entry["bytes"]


def is_checksum_error(e: Exception) -> bool:
    # zarr's Crc32cCodec raises ValueError("Stored and computed checksum do not match") (zarr 3.1.6)
    return isinstance(e, ValueError) and "checksum" in str(e)


def compare_fingerprints(stored: dict, wanted: dict, fields=FINGERPRINT_FIELDS) -> dict:
    return {k: (stored.get(k), wanted.get(k)) for k in fields if k in wanted and stored.get(k) != wanted.get(k)}


# ---------------------------------------------------------------- writing

def shard_file(arr, name: str, i: int) -> str:
    """Store-relative path of shard i of the layer array `arr` (named `name`)."""
    return f"{LAYERS}/{name}/{arr.metadata.encode_chunk_key((i, 0))}"


def write_shards(path: Path, name: str, start: int, vals: np.ndarray, scale: np.ndarray | None,
                 shard: int) -> dict[str, dict | None]:
    """Write stored rows [start, start + len(vals)) of layer `name` (and its int8 scales): whole shards only,
    so `start` is a shard boundary and the end is one or the array's end, and each shard file is written
    once, in one piece (a partial-shard write would read, modify and rewrite the file). The one write path of
    the in-process writer and of cluster workers, so both give the same bytes. Returns {file: entry} of the
    shard files, each hashed right after it was written."""
    lg = zarr.open_group(str(path / LAYERS), mode="r+")
    files = {}
    for arr_name, v in [(name, vals)] + ([(name + "_scale", scale)] if scale is not None else []):
        arr = lg[arr_name]
        arr[start:start + len(v)] = v
        for i in range(start // shard, -(-(start + len(v)) // shard)):
            rel = shard_file(arr, arr_name, i)
            files[rel] = file_entry(path / rel)
    return files


# zarr's local store writes each file to "<name>.<32 hex>.partial" and renames it into place (zarr 3.1.6,
# storage/_local.py _atomic_write); a writer killed inside that write leaves the temporary file behind.
PARTIAL_WRITE = re.compile(r"\.[0-9a-f]{32}\.partial$")


def remove_partial_writes(path: Path) -> int:
    """Delete temporary files left by writers killed mid-write (they are no part of the store)."""
    stale = [f for f in (path / LAYERS).rglob("*.partial") if PARTIAL_WRITE.search(f.name)]
    for f in stale:
        f.unlink(missing_ok=True)
    return len(stale)

@dataclass
class ArraySpec:
    name: str  # e.g. "src_03"
    rows: int
    width: int
    row_start: np.ndarray  # (n + 1,) first row of each example (and the end)


class StoreWriter:
    """Builds a store shard by shard; `open()` creates it or resumes it."""

    def __init__(self, path: str | Path, fingerprint: dict, offsets: np.ndarray, src_ids: np.ndarray,
                 labels: np.ndarray, arrays: list[ArraySpec], cand: list[np.ndarray], *, dtype: str, codec: str,
                 chunk_tokens: int, shard_tokens: int, extra: dict | None = None):
        self.path = Path(path)
        self.fp = dict(fingerprint)
        self.offsets, self.src_ids, self.labels, self.cand = offsets, src_ids, labels, cand
        self.extra = dict(extra or {})  # small per-example arrays (answer_start)
        self.arrays = {a.name: a for a in arrays}
        self.dtype, self.codec = dtype, codec
        self.chunk, self.shard = chunk_tokens, shard_tokens
        self.written: dict[str, int] = {}  # array -> shards written
        self.files: dict[str, dict | None] = {}  # relative path -> {"bytes", "sha256"} of every file written
        self.complete = False
        self.buf: dict[str, list] = {}  # tensors not yet on disk, starting at buf_start (a shard boundary)
        self.buf_start: dict[str, int] = {}
        self.pos: dict[str, int] = {}  # next row append() will receive
        self.shard_writes = 0

    # -- lifecycle
    def open(self, resume: bool, overwrite: bool) -> int:
        """Create or resume; returns the first example index to (re)compute. Raises if the path holds
        another config's store and overwrite is False."""
        prog = self.path / PROGRESS
        if overwrite and not resume and self.path.exists():
            shutil.rmtree(self.path)  # rebuild whatever is there, a damaged store included
        if self.path.exists():
            if not prog.exists():
                if not overwrite and any(self.path.iterdir()):
                    raise StoreError(f"{self.path} exists and is not a ladder store; pass --overwrite or pick another --out")
                shutil.rmtree(self.path)
            else:
                state = read_record(self.path)
                diffs = compare_fingerprints(state.get("fingerprint", {}), self.fp)
                if diffs and not overwrite:
                    raise FingerprintMismatch(f"existing store {self.path}", diffs)
                if diffs or not resume:
                    if not overwrite and not diffs and state.get("complete"):
                        return len(self.offsets) - 1  # same config, already complete: nothing to do
                    if not overwrite and not diffs:
                        raise StoreError(f"{self.path} is a partial store of this config; pass --resume or --overwrite")
                    shutil.rmtree(self.path)
                else:
                    self.written = {k: int(v) for k, v in state["shards"].items()}
                    self.files = dict(state["files"])
                    self.complete = bool(state.get("complete"))
                    if not self.complete:
                        remove_partial_writes(self.path)  # a writer killed inside a file write
                    check_files_present(self.path, self.files, resuming=not self.complete)  # never build on a damaged store
                    if self.complete:
                        return len(self.offsets) - 1
                    return self._resume_point()
        self._create()
        return 0

    def _create(self):
        tmp = self.path.with_name(self.path.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            g = zarr.open_group(str(tmp), mode="w")
        except OSError as e:
            raise StoreError(f"cannot write to {tmp.parent}: {e.strerror}; pick a writable --out") from None
        attrs = dict(self.fp, codec_note=CODEC_NOTES[self.codec],
                     logical_dtype={"uint16": "bfloat16"}.get(storage_dtype(self.dtype, self.codec),
                                                            storage_dtype(self.dtype, self.codec)))
        g.attrs.update(attrs)
        small = dict(chunks=(1 << 16,), compressors=[ZstdCodec(level=3), Crc32cCodec()])
        g.create_array("offsets", data=self.offsets.astype(np.int64), **small)
        g.create_array("src_ids", data=self.src_ids.astype(np.int32), **small)
        g.create_array("labels", data=self.labels.astype(np.float32), **small)
        if self.cand:
            g.create_array("cand_ids", data=np.concatenate(self.cand).astype(np.int32), **small)
            g.create_array("cand_offsets", data=np.cumsum([0] + [len(c) for c in self.cand]).astype(np.int64), **small)
        for name, values in self.extra.items():
            g.create_array(name, data=np.asarray(values, np.int32), **small)
        lg = g.create_group(LAYERS)
        sdt = storage_dtype(self.dtype, self.codec)
        for a in self.arrays.values():
            self._new_array(lg, a.name, a.rows, a.width, sdt)
            if self.codec == "int8":
                self._new_array(lg, a.name + "_scale", a.rows, 1, "float32")
        self.written = {a.name: 0 for a in self.arrays.values()}
        self.files = {f.relative_to(tmp).as_posix(): file_entry(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
        write_record(tmp, self.fp, self.written, self.files, False)
        os.replace(tmp, self.path)

    def _new_array(self, g, name, rows, width, dtype):
        filters = []
        if self.codec == "bitround" and not name.endswith("_scale"):
            from zarr.codecs.numcodecs import BitRound

            filters = [BitRound(keepbits=BITROUND_KEEPBITS)]
        g.create_array(name, shape=(rows, width), dtype=dtype, chunks=(self.chunk, width),
                       shards=(self.shard, width), filters=filters, compressors=_compressors(self.codec),
                       fill_value=0)

    def _resume_point(self) -> int:
        """First example whose rows reach into an unwritten shard of any array."""
        first = len(self.offsets) - 1
        for name, a in self.arrays.items():
            done_rows = self.written[name] * self.shard
            # last example starting at or before done_rows; its rows may straddle the boundary
            e = int(np.searchsorted(a.row_start, done_rows, side="right")) - 1
            first = min(first, max(e, 0))
        return first

    def begin(self, first_example: int):
        """Position every array's buffer at `first_example`."""
        for name, a in self.arrays.items():
            self.buf[name] = []
            self.pos[name] = int(a.row_start[first_example])
            self.buf_start[name] = self.pos[name]

    # -- data
    def append(self, name: str, rows: torch.Tensor):
        """Rows of the next examples, in order; whole shards are flushed as soon as they fill."""
        start = self.pos[name]
        done = self.written[name] * self.shard
        if start + rows.shape[0] <= done:  # already on disk from before the crash
            self.pos[name] = start + rows.shape[0]
            return
        if start < done:
            rows, start = rows[done - start:], done
        if not self.buf[name]:
            self.buf_start[name] = start
        self.buf[name].append(rows)
        self.pos[name] = start + rows.shape[0]
        self._flush(name, final=False)

    def _flush(self, name: str, final: bool):
        buffered = self.pos[name] - self.buf_start[name] if self.buf[name] else 0
        if buffered == 0:
            return
        start = self.buf_start[name]
        assert start % self.shard == 0, "buffers always start on a shard boundary"
        n_full = buffered // self.shard
        end_rows = self.arrays[name].rows
        if n_full == 0 and not (final and start + buffered == end_rows):
            return
        cat = torch.cat(self.buf[name], 0)
        take = buffered if final and start + buffered == end_rows else n_full * self.shard
        vals, scale = encode_rows(cat[:take], self.dtype, self.codec)
        self.files.update(write_shards(self.path, name, start, vals, scale, self.shard))
        self.shard_writes += 1
        crash_point(KILL_ENV, self.shard_writes)  # between the data write and its record: the worst place to die
        self.written[name] = (start + take + self.shard - 1) // self.shard
        rest = cat[take:]
        self.buf[name] = [rest] if rest.shape[0] else []
        self.buf_start[name] = start + take
        write_record(self.path, self.fp, self.written, self.files, False)

    # -- shards written elsewhere (cluster workers, pipeline/cache_cluster.py)
    def n_shards(self, name: str) -> int:
        return -(-self.arrays[name].rows // self.shard)

    def recorded_shards(self, name: str) -> set[int]:
        """Shards of layer `name` that the record lists (with their int8 scales), whoever wrote them."""
        lg = zarr.open_group(str(self.path / LAYERS), mode="r")
        parts = [name] + ([name + "_scale"] if self.codec == "int8" else [])
        arrs = {p: lg[p] for p in parts}
        return {i for i in range(self.n_shards(name)) if all(shard_file(arrs[p], p, i) in self.files for p in parts)}

    def record_written(self, files: dict[str, dict | None]) -> None:
        """Add shard files written by other processes to the record (atomically, as after every in-process
        shard). `shards` keeps its in-process meaning, the leading run of written shards of each array, where
        an in-process resume starts; shards recorded past it are in `files` and are rewritten identically."""
        self.files.update(files)
        for name in self.arrays:
            done, k = self.recorded_shards(name), 0
            while k in done:
                k += 1
            self.written[name] = k
        write_record(self.path, self.fp, self.written, self.files, False)

    def seal(self) -> None:
        """Mark the store complete once every shard of every array is recorded (the cluster path's finish)."""
        for name in self.arrays:
            missing = sorted(set(range(self.n_shards(name))) - self.recorded_shards(name))
            if missing:
                raise StoreError(f"{self.path}: array {name} lacks shards {missing[:8]}; rerun with --resume")
        remove_partial_writes(self.path)
        write_record(self.path, self.fp, self.written, self.files, True)
        self.complete = True

    def finish(self):
        for name in self.arrays:
            self._flush(name, final=True)
            expected = -(-self.arrays[name].rows // self.shard)
            if self.written[name] != expected:
                raise StoreError(f"{self.path}: array {name} has {self.written[name]} of {expected} shards; rerun with --resume")
        # completeness lives in the record alone: no metadata file changes after _create, so a kill here
        # leaves a store whose every recorded file is intact and a resume that only writes the record
        crash_point(KILL_ENV, self.shard_writes + 1)  # test hook: die after the last shard, before `complete`
        write_record(self.path, self.fp, self.written, self.files, True)
        self.complete = True


# ---------------------------------------------------------------- reading

def store_path(out, split: str, dropout_pass: int | None = None) -> Path:
    """<split>.zarr, or train.dropout<i>.zarr for train-mode pass i (stage two's --dropout-passes)."""
    return Path(out) / (f"{split}.zarr" if dropout_pass is None else f"{split}.dropout{dropout_pass}.zarr")


class LadderStore:
    """Read side of a finished store. Refuses incomplete, damaged and mismatched stores.

    Opening checks the record, every file's presence and size, and the full sha256 of the metadata
    and small arrays; the shard files of the layers are hashed when first read (see the format doc)."""

    def __init__(self, path: str | Path, expect: dict | None = None):
        self.path = Path(path)
        prog = self.path / PROGRESS
        if not prog.exists():
            if (self.path / "zarr.json").exists():
                raise damaged(self.path, f"file {PROGRESS} (the completion record) is missing")
            raise StoreError(f"{self.path}: no ladder store here; run stage one (python -m stages.cache_activations)")
        record = read_record(self.path)
        if not record.get("complete"):
            raise StoreError(f"{self.path}: store is incomplete (interrupted stage one); rerun it with --resume")
        self.files: dict[str, dict | None] = record["files"]
        check_files_present(self.path, self.files)
        self._verified: set[str] = set()
        for rel, entry in self.files.items():  # metadata and small arrays: a few KB to MB, read whole below anyway
            if not rel.startswith(LAYERS + "/") or rel.endswith("zarr.json"):
                check_file_hash(self.path, rel, entry)
                self._verified.add(rel)
        self.group = zarr.open_group(str(self.path), mode="r")
        self.fingerprint = dict(self.group.attrs)
        if expect:
            diffs = compare_fingerprints(self.fingerprint, expect, [k for k in expect])
            if diffs:
                raise FingerprintMismatch(f"ladder store {self.path} (made with backbone "
                                          f"{self.fingerprint.get('backbone')})", diffs)
        self.offsets = self._read_small("offsets")
        self.src_ids = self._read_small("src_ids")
        self.labels = self._read_small("labels")
        self.n = len(self.offsets) - 1
        self.layers = self.group[LAYERS]
        self._arrays = {k: self.layers[k] for k in self.layers.array_keys()}  # metadata lookups cost ~1 ms each
        self.names = sorted(k for k in self._arrays if not k.endswith("_scale"))
        self.dtype, self.codec = self.fingerprint["dtype"], self.fingerprint["codec"]
        if "cand_ids" in self.group:
            ids, off = self._read_small("cand_ids"), self._read_small("cand_offsets")
            self.cand = [ids[off[c]:off[c + 1]] for c in range(len(off) - 1)]
            self.cand_offsets = off
        else:
            self.cand, self.cand_offsets = [], np.zeros(1, np.int64)
        self.answer_start = self._read_small("answer_start") if "answer_start" in self.group else None
        # target rows per candidate (layout.tgt_lengths): T5 all its tokens, decoder-only all but the last
        self.tgt_offsets = np.cumsum([0] + tgt_lengths(self.fingerprint.get("family", ""), self.cand)).astype(np.int64)
        self.K = int(self.tgt_offsets[-1])
        # read once: zarr metadata lookups cost ~1 ms each, and batches ask for the width per state
        self.width = int(self.layers[self.names[0]].shape[1]) if self.names else 0
        self._check_layout(record)

    def _read_small(self, name: str) -> np.ndarray:
        try:
            return self.group[name][:]
        except ValueError as e:
            if is_checksum_error(e):
                raise damaged(self.path, f"array {name}: zarr checksum mismatch ({e})") from None
            raise

    def _check_layout(self, record: dict) -> None:
        """Shapes and dtypes the fingerprint implies. The hashes already cover the metadata files; this
        catches a record and metadata edited together, and names the array in words a user can act on."""
        def bad(name, what):
            return damaged(self.path, f"array {name}, file {LAYERS}/{name}/zarr.json: {what}")

        off = self.offsets
        if self.n < 0 or off[0] != 0 or np.any(np.diff(off) < 0) or off[-1] != len(self.src_ids):
            raise damaged(self.path, "array offsets, file offsets/zarr.json: offsets are not 0..total tokens, "
                                     "non-decreasing")
        if len(self.labels) != self.n:
            raise damaged(self.path, f"array labels: {len(self.labels)} labels for {self.n} examples")
        if sorted(record["shards"]) != self.names:
            raise damaged(self.path, f"layers {self.names} differ from the recorded {sorted(record['shards'])}")
        want_dtype = np.dtype(storage_dtype(self.dtype, self.codec))
        d = int(self.fingerprint.get("d_model", self.width))
        for name, arr in self._arrays.items():
            scale = name.endswith("_scale")
            base = name.removesuffix("_scale")
            rows = self.n * self.K if base.startswith(TGT) else int(off[-1])
            shape = (rows, 1 if scale else d)
            if tuple(arr.shape) != shape:
                raise bad(name, f"shape {tuple(arr.shape)}, the fingerprint implies {shape}")
            if arr.dtype != (np.dtype("float32") if scale else want_dtype):
                raise bad(name, f"data type {arr.dtype}, the fingerprint implies {want_dtype}")

    def _shard_files(self, name: str, start: int, stop: int) -> list[str]:
        arr = self._arrays[name]
        rows = arr.shards[0] if arr.shards else arr.chunks[0]
        return [f"{LAYERS}/{name}/{arr.metadata.encode_chunk_key((i, 0))}"
                for i in range(start // rows, -(-stop // rows))]

    def verify_rows(self, name: str, start: int, stop: int) -> None:
        """Hash every shard file rows [start, stop) of `name` live in, once per LadderStore: a swapped or
        copied shard passes zarr's own checksums (each chunk is consistent), only the record knows."""
        for rel in self._shard_files(name, start, stop):
            if rel not in self._verified:
                check_file_hash(self.path, rel, self.files.get(rel))
                self._verified.add(rel)

    def require_states(self, names: list[str], who: str) -> None:
        """The states a side network reads must be stored (layer dropping stores only the kept layers)."""
        missing = [n for n in names if n not in self.names]
        if missing:
            raise StoreError(f"layers: the cache {self.path} lacks states {missing} that {who} needs; cache those "
                             f"layers in stage one (cache_activations.layers; stored: {', '.join(self.names)})")

    def verify(self) -> tuple[int, int, float]:
        """Full check: every recorded file hashed against the record. Returns (files, bytes, seconds)."""
        t0, nbytes = time.perf_counter(), 0
        for rel, entry in sorted(self.files.items()):
            nbytes += check_file_hash(self.path, rel, entry)
            self._verified.add(rel)
        return len(self.files), nbytes, time.perf_counter() - t0

    def _get(self, name: str, start: int, stop: int) -> np.ndarray:
        self.verify_rows(name, start, stop)
        try:
            return self._arrays[name][start:stop]
        except ValueError as e:
            if is_checksum_error(e):
                raise self.checksum_error(name, start, stop, e) from None
            raise

    def checksum_error(self, name: str, start: int, stop: int, e: Exception) -> StoreError:
        """zarr's crc32c mismatch as a clear error: re-read [start, stop) shard by shard to name the file."""
        arr = self._arrays[name]
        rows = arr.shards[0] if arr.shards else arr.chunks[0]
        bad = []
        for i, rel in zip(range(start // rows, -(-stop // rows)), self._shard_files(name, start, stop)):
            try:
                arr[max(start, i * rows):min(stop, (i + 1) * rows)]
            except ValueError:
                bad.append(rel)
        files = ", ".join(bad or self._shard_files(name, start, stop))
        return damaged(self.path, f"array {name}, file {files}: zarr checksum mismatch, the chunk's crc32c does "
                                  f"not match its data ({e})")

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Decoded float32 rows [start, stop) of one stored state."""
        a = self._get(name, start, stop)
        scale = self._get(name + "_scale", start, stop) if self.codec == "int8" else None
        return decode_rows(a, scale, self.dtype, self.codec)

    def row_range(self, name: str, e0: int, e1: int) -> tuple[int, int]:
        if name.startswith(TGT):
            return e0 * self.K, e1 * self.K
        return int(self.offsets[e0]), int(self.offsets[e1])

    def nbytes_on_disk(self, name: str | None = None) -> int:
        root = self.path / LAYERS / name if name else self.path
        return sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file())

    # -- batches
    def load_group(self, e0: int, e1: int, names: list[str]) -> dict[str, tuple]:
        """Stored (undecoded) rows of examples [e0, e1): decoding happens per batch, so a split held
        in RAM costs its on-disk dtype (2 bytes a value for fp16/bf16), not float32."""
        out = {}
        for name in names:
            r0, r1 = self.row_range(name, e0, e1)
            scale = self._get(name + "_scale", r0, r1) if self.codec == "int8" else None
            out[name] = (self._get(name, r0, r1), scale)
        return out

    @property
    def longest(self) -> int:
        """Tokens of the split's longest example (the row length of packed batches)."""
        return int(np.diff(self.offsets).max()) if self.n else 0

    def fingerprint_target(self, label: float) -> int:
        bins = self.fingerprint.get("regression_bins") or []
        if bins:
            return int(np.argmin([abs(b - label) for b in bins]))
        return int(label)
