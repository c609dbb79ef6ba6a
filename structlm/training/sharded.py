"""Sharded training state with torch.distributed.checkpoint (DCP), for `--train.parallel fsdp`.

Every rank writes its own shards of the weights and AdamW moments into the checkpoint's `dcp/`
folder, keyed by parameter name (not by rank or position), so a checkpoint saved by N ranks loads
at any world size M: DCP reads each rank's slices of each tensor from whichever files hold them.
The same calls work on an unsharded model (a world of one, or a DDP run resuming an FSDP
checkpoint). The checkpoint directory's atomic publication is checkpoint.py's.

Leaving the self-guided phase under FSDP rebuilds the sharded model without its guides (FSDP2's
parameter groups are fixed when a module is sharded): names and AdamW state of the structured
factors carry over, the guides' shards and moments are dropped and freed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from structlm.config import RunConfig
from structlm.model.gpt import GPT
from structlm.training.optim import make_optimizer


def load_full_checkpoint(
    model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optim_state: dict
) -> None:
    """A single-file (DDP) checkpoint into a sharded model: full weights by name; the optimizer
    state (keyed by position in `optimizer`'s groups) re-keyed by parameter name."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    full = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, weights, options=full)
    state = {order[i]: s for i, s in optim_state["state"].items()}
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in optim_state["param_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=full)


def _unguided_name(name: str) -> str | None:
    """The name a parameter has once its GuidedLinear is unwrapped; None for a guide."""
    if name.endswith(".guide"):
        return None
    return name.replace(".structured.", ".")


def leave_guided(
    model: nn.Module, optimizer: torch.optim.Optimizer, cfg: RunConfig, shard_fn,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The sharded model and optimizer without the guides: a new GPT (no guides) sharded by
    `shard_fn`, loaded by name from the old one's shards; returns (model, optimizer)."""
    sd = get_model_state_dict(model)
    osd = get_optimizer_state_dict(model, optimizer)
    rename = {k: _unguided_name(k) for k in sd}
    sd = {rename[k]: v for k, v in sd.items() if rename[k]}
    osd = {"state": {_unguided_name(k): v for k, v in osd["state"].items() if _unguided_name(k)},
           "param_groups": [{**g, "params": [_unguided_name(k) for k in g["params"]
                                             if _unguided_name(k)]}
                            for g in osd["param_groups"]]}
    device = next(model.parameters()).device
    with torch.random.fork_rng():  # building the new model draws no numbers from the run's RNG
        new = shard_fn(GPT(cfg.model).to(device))
    new_opt = make_optimizer(new, cfg.optim)
    set_model_state_dict(new, sd)
    set_optimizer_state_dict(new, new_opt, osd)
    return new, new_opt
