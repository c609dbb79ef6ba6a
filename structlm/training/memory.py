"""Memory and speed levers applied to the transformer blocks of a model, in place (parameter names
unchanged, so checkpoints do not see them): activation checkpointing and per-block compilation.

    none        keep every activation for the backward (fastest, most memory)
    block       keep only each block's input; recompute the block in the backward
    selective   recompute a block's cheap ops (norms, activations, adds) but keep the outputs of its
                matmuls, the expensive part to redo (torch's selective checkpointing)
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

# ops whose outputs `selective` keeps: the GEMMs (dense, structured and attention)
_aten = torch.ops.aten
_SAVED = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
          _aten._scaled_dot_product_flash_attention.default,
          _aten._scaled_dot_product_efficient_attention.default,
          _aten._scaled_dot_product_flash_attention_for_cpu.default}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed(forward, mode: str):
    context = (functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)
               if mode == "selective" else None)

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # eval and decoding: nothing to save
            return forward(*args, **kwargs)
        extra = {"context_fn": context} if context else {}
        return checkpoint(forward, *args, use_reentrant=False, **kwargs, **extra)
    return run


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Checkpoint every block of `model.blocks` by `mode` (none | block | selective)."""
    if mode not in ("none", "block", "selective"):
        raise ValueError(f"activation_checkpointing={mode!r}: choose none, block or selective")
    if mode == "none":
        return
    for block in model.blocks:
        block.forward = _checkpointed(block.forward, mode)


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each transformer block in place (as torchtitan does): one compiled graph the
    blocks share, instead of one graph of the whole model; parameter names stay the same."""
    for block in model.blocks:
        block.compile()
