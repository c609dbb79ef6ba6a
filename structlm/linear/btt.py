"""BTT: the two-core block tensor-train of Qiu et al. (Compute Better Spent, ICML 2024), with
rank r between the cores; BlockShuffle (Monarch) is the case where each block pair's rank is fixed
by the shape. With B blocks on both sides, d_in = B * n, d_out = B * m:

    W[i1*m + i2, j2*n + j1] = sum over a < r of core2[i1][i2, j2*r + a] * core1[j2][i1*r + a, j1]

    x (B*n): B chunks of n ─ core1[j2]: (B*r, n) ─► h (B*B*r), flat j2*(B*r) + i1*r + a
    regroup by output block: z[i1] = [h[j2, i1, :] for j2] (B*r), one copy of h
    z[i1] ─ core2[i1]: (m, B*r) ─► y[i1*m : (i1+1)*m]
    params = MACs per token = r * B * (d_in + d_out); r <= min(d_in, d_out)

Every (output block i1, input block j2) sub-matrix of W is the rank-r product of its own slice of
core2[i1] and of core1[j2], so the truncated SVD of each sub-matrix is the Frobenius-optimal
projection. Init 'ortho' (default): every block of both cores is replaced by its polar factor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from structlm.linear.base import StructuredLinear
from structlm.linear.factors import check_blocks_divide, dense_weights, polar_, weighted_refine
from structlm.ops.blocks import block_diag_matmul


def btt_matmul_reference(x: Tensor, core1: Tensor, core2: Tensor) -> Tensor:
    """The formula above with einsums. x: (..., B*n), core1: (B, B*r, n), core2: (B, m, B*r)
    -> (..., B*m)."""
    nb, br, n = core1.shape
    r, m = br // nb, core2.shape[1]
    lead = x.shape[:-1]
    xb = x.reshape(-1, nb, n)  # (T, B, n): chunk j2
    h = torch.einsum("tjn,jan->tja", xb, core1).view(-1, nb, nb, r)  # (T, j2, i1, a)
    y = torch.einsum("tjia,imja->tim", h, core2.view(nb, m, nb, r))  # (T, i1, m)
    return y.reshape(*lead, nb * m)


def btt_matmul(x: Tensor, core1: Tensor, core2: Tensor, bias: Tensor | None = None) -> Tensor:
    """Two row-layout block products and the regrouping as one copy; bias in the second."""
    nb, br, n = core1.shape
    r, m = br // nb, core2.shape[1]
    lead = x.shape[:-1]
    h = block_diag_matmul(x.reshape(-1, nb * n), core1)  # (T, B*B*r): j2, i1, a
    z = h.view(-1, nb, nb, r).transpose(1, 2).reshape(-1, nb * nb * r)  # (T, i1, j2, a)
    y = block_diag_matmul(z, core2, bias)  # (T, B*m): i1*m + i2
    return y.view(*lead, nb * m)


class BTTLinear(StructuredLinear):
    """Block tensor-train with two cores: core1 (nblocks, nblocks*rank, d_in/nblocks),
    core2 (nblocks, d_out/nblocks, nblocks*rank)."""

    kind = "btt"
    hparams = ("rank", "nblocks")
    post_inits = ("ortho",)
    default_init = "ortho"
    bench_fractions = (0.32, 0.63)

    def __init__(
        self, d_in: int, d_out: int, *, rank: int, nblocks: int, bias: bool = True,
        init: str = "default", init_std: float = 0.02, device=None, dtype=None,
    ) -> None:
        self.check(d_in, d_out, rank=rank, nblocks=nblocks)
        self.check_init(init)
        super().__init__(d_in, d_out, bias=bias, device=device, dtype=dtype)
        self.rank, self.nblocks = rank, nblocks
        b = nblocks
        self.core1 = nn.Parameter(torch.empty(b, b * rank, d_in // b, device=device, dtype=dtype))
        self.core2 = nn.Parameter(torch.empty(b, d_out // b, b * rank, device=device, dtype=dtype))
        self.reset_parameters(init, init_std)

    def matmul(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        return btt_matmul(x, self.core1, self.core2, bias)

    @classmethod
    def check(cls, d_in: int, d_out: int, **hp: int | None) -> None:
        super().check(d_in, d_out, **hp)
        rank, nb = hp["rank"], hp["nblocks"]
        check_blocks_divide(d_in, d_out, nb)
        if rank > min(d_in, d_out):
            raise ValueError(f"rank={rank} is larger than min(d_in, d_out)={min(d_in, d_out)}; "
                             f"choose rank <= {min(d_in, d_out)} (at most {min(d_in, d_out) // nb}"
                             " adds anything)")

    @classmethod
    def weight_params(cls, d_in: int, d_out: int, *, rank: int, nblocks: int) -> int:
        return rank * nblocks * (d_in + d_out)

    @classmethod
    def budget(cls, shapes: list[tuple[int, int]], fraction: float, **given: int) -> dict:
        """B given, else the common divisor of every dimension nearest sqrt(smallest dimension)
        (cores of about equal size, as in Compute Better Spent); r = f * sum(N*M) /
        (B * sum(N + M)), rounded down, at least 1."""
        dims = [d for s in shapes for d in s]
        nb = given.get("nblocks")
        if nb is None:
            valid = [b for b in range(1, min(dims) + 1) if all(d % b == 0 for d in dims)]
            nb = min(valid, key=lambda b: (abs(math.log(b / math.sqrt(min(dims)))), b))
        rank = int(fraction * dense_weights(shapes) / (nb * sum(n + m for n, m in shapes)))
        return {"rank": max(rank, 1), "nblocks": nb}

    def _post_init(self, init: str, std: float) -> None:
        polar_(self.core1)
        polar_(self.core2)

    @torch.no_grad()
    def project(self, w: Tensor, cov: Tensor | None = None) -> None:
        """The truncated SVD of every (output block, input block) sub-matrix, placed in its core
        slices (the Frobenius optimum); with `cov`, refined by weighted alternating least squares
        on W^ = A @ blockdiag(core1), core2 folded into A's sparsity."""
        nb, r = self.nblocks, self.rank
        n, m = self.d_in // nb, self.d_out // nb
        c1 = torch.zeros(self.core1.shape, dtype=w.dtype, device=w.device)
        c2 = torch.zeros(self.core2.shape, dtype=w.dtype, device=w.device)
        for i1 in range(nb):
            for j2 in range(nb):
                u, s, vh = torch.linalg.svd(w[i1 * m:(i1 + 1) * m, j2 * n:(j2 + 1) * n],
                                            full_matrices=False)
                k = min(r, len(s))
                root = s[:k].sqrt()
                c2[i1][:, j2 * r:j2 * r + k] = u[:, :k] * root
                c1[j2][i1 * r:i1 * r + k] = root[:, None] * vh[:k]
        if cov is not None:
            c1, c2 = self._weighted(w, cov, c1, c2)
        self.core1.copy_(c1)
        self.core2.copy_(c2)

    def _weighted(self, w: Tensor, cov: Tensor, c1: Tensor, c2: Tensor) -> tuple[Tensor, Tensor]:
        nb, r, m = self.nblocks, self.rank, self.d_out // self.nblocks
        # intermediate index of (j2, i1, a): j2*(B*r) + i1*r + a; output block i1 reads all j2
        cols = [torch.tensor([j2 * nb * r + i1 * r + a for j2 in range(nb) for a in range(r)])
                for i1 in range(nb)]
        groups = [(torch.arange(i1 * m, (i1 + 1) * m), cols[i1]) for i1 in range(nb)]
        a = torch.zeros(self.d_out, nb * nb * r, dtype=w.dtype, device=w.device)
        for i1, (rows, cs) in enumerate(groups):
            a[rows[:, None], cs] = c2[i1]
        a, c1 = weighted_refine(w, cov, a, groups, c1)
        return c1, torch.stack([a[rows[:, None], cs] for rows, cs in groups])
