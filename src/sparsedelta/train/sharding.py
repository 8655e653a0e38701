"""Sharded training (`--fsdp`, launched by torchrun): the frozen base split across processes with
torch's FSDP2 (`torch.distributed.fsdp.fully_shard`), the sparse deltas replicated.

Each transformer block is one FSDP unit (the classes a Hugging Face model names in
`_no_split_modules`, else the entries of its longest `nn.ModuleList`), the rest of the model the
root unit: every process keeps 1/N of each frozen weight and all-gathers a block's weights just
for its forward and again for its backward. A shard cannot hold θ + delta, so every delta is
applied as a correction in the forward (y = θx + Δx, core/delta.py); the delta values, the new
head and their AdamW state are left out of FSDP (`ignored_params`) and replicated, their gradients
averaged across processes as in data-parallel training (train/distributed.py). Replicated, a
delta costs each process about 28 bytes an entry (values, gradient, two AdamW moments, the int64
position and θ's value), against 2-4 bytes per base weight sharded N ways (docs/distributed.md).

FSDP needs every process to run the same forward passes, so under `--fsdp` each process evaluates
every held-out example (data-parallel runs split them).

Checkpoints need nothing from FSDP: everything trained is replicated, so rank 0 saves it as in a
data-parallel run, and `--resume` loads it on every process after sharding the base afresh.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.adapters import state_of, use_correction
from ..errors import UsageError
from ..methods import DeltaRunner
from .distributed import World


def check(runner, world: World) -> None:
    """Refuse --fsdp where it cannot work, naming the way out."""
    if not world.active:
        raise UsageError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node N (N >= 2)")
    if not isinstance(runner, DeltaRunner) or runner.swaps_parameters:
        raise UsageError(
            f"--fsdp shards the frozen base under a sparse delta; --method {runner.name} trains dense tensors "
            "(or swaps them mid-run), which would be replicated whole on every process: drop --fsdp"
        )
    if runner.moves_entries:
        raise UsageError(
            f"--fsdp shards the frozen base, but --method {runner.name} moves its entries to new positions mid-run and "
            "reads θ there, which no process holds whole: drop --fsdp (torchrun without it works)"
        )


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the classes it names in `_no_split_modules`, else the entries of
    its longest nn.ModuleList."""
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """fully_shard the frozen base of a model carrying sparse deltas (on the CPU) onto `device`; the
    deltas become corrections, and they and the densely trained tensors stay whole on every process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    use_correction(model)
    state = state_of(model)
    kept = {p for a in state.adapters.values() for d in a.deltas.values() for p in d.parameters()}
    kept |= {p for a in state.adapters.values() for p in a.saved.values()}
    kept |= {p for p in model.parameters() if p.requires_grad}
    mesh = init_device_mesh(device.type, (world.size,))
    for block in blocks(model):
        fully_shard(block, mesh=mesh, ignored_params=kept)
    fully_shard(model, mesh=mesh, ignored_params=kept)
    with torch.no_grad():  # fully_shard moves what it shards; the replicated tensors follow by hand
        for adapter in state.adapters.values():
            for delta in adapter.deltas.values():
                delta.to(device)
            for param in adapter.saved.values():
                param.data = param.data.to(device)
    return model


def local_entries(model: nn.Module) -> int:
    """Entries of the model's parameters this process holds (a shard's local part for sharded ones)."""
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
