"""The prune_init stage: build the side network's init from the backbone and save side_init.safetensors."""
from __future__ import annotations

import numpy as np
import torch

from pipeline import backbone as bbm
from pipeline import prune
from pipeline.config import PruneConfig
from pipeline.durable import check_writable
from pipeline.padding import pad
from pipeline.prompting import check_format
from pipeline.side_spec import spec_from_config
from pipeline.tasks import check_targets, content_hash, get_task


def fisher_batches(bb, task, examples, cfg: PruneConfig) -> list[dict]:
    enc = bbm.encode(task, examples, bb.tokenizer, bb.family, cfg.max_length, cfg.prompt_format)
    out = []
    for b in range(0, len(examples), cfg.batch_size):
        idx = list(range(b, min(b + cfg.batch_size, len(examples))))
        ids, mask = pad([enc.src_ids[i] for i in idx])
        batch = {"ids": ids, "mask": mask, "labels": torch.from_numpy(enc.labels[idx])}
        # the gold verbalizer exists for T5 / decoder-only only; an encoder regresses on the label itself
        gold = [task.target_index(enc.labels[i]) for i in idx] if bb.family != "encoder" and enc.cand_ids else []
        if bb.family == "t5":
            tgt, tmask = pad([enc.cand_ids[g] for g in gold])
            batch["tgt"] = tgt.masked_fill(~tmask, -100)
        elif bb.family == "decoder":  # prompt + gold verbalizer (or the answer): log p(y|x) sums its tokens
            if gold:
                seqs = [np.concatenate([enc.src_ids[i], enc.cand_ids[g]]) for i, g in zip(idx, gold)]
                starts = [len(enc.src_ids[i]) for i in idx]
            else:
                seqs, starts = [enc.src_ids[i] for i in idx], [int(enc.answer_start[i]) for i in idx]
            ids, mask = pad(seqs)
            at_target = torch.arange(ids.shape[1])[None, :] >= torch.tensor(starts)[:, None]
            batch.update(ids=ids, mask=mask, tgt=ids.masked_fill(~(mask & at_target), -100))
        out.append(batch)
    return out


def run(cfg: PruneConfig, log=print) -> str:
    task = get_task(cfg.task)
    check_writable(cfg.out)  # before the Fisher pass, which can take minutes
    hf_cfg = bbm.load_config(cfg.backbone)
    bbm.check_max_length(hf_cfg, cfg.max_length, cfg.backbone)
    check_targets(task, bbm.family_of_config(hf_cfg))
    verb = []
    bb = None
    if cfg.init == "fisher" or bbm.family_of_config(hf_cfg) == "decoder":
        bb = bbm.load_backbone(cfg.backbone, cfg.device, for_grad=cfg.init == "fisher")
        check_format(cfg.prompt_format, bb.tokenizer, bb.family, cfg.backbone)
        if bb.family == "decoder":
            enc = bbm.encode(task, [], bb.tokenizer, bb.family, cfg.max_length, cfg.prompt_format)
            verb = [[int(t) for t in c] for c in enc.cand_ids]
    spec = spec_from_config(hf_cfg, cfg.r, cfg.layer_list, cfg.variant, task.kind, task.num_labels, verb,
                            dec_layers=cfg.decoder_layer_list)
    weights = bbm.state_dict_from_files(cfg.backbone) if cfg.init != "random" else None
    importance, n = None, 0
    train = task.load(cfg.data_dir, cfg.seed)["train"]  # its hash ties the init to this task's data
    if cfg.init == "fisher":
        rng = np.random.default_rng(cfg.seed)
        pick = rng.permutation(len(train))[: cfg.fisher_samples]
        batches = fisher_batches(bb, task, [train[i] for i in pick], cfg)
        log(f"empirical Fisher over {len(pick)} training examples of {task.name}")
        importance, n = prune.fisher_importance(bb, batches, task.kind)
        importance = {k.removeprefix("bert."): v.cpu() for k, v in importance.items()}
    sha = bb.sha256 if bb is not None else bbm.weights_sha256(cfg.backbone)
    tensors = {}
    if cfg.init != "random":
        tensors, idx = prune.pruned_state(spec, weights, importance or weights)
        spec.rope_pairs = prune.rope_pairs(spec, idx)  # saved with the spec: train_side builds its net with them
    fp = prune.init_fingerprint(spec, cfg.backbone, sha, cfg.init, n, task.name, content_hash(train))
    prune.save_side_init(cfg.out, tensors, spec, fp)
    log(f"side init ({cfg.init}, r={cfg.r}, layers={spec.layers}): {sum(t.numel() for t in tensors.values()):,} "
        "values pruned from the backbone")
    return cfg.out
