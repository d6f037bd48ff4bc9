"""Several side networks of one shape trained as one batched computation (the configs of a sweep).

A sweep's configs share every batch. Configs whose side nets have the same shape (the same SideSpec: only
lr, seed, init, epochs, weight decay, warm-up or clipping differ) are stacked: each trainable tensor becomes
one (K, ...) tensor, the forward runs under torch.func.vmap over the K parameter sets, and one backward
gives every config its own gradient (config k's loss depends on slice k only). The update is AdamW as
torch.optim.AdamW computes it (decoupled weight decay, bias corrections, eps outside the square root),
vectorized over configs with each config's own learning rate, schedule and gradient clipping.

Dropout under vmap draws one mask per config from the shared generator ("different" randomness), not the
masks the config draws alone; so a stacked config matches the same config trained alone to float
tolerance only without dropout (tested), and in distribution with it. `sweep_stack: never` (train_side)
runs every config on its own instead, bit for bit as alone; `auto` (the default) stacks on CUDA only, where
one batched computation beats K small launches, and steps configs in turn on CPU, where stacking measured
slower (bench/results/stage_two_cpu.json, "stacking").
"""
from __future__ import annotations

import warnings

import torch
from torch.func import functional_call, vmap

from pipeline.config import ALL_DROPOUT_SITES


def shape_key(run) -> str:
    """Configs with equal keys can be stacked: same side-net structure and the same dropout rates."""
    spec = run.s.net.spec
    return spec.to_json()


class StackedRuns:
    """Runs (pipeline.train_side.Run) stacked for one epoch: built from their nets and optimizer states, and
    written back into them by `unstack()` before each run's end of epoch."""

    def __init__(self, runs: list):
        self.runs = runs
        self.net = runs[0].s.net  # the module skeleton functional_call runs; its own tensors are not used
        self.names = [n for n, p in self.net.named_parameters() if p.requires_grad]
        self.buffers = dict(self.net.named_buffers())
        nets = [dict(r.s.net.named_parameters()) for r in runs]
        self.params = {n: torch.stack([p[n].detach() for p in nets]).requires_grad_(True) for n in self.names}
        self.m, self.v = {}, {}
        for n in self.names:
            states = [r.opt.state.get(dict(r.s.net.named_parameters())[n], {}) for r in runs]
            self.m[n] = torch.stack([st["exp_avg"] if "exp_avg" in st else torch.zeros_like(self.params[n][0])
                                     for st in states])
            self.v[n] = torch.stack([st["exp_avg_sq"] if "exp_avg_sq" in st else torch.zeros_like(self.params[n][0])
                                     for st in states])
        first = dict(runs[0].s.net.named_parameters())[self.names[0]]
        self.step_count = torch.tensor([float(r.opt.state.get(dict(r.s.net.named_parameters())[self.names[0]], {})
                                              .get("step", 0.0)) for r in runs], device=first.device)
        g = runs[0].opt.param_groups[0]
        self.beta1, self.beta2 = g["betas"]
        self.eps = g["eps"]
        self.wd = torch.tensor([r.opt.param_groups[0]["weight_decay"] for r in runs], device=first.device)
        self.clip = torch.tensor([float(r.cfg.grad_clip) for r in runs], device=first.device)
        has_dropout = any(getattr(self.net.spec, k) > 0 for k in ALL_DROPOUT_SITES)
        self.forward = vmap(self._loss, in_dims=(0, None), randomness="different" if has_dropout else "error")

    def _loss(self, params, batch):
        return functional_call(self.net, {**params, **self.buffers}, (batch,)).loss

    def _forward(self, batch):
        from pipeline import side

        side._MATH_ATTENTION[0] = True
        try:
            return self.forward(self.params, batch)  # (K,)
        finally:
            side._MATH_ATTENTION[0] = False

    def step(self, batch, amp):
        """One AdamW step of every stacked config on `batch`; returns the (K,) losses."""
        dev = self.step_count.device
        K = len(self.runs)
        lr = torch.tensor([r.opt.param_groups[0]["lr"] for r in self.runs], device=dev)
        self.net.train()
        with amp:
            losses = self._forward(batch)
        grads = torch.autograd.grad(losses.float().sum(), [self.params[n] for n in self.names])
        # per-config gradient clipping, as clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6))
        sq = sum(g.float().reshape(K, -1).pow(2).sum(1) for g in grads)
        coef = torch.clamp(self.clip / (sq.sqrt() + 1e-6), max=1.0)
        self.step_count += 1
        bc1 = 1 - self.beta1 ** self.step_count
        bc2_sqrt = torch.sqrt(1 - self.beta2 ** self.step_count)
        with torch.no_grad():
            for n, g in zip(self.names, grads):
                p, m, v = self.params[n], self.m[n], self.v[n]
                shape = (K,) + (1,) * (p.dim() - 1)
                g = g * coef.view(shape)
                p.mul_((1 - lr * self.wd).view(shape))
                m.mul_(self.beta1).add_(g, alpha=1 - self.beta1)
                v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
                denom = (v.sqrt() / bc2_sqrt.view(shape)).add_(self.eps)
                p.sub_((lr / bc1).view(shape) * m / denom)
        with warnings.catch_warnings():  # the runs' own optimizers never step here: the schedule still must
            warnings.simplefilter("ignore", UserWarning)
            for r in self.runs:
                r.sched.step()
        return losses.detach()

    def unstack(self):
        """Write every config's tensors and optimizer moments back into its own net and optimizer."""
        with torch.no_grad():
            for k, r in enumerate(self.runs):
                params = dict(r.s.net.named_parameters())
                for n in self.names:
                    p = params[n]
                    p.copy_(self.params[n][k])
                    r.opt.state[p] = {"step": self.step_count[k].detach().clone().cpu(),
                                      "exp_avg": self.m[n][k].clone(), "exp_avg_sq": self.v[n][k].clone()}


def can_stack(run) -> bool:
    """Token-selective training draws its positions with its own generator: not under vmap."""
    return run.s.net.spec.select_k == 0 and run.s.feed is None
