"""Structure-aware muP (`--optim.param_scaling mup`, docs/method.md §10): every weight matrix gets
an AdamW learning rate and an init scale from its own fan-in, relative to the same model at a
base width, so that the lr tuned at the base width transfers to wider models.

    hidden matrix (attention, FFN, every structured factor, SGT guides), fan-in n, base fan-in n0:
        lr   x  n0 / n            (Adam: the update's spectral norm stays width-independent)
        init std x sqrt(n0 / n)   (the layer's own init, drawn at that std: dense N(0, std^2),
                                   LowRank's SVD of such a draw; orthogonal inits are already
                                   width-independent and ignore std)
    embeddings, norms, biases: lr and init unchanged (O(1) coordinates)
    output: logits x base_width / d_model, attention logits / head_dim (`config.mup_scales`);
        both are model-config fields that an export folds into the weights (`fold_scales`)

A factor's fan-in is its last axis (every kind stores its factors as (..., fan_out, fan_in)), and
its base fan-in the same parameter's in the model `ModelConfig.at_width(base_width)` builds, so a
kind whose block size grows like sqrt(width) (BTT) gets its own exponent with no code of its own.
At d_model = base_width, mup and standard train the same model but for the two scales.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import nn

from structlm.config import ModelConfig
from structlm.linear.base import StructuredLinear
from structlm.linear.guided import guided_layers, wrap_guided
from structlm.model.gpt import GPT


def hidden_weights(model: GPT) -> dict[str, nn.Parameter]:
    """The >= 2-D parameters muP scales, by name: all but embeddings and the output layer."""
    skip = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    skip |= {id(p) for p in model.lm_head.parameters()}
    return {n: p for n, p in model.named_parameters() if p.dim() >= 2 and id(p) not in skip}


def base_model(cfg: ModelConfig, base_width: int, guided: bool = False) -> GPT:
    """The base-width model, on the meta device (shapes only: no memory, no init work)."""
    base = cfg.at_width(base_width)
    base = dataclasses.replace(base, ffn=dataclasses.replace(base.ffn, init="fixed"))
    with torch.device("meta"):
        model = GPT(base)
        return wrap_guided(model) if guided else model


def fan_in_ratios(model: GPT, base_width: int) -> dict[str, float]:
    """base fan-in / fan-in of every hidden weight of `model` (SGT guides included)."""
    base = hidden_weights(base_model(model.cfg, base_width, bool(guided_layers(model))))
    out = {}
    for name, p in hidden_weights(model).items():
        if name not in base:
            raise ValueError(f"muP: {name} has no counterpart in the base-width model; "
                             "param_scaling=mup supports structlm's GPT as built from its config")
        out[name] = base[name].shape[-1] / p.shape[-1]
    return out


@torch.no_grad()
def init_(model: GPT, base_width: int) -> GPT:
    """Re-initialise `model`'s hidden layers at muP's scale: each layer's own init at init_std x
    sqrt(base fan-in / fan-in). Call it before SGT wraps the layers (the guides copy them)."""
    if guided_layers(model):
        raise ValueError("muP init comes before SGT's guides (they start as copies of the "
                         "structured layers); call init_ on the unwrapped model")
    std = model.cfg.init_std
    base = dict(base_model(model.cfg, base_width).named_modules())
    for name, m in model.named_modules():
        if isinstance(m, StructuredLinear):
            m.reset_parameters(m.init, std * math.sqrt(base[name].d_in / m.d_in))
        elif isinstance(m, nn.Linear) and m is not model.lm_head:
            m.weight.normal_(0.0, std * math.sqrt(base[name].in_features / m.in_features))
    return model


@torch.no_grad()
def fold_scales(model: GPT) -> GPT:
    """A copy of `model` computing the same function with attn_scale and logit_scale at their
    defaults: the attention factor folded into the query rows of every qkv projection (RoPE is
    linear, so it commutes), the logit factor into the final norm's weight and bias. What an
    export writes, so the exported model is a plain Llama / GPT-2 / structlm model."""
    cfg = model.cfg
    if cfg.attn_scale is None and cfg.logit_scale == 1.0:
        return model
    out = copy.deepcopy(model)
    q_rows = cfg.n_head * cfg.head_dim  # qkv rows: [Q | K | V]
    c = 1.0 if cfg.attn_scale is None else cfg.attn_scale * math.sqrt(cfg.head_dim)
    for block in out.blocks:
        for t in (block.attn.qkv.weight, block.attn.qkv.bias):
            if t is not None:
                t[:q_rows] *= c
    for t in (out.ln_f.weight, getattr(out.ln_f, "bias", None)):
        if t is not None:
            t *= cfg.logit_scale
    # the copy's one config object, shared by its attention layers as in the original
    out.cfg.attn_scale, out.cfg.logit_scale = None, 1.0
    return out
