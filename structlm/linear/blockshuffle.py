"""BlockShuffle = Monarch (Dao et al. 2022) with two block-diagonal factors and a fixed stride
permutation (docs/method.md §1.4; the channel ordering is bit-exact with the paper's reference
code).

    W x = P_out  blockdiag(blkdiag2)  P_mid  blockdiag(blkdiag1)  x

    x (N): B chunks of p ─ blkdiag1[k]: (q, p) ─► h = [h_0 | ... | h_{B-1}]      flat index k*q + t
    shuffle P_mid:  z_j[i] = h[i*B + j]          view h as (q, B), transpose to (B, q)
    z_j (q)        ─ blkdiag2[j]: (s, q) ─► u_j (s)
    un-shuffle P_out: y[i*B + j] = u_j[i]        stack u as (B, s), transpose to (s, B), flatten

    p = N/B, o = M/B, s = o, q = min(p, o): the block on the smaller side is square
    (expanding fc1: blkdiag1 (B, p, p), blkdiag2 (B, o, p);
     contracting fc2: blkdiag1 (B, o, p), blkdiag2 (B, o, o)).

    params = MACs per token = min(N, M) * (N + M) / B;  N % B == 0, M % B == 0

Init 'ortho' (default): every block of both factors is replaced by its polar factor U V^T.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from structlm.linear.base import StructuredLinear
from structlm.linear.factors import check_blocks_divide, dense_weights, polar_, weighted_refine
from structlm.ops.blocks import block_diag_matmul, cast_operands, transpose_within_rows, use_triton
from structlm.ops.triton_block import blockshuffle_matmul_triton


def shuffle_indices(nblocks: int, q: int) -> Tensor:
    """idx with z_flat = h[..., idx]: position j*q + i of z takes h[i*B + j] (P_mid)."""
    return torch.arange(q * nblocks).view(q, nblocks).T.reshape(-1)


def unshuffle_indices(nblocks: int, s: int) -> Tensor:
    """idx with y = u_flat[..., idx]: position i*B + j of y takes u[j*s + i] (P_out)."""
    return torch.arange(s * nblocks).view(nblocks, s).T.reshape(-1)


def blockshuffle_matmul_reference(x: Tensor, blkdiag1: Tensor, blkdiag2: Tensor) -> Tensor:
    """The four steps of docs/method.md §1.4 literally, with explicit gathers.

    x: (..., N), blkdiag1: (B, q, p) with N = B*p, blkdiag2: (B, s, q) -> (..., B*s).
    """
    nb, q, p = blkdiag1.shape
    s = blkdiag2.shape[1]
    lead = x.shape[:-1]
    xb = x.reshape(-1, nb, p)  # (T, B, p)
    h = torch.einsum("tkp,kqp->tkq", xb, blkdiag1).reshape(-1, nb * q)  # (T, B*q), flat k*q + t
    z = h[:, shuffle_indices(nb, q).to(x.device)].view(-1, nb, q)  # (T, B, q), z_j[i] = h[i*B + j]
    u = torch.einsum("tjq,jsq->tjs", z, blkdiag2).reshape(-1, nb * s)  # (T, B*s), flat j*s + i
    y = u[:, unshuffle_indices(nb, s).to(x.device)]  # y[i*B + j] = u_j[i]
    return y.view(*lead, nb * s)


def blockshuffle_matmul(
    x: Tensor, blkdiag1: Tensor, blkdiag2: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Two row-layout block products (`block_diag_matmul`: no transposes around the GEMMs) and
    the two shuffles as one copy each, within every row; the bias rides in the second product.
    Shapes as in the reference."""
    nb, q, p = blkdiag1.shape
    s = blkdiag2.shape[1]
    lead = x.shape[:-1]
    if use_triton(x, blkdiag1, blkdiag2, bias):  # the shuffles folded into the kernels' addressing
        y = blockshuffle_matmul_triton(*cast_operands(x.reshape(-1, nb * p), blkdiag1, blkdiag2,
                                                      bias))
        return y.view(*lead, nb * s)
    h = block_diag_matmul(x.reshape(-1, nb * p), blkdiag1)  # (T, B*q), flat k*q + i
    z = transpose_within_rows(h, q, nb)  # (T, B*q): z_j[i] = h[i*B + j]
    b = None if bias is None else bias.view(s, nb).t().reshape(-1)  # u's order: b_j[i] = b[i*B+j]
    u = block_diag_matmul(z, blkdiag2, b)  # (T, B*s), flat j*s + i
    y = transpose_within_rows(u, nb, s)  # (T, s*B): y[i*B + j] = u_j[i]
    return y.view(*lead, nb * s)


