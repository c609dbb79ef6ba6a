"""The process group a run trains in: torchrun's environment, DDP around the model, collectives.

Under `torchrun` the model is wrapped in DDP here (gloo on CPU, nccl on CUDA); model.py knows
nothing of it. A plain process is a world of one, and every function here is then a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from structlm.utils import autodetect_device, dist_info


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.size > 1


def setup(device_name: str) -> World:
    """The run's rank, world size and device; joins the process group under torchrun."""
    rank, local_rank, size = dist_info()
    device = autodetect_device(device_name)
    if size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World(rank, local_rank, size, device)


def wrap(model: nn.Module, world: World, *, find_unused: bool, compile: bool) -> nn.Module:
    """DDP (and torch.compile) around the raw model; redone when the model's parameters change.
    `find_unused`: some parameters may get no gradient in a step (reduce_flop's skipped guides)."""
    if world.ddp:
        ids = [world.local_rank] if world.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)
    return torch.compile(model) if compile else model


def mean_(t: torch.Tensor, world: World) -> torch.Tensor:
    """All-reduce `t` to its mean over ranks, in place."""
    if world.ddp:
        dist.all_reduce(t)
        t /= world.size
    return t


def sum_(values: list[float], world: World) -> list[float]:
    """The sum over ranks of a few floats (in float64)."""
    if not world.ddp:
        return values
    buf = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(buf)
    return buf.tolist()


def barrier(world: World) -> None:
    if world.ddp:
        dist.barrier()
