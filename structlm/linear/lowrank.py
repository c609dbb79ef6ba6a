"""LowRank: `W ~= U V` with a bottleneck of size R (docs/method.md §1.2).

      x (N) --down V: (R, N)--> h (R) --up U: (M, R)--> y (M)

        N            R             M
    +-------+     +-----+      +-------+
    |   x   | --> |  h  |  --> |   y   |      y = U (V x) + b
    +-------+     +-----+      +-------+

    params = MACs per token = R * (N + M);  R <= min(N, M)

Init 'svd' (the paper's spectral init, default): the best rank-R approximation of a dense
N(0, std^2) draw, split as sqrt(S) into both factors: down = sqrt(S_R) Vh_R, up = U_R sqrt(S_R).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from structlm.linear.base import StructuredLinear
from structlm.linear.factors import damped, dense_weights, rank_step


def lowrank_matmul_reference(x: Tensor, down: Tensor, up: Tensor) -> Tensor:
    """Materialise W = up @ down and apply it. x: (..., N), down: (R, N), up: (M, R) -> (..., M)."""
    return x @ (up @ down).T


def lowrank_matmul(x: Tensor, down: Tensor, up: Tensor, bias: Tensor | None = None) -> Tensor:
    """Two thin matmuls, never forming W: (x V^T) U^T (+ bias, inside the second)."""
    return F.linear(F.linear(x, down), up, bias)  # (..., R) -> (..., M)


class LowRankLinear(StructuredLinear):
    """y = up(down(x)) + b, down: (rank, d_in), up: (d_out, rank)."""

    kind = "lowrank"
    hparams = ("rank",)
    post_inits = ("svd",)
    default_init = "svd"

    def __init__(
        self, d_in: int, d_out: int, *, rank: int, bias: bool = True, init: str = "default",
        init_std: float = 0.02, device=None, dtype=None,
    ) -> None:
        self.check(d_in, d_out, rank=rank)
        self.check_init(init)
        super().__init__(d_in, d_out, bias=bias, device=device, dtype=dtype)
        self.rank = rank
        self.down = nn.Parameter(torch.empty(rank, d_in, device=device, dtype=dtype))
        self.up = nn.Parameter(torch.empty(d_out, rank, device=device, dtype=dtype))
        self.reset_parameters(init, init_std)

    def matmul(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        return lowrank_matmul(x, self.down, self.up, bias)

    @torch.no_grad()
    def to_dense(self) -> Tensor:
        return self.up @ self.down

    @classmethod
    def check(cls, d_in: int, d_out: int, **hp: int | None) -> None:
        super().check(d_in, d_out, **hp)
        rank = hp["rank"]
        if rank > min(d_in, d_out):
            raise ValueError(
                f"rank={rank} is larger than min(d_in, d_out)={min(d_in, d_out)} "
                f"for a {d_in}->{d_out} layer; choose rank <= {min(d_in, d_out)} "
                "(structlm.linear.choose_hparams finds the paper's rank for a parameter budget)"
            )

    @classmethod
    def weight_params(cls, d_in: int, d_out: int, *, rank: int) -> int:
        return rank * (d_in + d_out)

    @classmethod
    def budget(cls, shapes: list[tuple[int, int]], fraction: float, **given: int) -> dict:
        """R = f * sum(N*M) / sum(N+M), rounded down to the rank step (d/2 and d/4 for the
        paper's 63% and 32% FFNs)."""
        g = rank_step(shapes)
        rank = int(fraction * dense_weights(shapes) / sum(n + m for n, m in shapes)) // g * g
        return {"rank": max(rank, 1)}

    def _post_init(self, init: str, std: float) -> None:
        w0 = torch.randn(self.d_out, self.d_in, device=self.down.device, dtype=torch.float32) * std
        u, s, vh = torch.linalg.svd(w0, full_matrices=False)  # u: (M, k), s: (k,), vh: (k, N)
        root = s[: self.rank].sqrt()
        self.down.copy_(root[:, None] * vh[: self.rank])  # (R, N)
        self.up.copy_(u[:, : self.rank] * root[None, :])  # (M, R)

    @torch.no_grad()
    def project(self, w: Tensor, cov: Tensor | None = None) -> None:
        """Truncated SVD, sqrt(S) in both factors (Eckart-Young: the Frobenius optimum). With the
        input covariance C = L L^T, the SVD of W L instead: the optimum of ||(W - W^) X||."""
        r = self.rank
        chol = None
        if cov is not None:
            chol = torch.linalg.cholesky(damped(cov, ridge=1e-6))  # keeps L invertible
        u, s, vh = torch.linalg.svd(w if chol is None else w @ chol, full_matrices=False)
        root = s[:r].sqrt()
        down = root[:, None] * vh[:r]  # (R, N)
        if chol is not None:  # down L = (sqrt(S) Vh)_R: back to the unweighted input space
            down = torch.linalg.solve_triangular(chol, down, upper=False, left=False)
        self.down.copy_(down)
        self.up.copy_(u[:, :r] * root[None, :])
