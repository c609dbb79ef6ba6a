"""Sharded checkpoints in torch.distributed.checkpoint (DCP) format: save (sync or async), load,
list keys.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns whenever it runs without a process group; for a world of one that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_dcp(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: every rank writes its shards of the weights and the optimizer state."""
    with _single_process_ok():
        dcp.save({"model": get_model_state_dict(model),
                  "optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(path),
                 no_dist=not dist.is_initialized())


def async_save_dcp(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, group):
    """Collective: stage every rank's shards to CPU memory now, write them in a background thread
    (its collectives on `group`, not the training's); returns the Future of the writing."""
    return dcp.async_save({"model": get_model_state_dict(model),
                           "optim": get_optimizer_state_dict(model, optimizer)},
                          checkpoint_id=str(path), process_group=group)


def load_dcp(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Collective: load a DCP checkpoint saved at any world size into `model` (sharded or not)
    and `optimizer`, each rank reading the slices it holds."""
    sd = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        sd["optim"] = get_optimizer_state_dict(model, optimizer)  # initialises empty AdamW state
    with _single_process_ok():
        dcp.load(sd, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    set_model_state_dict(model, sd["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, sd["optim"])


def dcp_model_keys(path: Path) -> set[str]:
    """The parameter and buffer names a DCP checkpoint holds (without reading any tensor)."""
    meta = dcp.FileSystemReader(str(path)).read_metadata()
    return {k[len("model."):] for k in meta.state_dict_metadata if k.startswith("model.")}
