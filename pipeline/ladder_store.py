"""The ladder store: one Zarr v3 group per (backbone, task, split). This file is the cache format.

Layout of `<out>/<split>.zarr` (format version 1):

    offsets            (n + 1,) int64     example i's source tokens are rows offsets[i]:offsets[i+1]
    src_ids            (total_tokens,) int32   token ids, no padding anywhere
    labels             (n,) float32       class index or regression target
    layers/<name>      (rows, d)          one array per stored state, e.g. src_emb, src_03, tgt_05
    layers/<name>_scale (rows, 1) float32  int8 codec only: per-token absmax / 127
    cand_ids           (K,) int32         T5: all candidate verbalizers' token ids, concatenated
                                          (decoder-only: the first token of each verbalizer)
    cand_offsets       (C + 1,) int64     candidate c is cand_ids[cand_offsets[c]:cand_offsets[c+1]]
    _progress.json     shards written per array, and `complete`; the only source of truth for completeness

`src_*` arrays have one row per source token (ragged, rows = offsets). `tgt_*` arrays (T5) hold the
teacher-forced decoder states of every candidate verbalizer for every example: K rows per example
(row i*K + cand_offsets[c] + u), so evaluation ranks candidates from the cache and training uses
the gold candidate's rows. The embedding output is stored only for encoder-only backbones (see
layout.stores_embedding); T5 / decoder-only side nets recompute it from token ids.

Writes go through `StoreWriter`, which only ever writes whole shards (plus the final partial one)
and records each array's shard count atomically after the write: a kill at any point loses at most
the shards in flight, and a resumed run recomputes from the first unwritten shard and produces the
same arrays. Chunks carry crc32c checksums, so a flipped byte fails the read instead of returning
wrong numbers. Stored dtypes: fp32, fp16, bf16 (a uint16 view: zarr 3.1 has no bfloat16), int8
(per-token absmax) and fp16 with BitRound; see `CODEC_NOTES`.
"""
from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from pipeline.durable import atomic_json, crash_point
from pipeline.errors import FingerprintMismatch, StoreError
from pipeline.layout import SRC, TGT

FORMAT_VERSION = 1
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
                      "content_hash", "layers", "decoder_layers", "dtype", "codec", "limit", "seed")


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


