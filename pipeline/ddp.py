"""Stage two on several devices: torch DistributedDataParallel under torchrun (gloo on the CPU, nccl on CUDA).

    torchrun --standalone --nproc-per-node 2 -m stages.train_side ...                       # one machine
    torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HEAD:29500 \\
             --nproc-per-node 8 -m stages.train_side ...                                   # two machines

Every rank opens the same store and builds the same epoch plan (a function of seed and epoch), so each knows
every global batch; it takes its part (pipeline/batches.py: rank_part, balanced by tokens) and the ranks'
gradients are averaged. The side net's loss is a mean over its batch's terms (examples, or T5 target tokens),
and the ranks' parts differ in size, so each rank back-propagates

    W * loss_rank * terms_rank / terms_global

(W ranks; DDP divides the summed gradients by W): the averaged gradient is exactly the gradient of the global
batch's mean loss, as one process computes it, up to float summation order. Clipping then sees the same
(averaged) gradient on every rank, and each rank's AdamW takes the same step. A rank whose part of a global
batch is empty (a last batch smaller than W) runs one example of it with weight 0, so that it still joins
the step's all-reduce.

Rank 0 evaluates, writes the run folder, metrics and the resume checkpoint (with every rank's dropout RNG
state); the others wait at the epoch's barrier. Dropout masks are drawn per rank, so with dropout the curves
agree with one process in distribution; without it, to float tolerance (tests/test_distributed.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.device import pick_device


@dataclass(frozen=True)
class Group:
    """This process's place among the ranks of one training run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def part(self) -> tuple[int, int] | None:
        """(rank, world) for the reader, None when one process trains alone."""
        return (self.rank, self.world) if self.world > 1 else None


ALONE = Group()


def join(device: str) -> Group:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1), else train alone. On
    CUDA each rank takes the GPU of its local rank (so device "cuda" means that GPU from here on)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return ALONE
    import torch.distributed as dist

    group = Group(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    cuda = pick_device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(group.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return group


def leave(group: Group) -> None:
    if group.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def wrap(net: torch.nn.Module, group: Group) -> torch.nn.Module:
    """The module a rank steps: DDP around the side net (the same parameters), or the net itself alone."""
    if group.world == 1:
        return net
    from torch.nn.parallel import DistributedDataParallel

    # broadcast_buffers=False: the buffers are the frozen backbone tensors (a T5 embedding table is 32k x d),
    # equal on every rank and never changed. find_unused_parameters: some variants leave parameters out of
    # the loss (T5 adapter: the relative-position tables); they keep no gradient, as in one process.
    return DistributedDataParallel(net, broadcast_buffers=False, find_unused_parameters=True)


def rank_seed(seed: int, group: Group) -> int:
    """Dropout seed of this rank: rank 0 draws what one process draws, the others their own streams."""
    if group.rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, group.rank]).generate_state(1)[0])


def rank_loss(loss: torch.Tensor, terms, all_terms, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W * loss * terms / all_terms to back-propagate, loss * terms / all_terms: this rank's share of the global
    batch's mean loss). `loss` is the mean of this rank's `terms` terms, `all_terms` the ranks' sum."""
    share = loss * (torch.as_tensor(terms, dtype=torch.float64) / all_terms).to(loss.dtype)
    return share * world, share


def scaled_loss(loss: torch.Tensor, terms, placeholder: bool, group: Group) -> tuple[torch.Tensor, torch.Tensor]:
    """rank_loss with the global batch's term count summed over the ranks (one scalar all-reduce)."""
    if group.world == 1:
        return loss, loss
    import torch.distributed as dist

    mine = torch.zeros((), dtype=torch.float64, device=loss.device) + (0 if placeholder else terms)
    all_terms = mine.clone()
    dist.all_reduce(all_terms)
    return rank_loss(loss, mine, all_terms, group.world)


def total(x: torch.Tensor | float, group: Group) -> torch.Tensor:
    """Sum over ranks (every rank gets it)."""
    t = torch.as_tensor(x, dtype=torch.float64)
    if group.world == 1:
        return t
    import torch.distributed as dist

    dev = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    t = t.to(dev)
    dist.all_reduce(t)
    return t.cpu()


def gather(obj, group: Group) -> list:
    """Every rank's `obj`, in rank order (every rank gets the list)."""
    if group.world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * group.world
    dist.all_gather_object(out, obj)
    return out


def barrier(group: Group) -> None:
    if group.world > 1:
        import torch.distributed as dist

        dist.barrier()
