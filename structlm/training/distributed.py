"""The process group a run trains in: torchrun's environment, the data-parallel engine around the
model (DDP or FSDP2), collectives.

Under `torchrun` (gloo on CPU, nccl on CUDA) the model is wrapped in DDP, or sharded in place by
FSDP2's `fully_shard` per transformer block and at the root (`--train.parallel fsdp`); model.py
knows nothing of it. A plain process is a world of one: no wrapping, and the collectives are no-ops.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from structlm.config import TrainConfig
from structlm.training.memory import apply_activation_checkpointing, compile_blocks
from structlm.utils.device import autodetect_device, dist_info


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


def wrap_model(
    model: nn.Module, world: World, t: TrainConfig, amp: torch.dtype | None
) -> nn.Module:
    """The raw model made ready to train, in place: activation checkpointing and compilation per
    block, then FSDP2's sharding under --train.parallel fsdp. Returns it."""
    apply_activation_checkpointing(model, t.activation_checkpointing)
    if t.compile:
        compile_blocks(model)
    return shard(model, world, amp) if t.parallel == "fsdp" else model


def wrap(model: nn.Module, world: World, parallel: str, *, find_unused: bool) -> nn.Module:
    """DDP around the raw model (a sharded model is its own wrapper); redone when the model's
    parameters change. `find_unused`: some parameters may get no gradient in a step (reduce_flop's
    skipped guides)."""
    if world.ddp and parallel == "ddp":
        ids = [world.local_rank] if world.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)
    return model


def shard(model: nn.Module, world: World, amp: torch.dtype | None) -> nn.Module:
    """FSDP2 in place: each transformer block one sharded unit (gathered for its forward and
    backward, freed after), the rest (embeddings, final norm, head) the root's. Under bf16 the
    gathered parameters and the matmuls are bf16, master weights, gradients' reduction and AdamW
    stay fp32. A world of one is left unsharded. Returns the model (the same object)."""
    if not world.ddp:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(world.device.type, (world.size,))
    mp = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def is_fsdp(model: nn.Module) -> bool:
    """Whether FSDP2 sharded `model`."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def grad_sync(model: nn.Module, world: World, sync: bool):
    """A context for one micro-step's backward: gradients are reduced across ranks only when
    `sync` (the last micro-step of an optimizer step)."""
    if not world.ddp or sync:
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return model.no_sync()


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a (possibly sharded or replicated) DTensor result."""
    return t.full_tensor() if isinstance(t, DTensor) else t


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
