"""torch.distributed for training: the process group torchrun describes, the data-parallel wrapper (DDP, or
FSDP2's ``fully_shard``), and the few collectives the trainer needs. One process without torchrun is world
size 1 and touches none of it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes, ``device`` to train on."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def current_world(device: torch.device) -> World:
    """The world of an initialised process group (one process otherwise)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), device)
    return World(0, 1, device)


def init_from_environment(device: str = None, timeout_s: float = 1800) -> World:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment): nccl on CUDA,
    gloo on the CPU, each rank on CUDA device ``LOCAL_RANK`` when there are GPUs. Without torchrun: one process
    on ``device`` (default: CUDA when available)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    wanted = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if size == 1:
        return World(0, 1, wanted)
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={size} but this torch has no torch.distributed")
    if wanted.type == "cuda":
        wanted = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(wanted)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if wanted.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return World(dist.get_rank(), dist.get_world_size(), wanted)


def shutdown(world: World) -> None:
    """Leave the process group: a barrier first, so no rank tears down while another still runs a collective."""
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, world: World, fsdp: bool) -> nn.Module:
    """The module to train: ``model`` itself in one process; else DDP, or with ``fsdp`` FSDP2 (each shared
    block its own group, then the rest), which shards ``model``'s parameters in place."""
    if not world.distributed:
        return model
    if not fsdp:
        return nn.parallel.DistributedDataParallel(model,
                                                   device_ids=[world.device] if world.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # the mesh on this run's device type (left to itself, fully_shard picks CUDA wherever there is one)
    mesh = init_device_mesh(world.device.type, (world.size,))
    for block in model.model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_sum(values: Tensor, world: World) -> Tensor:
    """``values`` summed over the ranks (itself in one process)."""
    if world.distributed:
        values = values.clone()
        dist.all_reduce(values)
    return values


def any_rank(flag: bool, world: World) -> bool:
    """True when ``flag`` is True on any rank (an interrupt on one stops all at the same step)."""
    if not world.distributed:
        return flag
    return bool(all_sum(torch.tensor([float(flag)], device=world.device), world).item())


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
