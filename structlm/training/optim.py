"""The optimizer and its schedule (docs/method.md §6.3): AdamW, linear warm-up then cosine decay,
the number of steps a budget buys, and removing parameters (SGT's guides) mid-run."""

from __future__ import annotations

import math

import torch
from torch import nn

from structlm.config import OptimConfig, RunConfig
from structlm.model import mup
from structlm.model.flops import tokens_for_budget


def total_steps(cfg: RunConfig) -> int:
    """Optimizer steps from the budget: steps, tokens (int(tokens / tokens_per_step)) or training
    FLOPs."""
    t = cfg.train
    per_step = t.batch_size * cfg.seq_len
    if t.max_steps is not None:
        return t.max_steps
    if t.max_tokens is not None:
        tokens = t.max_tokens
    elif t.max_flops is not None:
        tokens = tokens_for_budget(cfg.model, t.max_flops, cfg.seq_len)
    else:
        raise ValueError("no training budget: set --train.max_steps, --train.max_tokens or "
                         "--train.max_flops")
    steps = int(tokens // per_step)
    if steps < 1:
        raise ValueError(f"the budget gives {tokens:.3g} tokens, less than one step of "
                         f"{per_step} tokens")
    return steps


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warm-up over warmup_frac of the steps to cfg.lr, then cosine to min_lr_ratio * lr."""
    warmup = int(cfg.warmup_frac * total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    floor = cfg.min_lr_ratio * cfg.lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's lr on every group, times the group's muP multiplier (1 when standard)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)


def fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW (one kernel over all tensors, several times faster than the
    per-tensor loop on a CPU: BENCHMARKS.md) takes these parameters: plain floating tensors on
    CPU or CUDA. Sharded (DTensor) parameters keep the per-tensor loop."""
    return all(type(p.data) is torch.Tensor and p.is_floating_point()
               and p.device.type in ("cpu", "cuda") for p in params)


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW (fused where `fused_supported`); decay on every parameter as in the paper, or
    (decay_all=False) only on >=2-D tensors; under param_scaling=mup one group per muP lr
    multiplier (`structlm.mup.fan_in_ratios`), in the order the parameters first appear."""
    params = [p for p in model.parameters() if p.requires_grad]
    decays = lambda p: cfg.decay_all or p.dim() >= 2  # noqa: E731
    if cfg.param_scaling == "mup":
        by_name = mup.fan_in_ratios(model, cfg.base_width)
        mult = {id(p): by_name.get(n, 1.0) for n, p in model.named_parameters()}
        keyed: dict[tuple[float, bool], list] = {}
        for p in params:
            keyed.setdefault((mult[id(p)], decays(p)), []).append(p)
        groups = [{"params": ps, "lr_mult": m, "decays": d} for (m, d), ps in keyed.items()]
    elif cfg.decay_all:
        groups = [{"params": params, "decays": True}]
    else:
        groups = [{"params": [p for p in params if decays(p)], "decays": True},
                  {"params": [p for p in params if not decays(p)], "decays": False}]
    for g in groups:
        g["weight_decay"] = cfg.weight_decay if g["decays"] else 0.0
        g["lr"] = cfg.lr * g.get("lr_mult", 1.0)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=fused_supported(params) or None)


def apply_hparams(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """Give a restored optimizer the config's betas, eps and weight decay (its state dict carries
    the values it was saved with); the groups are those `make_optimizer` built (a checkpoint from
    before groups carried `decays`: the first group decays, or all with decay_all)."""
    for i, g in enumerate(optimizer.param_groups):
        g["betas"], g["eps"] = (cfg.beta1, cfg.beta2), cfg.eps
        g["weight_decay"] = cfg.weight_decay if g.get("decays", cfg.decay_all or i == 0) else 0.0


def drop_params(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Remove `params` and their state (AdamW moments) from `optimizer`, freeing that memory."""
    ids = {id(p) for p in params}
    for g in optimizer.param_groups:
        g["params"] = [p for p in g["params"] if id(p) not in ids]
    for p in params:
        optimizer.state.pop(p, None)
