"""The run's checkpoint writer: one file of weights from rank 0 (ddp), or every rank's shards
(fsdp). Sharded saves are asynchronous when the world has several ranks (and
--train.async_checkpoint): the shards of step N are staged to CPU memory at once and written in a
background thread while training goes on (on a process group of their own), and published, as
atomically as a synchronous save, before the next save, the guides' removal or the final one."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from structlm.config import RunConfig
from structlm.runs import checkpoint, dcp
from structlm.training import distributed
from structlm.training.distributed import World


class Checkpointer:
    def __init__(self, cfg: RunConfig, world: World) -> None:
        t = cfg.train
        self.t, self.world = t, world
        self.async_ = t.parallel == "fsdp" and t.async_checkpoint and world.ddp
        self.group = dist.new_group(backend="gloo") if self.async_ else None  # collective
        self.pending: checkpoint.ShardedSave | None = None

    def save(self, raw: nn.Module, optimizer: torch.optim.Optimizer, cfg: RunConfig, step: int,
             state: dict, final: bool = False) -> None:
        """Checkpoint `step` (`final`: written and published before this returns)."""
        self.wait()
        t, world = self.t, self.world
        if t.parallel != "fsdp":
            if world.master:
                checkpoint.save(t.out_dir, raw, optimizer, cfg, step, state, t.keep_last)
            return
        background = self.async_ and not final
        if background:
            write = lambda d: dcp.async_save_dcp(d, raw, optimizer, self.group)  # noqa: E731
        else:
            write = lambda d: dcp.save_dcp(d, raw, optimizer)  # noqa: E731
        pending = checkpoint.ShardedSave(t.out_dir, write, cfg, step, state, t.keep_last,
                                         world.master, lambda: distributed.barrier(world))
        if background:
            self.pending = pending
        else:
            pending.complete()

    def wait(self) -> None:
        """Publish the checkpoint still being written, if any (collective)."""
        if self.pending is not None:
            self.pending.complete()
            self.pending = None