class BlockShuffleLinear(StructuredLinear):
    """= Monarch (Dao et al. 2022) with two block-diagonal factors and a fixed stride permutation.

    blkdiag1: (nblocks, q, d_in/nblocks), blkdiag2: (nblocks, d_out/nblocks, q),
    q = min(d_in, d_out)/nblocks.
    """

    kind = "blockshuffle"
    hparams = ("nblocks",)
    post_inits = ("ortho",)
    default_init = "ortho"
    bench_fractions = (0.32, 0.63)  # B = 4 and B = 2 at the paper's widths

    def __init__(
        self, d_in: int, d_out: int, *, nblocks: int, bias: bool = True, init: str = "default",
        init_std: float = 0.02, device=None, dtype=None,
    ) -> None:
        self.check(d_in, d_out, nblocks=nblocks)
        self.check_init(init)
        super().__init__(d_in, d_out, bias=bias, device=device, dtype=dtype)
        self.nblocks = nblocks
        p, o = d_in // nblocks, d_out // nblocks
        q = min(p, o)
        self.blkdiag1 = nn.Parameter(torch.empty(nblocks, q, p, device=device, dtype=dtype))
        self.blkdiag2 = nn.Parameter(torch.empty(nblocks, o, q, device=device, dtype=dtype))
        self.reset_parameters(init, init_std)

    def matmul(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        return blockshuffle_matmul(x, self.blkdiag1, self.blkdiag2, bias)

    @classmethod
    def check(cls, d_in: int, d_out: int, **hp: int | None) -> None:
        super().check(d_in, d_out, **hp)
        check_blocks_divide(d_in, d_out, hp["nblocks"])

    @classmethod
    def weight_params(cls, d_in: int, d_out: int, *, nblocks: int) -> int:
        return min(d_in, d_out) * (d_in + d_out) // nblocks

    @classmethod
    def budget(cls, shapes: list[tuple[int, int]], fraction: float, **given: int) -> dict:
        """B = sum(min(N,M)(N+M)) / (f * sum(N*M)), the nearest block count dividing every
        dimension (2 and 4 for the paper's 63% and 32%)."""
        ideal = sum(min(n, m) * (n + m) for n, m in shapes) / (fraction * dense_weights(shapes))
        dims = [d for s in shapes for d in s]
        valid = [b for b in range(1, min(dims) + 1) if all(d % b == 0 for d in dims)]
        return {"nblocks": min(valid, key=lambda b: (abs(math.log(b / ideal)), b))}

    @torch.no_grad()
    def paper_guide_init(self) -> Tensor:
        """The reference code's guide: the product of the two block-diagonals WITHOUT the shuffle
        permutations (docs/method.md §4.3), which is not the layer's map."""
        return torch.block_diag(*self.blkdiag2) @ torch.block_diag(*self.blkdiag1)  # (M, N)

    def _post_init(self, init: str, std: float) -> None:
        polar_(self.blkdiag1)
        polar_(self.blkdiag2)

    @torch.no_grad()
    def project(self, w: Tensor, cov: Tensor | None = None) -> None:
        """W[i*B + j, k*p + c] = sum over t' of blkdiag2[j][i, t'] blkdiag1[k][t, c] with
        t'*B + j = k*q + t: each (output block j, input block k) sub-matrix is a rank-|T_jk|
        product of columns and rows no other pair uses, so its truncated SVD is the Frobenius
        optimum (any shape, square or not). With `cov`, that optimum is refined by weighted
        alternating least squares (`weighted_refine`)."""
        nb, q, p = self.blkdiag1.shape
        b1 = torch.zeros(self.blkdiag1.shape, dtype=w.dtype, device=w.device)
        b2 = torch.zeros(self.blkdiag2.shape, dtype=w.dtype, device=w.device)
        for j in range(nb):
            rows = w[j::nb]  # (s, N): the outputs i*B + j
            for k in range(nb):
                t2 = [t for t in range(q) if (t * nb + j) // q == k]
                if not t2:
                    continue
                t1 = [(t * nb + j) % q for t in t2]
                u, sv, vh = torch.linalg.svd(rows[:, k * p:(k + 1) * p], full_matrices=False)
                root = sv[:len(t2)].sqrt()
                b2[j][:, t2] = u[:, :len(t2)] * root
                b1[k][t1, :] = root[:, None] * vh[:len(t2)]
        if cov is not None:
            b1, b2 = self._weighted(w, cov, b1, b2)
        self.blkdiag1.copy_(b1)
        self.blkdiag2.copy_(b2)

    def _weighted(self, w: Tensor, cov: Tensor, b1: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
        """The projection as W^ = A @ blockdiag(b1), A[i*B + j, t*B + j] = b2[j][i, t] (the
        shuffle folded into A's sparsity: output block j reads intermediates j, j+B, ...),
        refined in the weighted norm and unfolded again."""
        nb, o, q = b2.shape
        a = torch.zeros(self.d_out, nb * q, dtype=w.dtype, device=w.device)
        groups = [(torch.arange(j, self.d_out, nb), torch.arange(j, nb * q, nb))
                  for j in range(nb)]
        for j, (rows, cols) in enumerate(groups):
            a[rows[:, None], cols] = b2[j]
        a, b1 = weighted_refine(w, cov, a, groups, b1)
        return b1, torch.stack([a[rows[:, None], cols] for rows, cols in groups])
