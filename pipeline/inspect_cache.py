"""A lazy dask view of a ladder store, and the summary `python -m stages.inspect_cache` prints."""
from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import zarr

from pipeline.ladder_store import LAYERS, LadderStore, is_checksum_error


def open_ladders(path: str | Path) -> dict:
    """{'offsets': np.ndarray, 'fingerprint': dict, <state name>: dask array (rows, d) float32}.

    Arrays decode lazily chunk by chunk: bf16 bits, int8 x scale and fp16 all come back as float32.
    Opening runs the store's open-time checks; dask reads bypass the per-shard hashes (zarr's crc32c still
    applies): call `LadderStore(path).verify()` first for a full check, as `summarize` does.
    """
    store = LadderStore(path)
    out = {"offsets": store.offsets, "fingerprint": store.fingerprint}
    for name in store.names:
        raw = da.from_zarr(zarr.open_array(str(Path(path) / LAYERS / name), mode="r"))
        if store.codec == "int8":
            scale = da.from_zarr(zarr.open_array(str(Path(path) / LAYERS / (name + "_scale")), mode="r"))
            arr = raw.astype(np.float32) * scale.rechunk((raw.chunks[0], 1))
        elif raw.dtype == np.uint16:
            arr = (raw.astype(np.uint32) << 16).map_blocks(lambda b: b.view(np.float32), dtype=np.float32)
        else:
            arr = raw.astype(np.float32)
        out[name] = arr
    return out


def summarize(path: str | Path, top_k: int = 5, reference: str | Path | None = None) -> dict:
    """Per-layer shape, bytes on disk vs raw, compression ratio, mean/std/max-abs, outlier channels;
    with `reference` (a store of the same examples in a lossless dtype), the relative error of this one."""
    store = LadderStore(path)
    store.verify()  # the summary reads every value anyway: hash every file first (cost in the format doc)
    lad = open_ladders(path)
    ref = open_ladders(reference) if reference else None
    if ref is not None:
        LadderStore(reference).verify()
    layers = {}
    for name in store.names:
        x = lad[name]
        raw_bytes = x.shape[0] * x.shape[1] * 2  # against raw fp16
        disk = store.nbytes_on_disk(name) + (store.nbytes_on_disk(name + "_scale") if store.codec == "int8" else 0)
        try:
            mean, std, maxabs, ch = da.compute(x.mean(), x.std(), abs(x).max(), abs(x).max(axis=0))
        except ValueError as e:
            if is_checksum_error(e):  # changed on disk after the hash check above
                raise store.checksum_error(name, 0, x.shape[0], e) from None
            raise
        top = np.argsort(-ch)[:top_k]
        row = {"shape": list(x.shape), "bytes_on_disk": int(disk), "bytes_raw_fp16": int(raw_bytes),
               "compression_vs_fp16": raw_bytes / max(disk, 1), "bytes_per_token": disk / max(x.shape[0], 1),
               "mean": float(mean), "std": float(std), "max_abs": float(maxabs),
               "outlier_channels": {int(c): float(ch[c]) for c in top}}
        if ref is not None and name in ref:
            err = da.linalg.norm(x - ref[name]) / da.linalg.norm(ref[name])
            row["relative_error_vs_reference"] = float(err.compute())
        layers[name] = row
    fp = {k: v for k, v in store.fingerprint.items() if k != "versions"}
    return {"path": str(path), "examples": store.n, "tokens": int(store.offsets[-1]), "fingerprint": fp,
            "layers": layers}
