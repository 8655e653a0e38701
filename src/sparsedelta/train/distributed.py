"""Data-parallel training across processes started by torchrun or `accelerate launch` (gloo on
CPU, nccl on GPUs).

Launchers and what they set: torchrun, and accelerate's multi-GPU launcher (`--multi_gpu`, which is
torchrun inside and also starts CPU processes on a machine without GPUs), set RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Accelerate's multi-CPU mode (`--cpu` with
`--mpirun_hostfile`) starts the processes with mpirun, which sets only MPI's own variables (Open
MPI's OMPI_COMM_WORLD_*, MPICH / Intel MPI's PMI_*, MVAPICH's MV2_COMM_WORLD_*) and accelerate the
master address: they are read the way accelerate reads them. `accelerate launch --cpu
--num_processes N` without a hostfile starts one process only; that is refused rather than run as
one process with a global batch N times smaller than asked.

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

from ..errors import UsageError


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


RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")
SIZE_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
LOCAL_RANK_VARS = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK")


def _first(env: dict, names: tuple[str, ...], default: int) -> int:
    return next((int(env[n]) for n in names if env.get(n, "") != ""), default)


def world_from_env(env: dict) -> World:
    """This process's rank and the number of processes, from the launcher's variables (see above)."""
    size = _first(env, SIZE_VARS, 1)
    if size <= 1 and env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env:
        raise UsageError(
            "accelerate launch --cpu started one process although more were asked for: its multi-CPU mode needs "
            "mpirun (--mpirun_hostfile). For N processes on CPUs use `accelerate launch --multi_gpu --num_processes N` "
            "(on a machine without GPUs it starts N CPU processes, like torchrun) or `torchrun --nproc_per_node N` "
            "(one process was meant? then MASTER_ADDR must not be set)"
        )
    return World(_first(env, RANK_VARS, 0), size)


def setup() -> World:
    """Join the process group when launched with several processes; otherwise a world of one."""
    world = world_from_env(dict(os.environ))
    size = world.size
    if size <= 1:
        return World()
    # torch's env:// rendezvous reads RANK and WORLD_SIZE; under mpirun only MPI's names are set
    os.environ.setdefault("RANK", str(world.rank))
    os.environ.setdefault("WORLD_SIZE", str(size))
    os.environ.setdefault("LOCAL_RANK", str(_first(dict(os.environ), LOCAL_RANK_VARS, 0)))
    if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
        raise UsageError(f"{size} processes but no MASTER_ADDR / MASTER_PORT to meet at; start them with torchrun or "
                         "accelerate launch, or set both")  # fmt: skip
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