def encode_rows(x: torch.Tensor, dtype: str, codec: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(rows, d) float tensor -> stored numpy rows (+ per-row scale for int8). Fails on inf/NaN."""
    x = x.detach()
    if not torch.isfinite(x).all():
        raise StoreError("backbone produced inf/NaN states; run in fp32 (--device cpu) or check the checkpoint")
    if codec == "int8":
        xf = x.float()
        scale = xf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127.0  # (rows, 1)
        q = torch.round(xf / scale).clamp(-127, 127).to(torch.int8)
        return q.cpu().numpy(), scale.cpu().numpy().astype(np.float32)
    if codec == "bitround" or dtype == "fp16":
        y = x.to(torch.float16)
        if not torch.isfinite(y).all():
            raise StoreError("states overflow fp16 (T5 activations often do); use --dtype bf16 or fp32")
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


def compare_fingerprints(stored: dict, wanted: dict, fields=FINGERPRINT_FIELDS) -> dict:
    return {k: (stored.get(k), wanted.get(k)) for k in fields if k in wanted and stored.get(k) != wanted.get(k)}


# ---------------------------------------------------------------- writing

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
                 chunk_tokens: int, shard_tokens: int):
        self.path = Path(path)
        self.fp = dict(fingerprint)
        self.offsets, self.src_ids, self.labels, self.cand = offsets, src_ids, labels, cand
        self.arrays = {a.name: a for a in arrays}
        self.dtype, self.codec = dtype, codec
        self.chunk, self.shard = chunk_tokens, shard_tokens
        self.written: dict[str, int] = {}  # array -> shards written
        self.buf: dict[str, list] = {}  # tensors not yet on disk, starting at buf_start (a shard boundary)
        self.buf_start: dict[str, int] = {}
        self.pos: dict[str, int] = {}  # next row append() will receive
        self.shard_writes = 0

    # -- lifecycle
    def open(self, resume: bool, overwrite: bool) -> int:
        """Create or resume; returns the first example index to (re)compute. Raises if the path holds
        another config's store and overwrite is False."""
        prog = self.path / PROGRESS
        if self.path.exists():
            if not prog.exists():
                if not overwrite and any(self.path.iterdir()):
                    raise StoreError(f"{self.path} exists and is not a ladder store; pass --overwrite or pick another --out")
                shutil.rmtree(self.path)
            else:
                state = json.loads(prog.read_text())
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
                    if state.get("complete"):
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
        attrs = dict(self.fp, complete=False, codec_note=CODEC_NOTES[self.codec],
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
        lg = g.create_group(LAYERS)
        sdt = storage_dtype(self.dtype, self.codec)
        for a in self.arrays.values():
            self._new_array(lg, a.name, a.rows, a.width, sdt)
            if self.codec == "int8":
                self._new_array(lg, a.name + "_scale", a.rows, 1, "float32")
        self.written = {a.name: 0 for a in self.arrays.values()}
        atomic_json(tmp / PROGRESS, {"fingerprint": self.fp, "shards": self.written, "complete": False})
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
        lg = zarr.open_group(str(self.path / LAYERS), mode="r+")
        lg[name][start:start + take] = vals
        if scale is not None:
            lg[name + "_scale"][start:start + take] = scale
        self.shard_writes += 1
        crash_point(KILL_ENV, self.shard_writes)  # between the data write and its record: the worst place to die
        self.written[name] = (start + take + self.shard - 1) // self.shard
        rest = cat[take:]
        self.buf[name] = [rest] if rest.shape[0] else []
        self.buf_start[name] = start + take
        atomic_json(self.path / PROGRESS, {"fingerprint": self.fp, "shards": self.written, "complete": False})

    def finish(self):
        for name in self.arrays:
            self._flush(name, final=True)
            expected = -(-self.arrays[name].rows // self.shard)
            if self.written[name] != expected:
                raise StoreError(f"{self.path}: array {name} has {self.written[name]} of {expected} shards; rerun with --resume")
        g = zarr.open_group(str(self.path), mode="r+")
        g.attrs["complete"] = True
        atomic_json(self.path / PROGRESS, {"fingerprint": self.fp, "shards": self.written, "complete": True})


# ---------------------------------------------------------------- reading

class LadderStore:
    """Read side of a finished store. Refuses incomplete stores and mismatched fingerprints."""

    def __init__(self, path: str | Path, expect: dict | None = None):
        self.path = Path(path)
        prog = self.path / PROGRESS
        if not prog.exists():
            raise StoreError(f"{self.path}: no ladder store here; run stage one (python -m stages.cache_activations)")
        state = json.loads(prog.read_text())
        if not state.get("complete"):
            raise StoreError(f"{self.path}: store is incomplete (interrupted stage one); rerun it with --resume")
        self.group = zarr.open_group(str(self.path), mode="r")
        self.fingerprint = dict(self.group.attrs)
        if expect:
            diffs = compare_fingerprints(self.fingerprint, expect, [k for k in expect])
            if diffs:
                raise FingerprintMismatch(f"ladder store {self.path}", diffs)
        self.offsets = self.group["offsets"][:]
        self.src_ids = self.group["src_ids"][:]
        self.labels = self.group["labels"][:]
        self.n = len(self.offsets) - 1
        self.layers = self.group[LAYERS]
        self.names = sorted(k for k in self.layers.array_keys() if not k.endswith("_scale"))
        self.dtype, self.codec = self.fingerprint["dtype"], self.fingerprint["codec"]
        if "cand_ids" in self.group:
            ids, off = self.group["cand_ids"][:], self.group["cand_offsets"][:]
            self.cand = [ids[off[c]:off[c + 1]] for c in range(len(off) - 1)]
            self.cand_offsets = off
        else:
            self.cand, self.cand_offsets = [], np.zeros(1, np.int64)
        self.K = int(self.cand_offsets[-1])
        # read once: zarr metadata lookups cost ~1 ms each, and batches ask for the width per state
        self.width = int(self.layers[self.names[0]].shape[1]) if self.names else 0
        self._resident: tuple | None = None  # ((n, names), rows) of a split that fits in RAM, kept across epochs
        self._on_device: tuple | None = None  # ((n, names, device), RowSet on the GPU), kept across epochs

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Decoded float32 rows [start, stop) of one stored state."""
        a = self.layers[name][start:stop]
        scale = self.layers[name + "_scale"][start:stop] if self.codec == "int8" else None
        return decode_rows(a, scale, self.dtype, self.codec)

    def row_range(self, name: str, e0: int, e1: int) -> tuple[int, int]:
        if name.startswith(TGT):
            return e0 * self.K, e1 * self.K
        return int(self.offsets[e0]), int(self.offsets[e1])

    def nbytes_on_disk(self, name: str | None = None) -> int:
        root = self.path / LAYERS / name if name else self.path
        return sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file())

    # -- batches
    def groups(self, n_examples: int, names: list[str], ram_budget_mb: int) -> list[tuple[int, int]]:
        """Contiguous example ranges small enough to hold in RAM (one range if the split fits)."""
        item = bytes_per_value(self.dtype, self.codec)
        per_token = item * self.width * len([n for n in names if n.startswith(SRC)])
        tgt = len([n for n in names if n.startswith(TGT)])
        per_example = (self.offsets[n_examples] / max(n_examples, 1)) * per_token + self.K * item * self.width * tgt
        cap = max(1, int(ram_budget_mb * 2**20 / max(per_example, 1)))
        return [(s, min(s + cap, n_examples)) for s in range(0, n_examples, cap)]

    def load_group(self, e0: int, e1: int, names: list[str]) -> dict[str, tuple]:
        """Stored (undecoded) rows of examples [e0, e1): decoding happens per batch, so a split held
        in RAM costs its on-disk dtype (2 bytes a value for fp16/bf16), not float32."""
        out = {}
        for name in names:
            r0, r1 = self.row_range(name, e0, e1)
            scale = self.layers[name + "_scale"][r0:r1] if self.codec == "int8" else None
            out[name] = (self.layers[name][r0:r1], scale)
        return out

    def batches(self, names: list[str], batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                limit: int = 0, all_candidates: bool = False, ram_budget_mb: int = 4096, prefetch: bool = True,
                device="cpu", device_budget_mb: int = 0, pack_len: int = 0, batch_tokens: int = 0):
        """Mini-batches (LadderBatch, on `device`) of whole examples, padded (pack_len 0) or packed into rows
        of pack_len slots (pipeline/batches.py). A batch is batch_size examples, or with batch_tokens > 0 as
        many consecutive examples as fit that many tokens. Shuffling is per epoch from (seed, epoch): the
        order of RAM-sized groups, then examples within a group.

        With a CUDA `device` and a split whose requested states fit `device_budget_mb` in their stored dtype,
        the split is held on the device and batches are gathered and decoded there, in the same order.
        Otherwise a background thread reads the next group and gathers each batch's rows (pinned, for CUDA),
        which are assembled on the device."""
        from pipeline.batches import RowSet, store_meta

        n = min(self.n, limit) if limit else self.n
        dev = torch.device(device)
        if dev.type == "cuda" and device_budget_mb > 0 and self.stored_bytes(n, names) <= device_budget_mb * 2**20:
            key = (n, tuple(names), str(dev))
            if self._on_device is None or self._on_device[0] != key:
                self._on_device = (key, RowSet.of_store(self, names, n, dev))
            rows = self._on_device[1]
            plan = self.epoch_plan(n, names, batch_size, shuffle, seed, epoch, n_groups=1, batch_tokens=batch_tokens)
            return (rows.batch(idx, all_candidates, pack_len) for _, idx in plan)
        meta = store_meta(self)

        def assemble(data, e0, idx):
            return RowSet.of_examples(self, data, e0, idx, dev, meta).batch(np.arange(len(idx)), all_candidates,
                                                                            pack_len)

        it = self._batches(names, batch_size, shuffle, seed, epoch, limit, ram_budget_mb, prefetch, batch_tokens,
                           assemble)
        return _background(it, depth=4) if prefetch else it

    @property
    def longest(self) -> int:
        """Tokens of the split's longest example (the row length of packed batches)."""
        return int(np.diff(self.offsets).max()) if self.n else 0

    def stored_bytes(self, n: int, names: list[str]) -> int:
        """Bytes the requested states of the first n examples take in their stored dtype (+ int8 scales)."""
        item = bytes_per_value(self.dtype, self.codec) * self.width + (4 if self.codec == "int8" else 0)
        rows = sum((n * self.K if nm.startswith(TGT) else int(self.offsets[n])) for nm in names)
        return rows * item

    def epoch_plan(self, n: int, names: list[str], batch_size: int, shuffle: bool, seed: int, epoch: int,
                   ram_budget_mb: int = 4096, n_groups: int | None = None, batch_tokens: int = 0):
        """The epoch's batches as ((e0, e1) group, example indices) pairs: a pure function of (seed, epoch)
        and the grouping, so every reader (host or device) visits examples in the same order."""
        from pipeline.batches import token_budget_batches

        rng = np.random.default_rng([seed, epoch])
        groups = [(0, n)] if n_groups == 1 else self.groups(n, names, ram_budget_mb)
        if shuffle:
            groups = [groups[i] for i in rng.permutation(len(groups))]
        lengths = np.diff(self.offsets)
        for e0, e1 in groups:
            order = np.arange(e0, e1)
            if shuffle:
                order = rng.permutation(order)
            if batch_tokens:
                for idx in token_budget_batches(order, lengths, batch_tokens):
                    yield (e0, e1), idx
            else:
                for b in range(0, len(order), batch_size):
                    yield (e0, e1), order[b:b + batch_size]

    def _batches(self, names, batch_size, shuffle, seed, epoch, limit, ram_budget_mb, prefetch, batch_tokens,
                 assemble):
        n = min(self.n, limit) if limit else self.n
        plan = list(self.epoch_plan(n, names, batch_size, shuffle, seed, epoch, ram_budget_mb,
                                    batch_tokens=batch_tokens))
        groups = list(dict.fromkeys(g for g, _ in plan))  # in visiting order
        resident = len(groups) == 1  # the split fits: read and decompress it once, keep it for later epochs
        pool = ThreadPoolExecutor(1) if prefetch and not resident else None
        load = (lambda g: pool.submit(self.load_group, g[0], g[1], names)) if pool else None
        try:
            pending = load(groups[0]) if pool else None
            data, current = None, None
            for g, idx in plan:
                if g != current:
                    if resident:
                        data = self._resident_group(n, names)
                    else:
                        data = pending.result() if pool else self.load_group(g[0], g[1], names)
                        gi = groups.index(g)
                        if pool and gi + 1 < len(groups):
                            pending = load(groups[gi + 1])
                    current = g
                yield assemble(data, g[0], idx)
        finally:
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)

    def _resident_group(self, n: int, names: list[str]) -> dict[str, tuple]:
        key = (n, tuple(names))
        if self._resident is None or self._resident[0] != key:
            self._resident = (key, self.load_group(0, n, names))
        return self._resident[1]

    def fingerprint_target(self, label: float) -> int:
        bins = self.fingerprint.get("regression_bins") or []
        if bins:
            return int(np.argmin([abs(b - label) for b in bins]))
        return int(label)


def _background(it, depth: int):
    """Run a generator in a thread, `depth` items ahead: batch assembly (numpy gathers, decode)
    overlaps the training step."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in it:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)
