"""Dense baseline: the plain `W: (d_out, d_in)` matrix behind the same interface as the structured
kinds.

    params = MACs per token = d_in * d_out                                  (docs/method.md §1.1)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from structlm.linear.base import StructuredLinear


def dense_matmul_reference(x: Tensor, weight: Tensor) -> Tensor:
    """x: (..., d_in), weight: (d_out, d_in) -> (..., d_out)."""
    return x @ weight.T


def dense_matmul(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return F.linear(x, weight, bias)


class DenseLinear(StructuredLinear):
    """nn.Linear with the StructuredLinear interface (fixed N(0, 0.02^2) init, bias 0)."""

    kind = "dense"

    def __init__(
        self, d_in: int, d_out: int, *, bias: bool = True, init: str = "default",
        init_std: float = 0.02, device=None, dtype=None,
    ) -> None:
        self.check(d_in, d_out)
        self.check_init(init)
        super().__init__(d_in, d_out, bias=bias, device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(d_out, d_in, device=device, dtype=dtype))
        self.reset_parameters(init, init_std)

    def matmul(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        return dense_matmul(x, self.weight, bias)

    @torch.no_grad()
    def to_dense(self) -> Tensor:
        return self.weight.detach().clone()

    @classmethod
    def weight_params(cls, d_in: int, d_out: int) -> int:
        return d_in * d_out

    @torch.no_grad()
    def project(self, w: Tensor, cov: Tensor | None = None) -> None:
        self.weight.copy_(w)

    @classmethod
    def budget(cls, shapes: list[tuple[int, int]], fraction: float, **given: int) -> dict:
        return {}  # no hyper-parameters: the dense map is the 100% every fraction refers to
