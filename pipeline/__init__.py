"""ladder-cache: Ladder Side-Tuning with the frozen backbone run once.

Modules, one concept each:
  config        typed stage configs (params.yaml sections + CLI overrides)
  tasks         task registry: data loading, splits, prompts, verbalizers, metrics
  offline_data  real labelled text fetched from registry packages (no hub)
  backbone      loading the frozen backbone and capturing its per-layer states
  ladder_store  the Zarr v3 cache format: writer, reader, fingerprint, codecs
  side          the ladder side network (T5, encoder-only, decoder-only)
  prune         structural init of the side network (magnitude / Fisher)
  train         stage two: training the side network
  evaluate      metrics, rank classification, frozen-features baseline
  inspect       dask view of a store and its summary
  predict       backbone + side network on raw text
  durable       atomic file writes and the kill -9 test hook
"""
