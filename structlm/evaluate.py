"""Validation loss and perplexity over batches of (x, y) token windows."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from structlm.utils import autocast


@torch.no_grad()
def evaluate_sums(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
    dtype: torch.dtype | None = None, progress: bool = False, total: int | None = None,
) -> tuple[float, int]:
    """(sum of token losses, number of tokens) over `batches`; the model is put in eval mode and
    back."""
    was_training = model.training
    model.eval()
    loss_sum, n = 0.0, 0
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, total=total, desc="eval", unit="batch", leave=False)
    for x, y in it:
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            _, loss = model(x, y)
        loss_sum += loss.item() * y.numel()  # .item() syncs; eval is not the hot path
        n += y.numel()
    model.train(was_training)
    return loss_sum, n


def evaluate(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
    dtype: torch.dtype | None = None, progress: bool = False, total: int | None = None,
) -> dict[str, float]:
    """{"loss": mean token cross-entropy, "ppl": exp(loss), "tokens": n} over `batches`."""
    s, n = evaluate_sums(model, batches, device, dtype, progress, total)
    if n == 0:
        raise ValueError("evaluation got no tokens; the split is shorter than one sequence")
    loss = s / n
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": n}
