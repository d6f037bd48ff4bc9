"""ladder-cache: Ladder Side-Tuning with the frozen backbone run once.

Data flows down this list; each module imports only modules above it (tests/test_stage_two.py pins the
directions that matter: the store knows no model, the init stage never imports the network).

  errors            exception types a user can act on (one `error:` line, exit 2)
  durable           atomic writes, lock files, the kill -9 test hooks
  config            typed stage configs: params.yaml sections + CLI flags, validated on creation
  device            which torch device a stage runs on
  progress          progress bars on a terminal, periodic lines in a log
  layout            names shared by the store and the side net (stacks, state names, families)
  offline_data      real labelled text fetched from registry packages (no hub)
  model_packages    the embedded backbones (MiniLM, SmolLM2 GGUF) fetched from their registry wheels
  tasks             task registry and task files: loading, splits, prompts, verbalizers
  prompting         decoder-only prompts: plain or chat template, verbalizer candidates, answers
  metrics           accuracy, F1, MCC, Pearson/Spearman as the paper names them
  padding           right padding; T5's teacher-forced decoder inputs
  backbone          the frozen backbone: loading, tokenizing a task, capturing per-layer states
  ladder_store      the cache format (Zarr v3): writer, reader of rows, integrity record, fingerprint
  state_rows        stage one's unit: one backbone forward batch as store rows, the inf/NaN check
  batches           rows -> LadderBatch: padded or packed layouts, RAM- or GPU-resident reading
  side_spec         the side net's shape (SideSpec), read by the init and by the network
  prune             structural init from the backbone (magnitude / empirical Fisher)
  side              the ladder side network (T5, encoder-only, decoder-only) and its variants
  stacked           same-shape side nets of a sweep trained as one vmapped computation
  ddp               torch DDP for stage two: process group, each rank's share of the batches
  run_folder        a trained run's files (side.safetensors, side_config.json, metrics, curves)
  plots             PNG plots the stages write (curves, confusion)
  evaluate          the evaluate stage: scores from the cache, frozen-features baseline
  cache_cluster     stage one on dask.distributed workers: shard-aligned ranges, one store
  cache_activations stage one: the backbone over each split into a ladder store
  prune_init        the init stage: pruned tensors for the side net
  train_side        stage two: training one side net, or a sweep from one read of each batch
  inspect_cache     dask view of a store, summary and --verify
  predict           backbone + side net on raw text
"""
