"""Small pieces of factor math the kinds share: the polar (orthogonal) init and rank rounding."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def polar_(w: Tensor) -> None:
    """Replace each matrix in `w` (..., m, n) by its polar factor U V^T (all singular values 1), in
    place."""
    wide = w.to(torch.promote_types(w.dtype, torch.float32))  # fp32 at least; fp64 stays fp64
    u, _, vh = torch.linalg.svd(wide, full_matrices=False)
    w.copy_(u @ vh)


def rank_step(shapes: list[tuple[int, int]]) -> int:
    """The step ranks are rounded down to by the budget rules: the power of two nearest below
    min(dim)/16 (32 at 768, 64 at 1024, 128 at 2048), as the paper's ranks are."""
    smallest = min(d for s in shapes for d in s)
    return 2 ** max(0, int(math.floor(math.log2(max(1, smallest // 16)))))


def dense_weights(shapes: list[tuple[int, int]]) -> int:
    """Weight parameters of dense layers of these (d_in, d_out) shapes together."""
    return sum(n * m for n, m in shapes)
