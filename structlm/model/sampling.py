"""Sampling the next token: temperature, top-k, top-p, each row with its own generator."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse sampling settings that would silently do something else (ValueError, fix named)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature} must be a number >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or unset to keep every token)")
    if top_p is not None and not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p} must be in (0, 1] (or unset)")


def sample(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token per row of logits (B, vocab), all rows with the same settings and generator:
    greedy at temperature 0, else top-k then top-p (`sample_rows` draws). Returns (B, 1)."""
    if temperature > 0 and top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))  # out of the softmax below
    B = logits.shape[0]
    full = lambda v: torch.full((B,), v, device=logits.device)  # noqa: E731
    return sample_rows(logits, full(temperature), full(1.0 if top_p is None else top_p),
                       [generator] * B)[:, None]


def sample_rows(
    logits: Tensor, temperature: Tensor, top_p: Tensor,
    generators: list[torch.Generator | None],
) -> Tensor:
    """One token per row of logits (B, vocab), each row with its own temperature (B,) (<= 0:
    greedy), top-p (B,) and generator: one batched softmax, sort and cumulative sum for the whole
    batch, and one uniform number per row from that row's generator (the inverse of the CDF in
    vocabulary order), so a row draws the same token whatever rows share its batch. Returns (B,)
    token ids."""
    greedy = temperature <= 0
    best = logits.argmax(dim=-1)  # (B,)
    if bool(greedy.all()):
        return best
    probs = (logits / torch.where(greedy, 1.0, temperature)[:, None]).softmax(dim=-1)
    if not bool((top_p >= 1.0).all()):  # top-p: keep the smallest prefix of the sorted
        # vocabulary whose mass reaches top_p, in the vocabulary's own order (so a row's draw
        # never depends on whether another row needed the sort)
        ranked, order = probs.sort(dim=-1, descending=True, stable=True)
        keep = ((ranked.cumsum(dim=-1) - ranked) <= top_p[:, None]) | (top_p >= 1.0)[:, None]
        probs = probs * torch.empty_like(keep).scatter_(-1, order, keep)
    cum = probs.cumsum(dim=-1)  # (B, vocab), unnormalised
    u = torch.stack([torch.rand((), generator=g, device=logits.device) for g in generators])
    pick = torch.searchsorted(cum, (u * cum[:, -1])[:, None], right=True)
    pick = pick.clamp_(max=logits.shape[-1] - 1)  # (B, 1)
    return torch.where(greedy, best, pick.squeeze(-1))
