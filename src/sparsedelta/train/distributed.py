"""Data-parallel training across processes started by torchrun (gloo on CPU, nccl on GPUs).

Gradients are averaged by hand (one flat all-reduce per step) instead of wrapping the model in
DistributedDataParallel: DDP fixes its gradient buckets to the parameters' sizes when it is built,
while a sparse delta's trainable vector shrinks at SaRA's re-selection and a method may swap its
trainable tensors between phases. The arithmetic is DDP's: every rank starts from the same weights
and applies the same averaged gradient, so the deltas stay identical across ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def setup() -> World:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("SPARSEDELTA_BACKEND") != "gloo" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return World(dist.get_rank(), dist.get_world_size())


def shutdown(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(params: list[torch.Tensor], world: World) -> None:
    if not world.active:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    start = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[start : start + n].view_as(g).clone()
        start += n


def all_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    if world.active:
        dist.all_reduce(tensor)
    return tensor


def broadcast(obj, world: World):
    """Rank 0's value of a picklable object, on every rank."""
    if not world.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, world: World) -> list:
    """Every rank's value of a picklable object, in rank order (on every rank)."""
    if not world.active:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()
