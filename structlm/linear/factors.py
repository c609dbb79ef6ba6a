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


def check_blocks_divide(d_in: int, d_out: int, nblocks: int) -> None:
    """Both sides of a layer cut into `nblocks` equal blocks, or ValueError naming the fix."""
    for name, d in (("d_in", d_in), ("d_out", d_out)):
        if d % nblocks:
            raise ValueError(
                f"{name}={d} is not divisible by nblocks={nblocks}; choose nblocks dividing both "
                f"d_in={d_in} and d_out={d_out}"
            )


def dense_weights(shapes: list[tuple[int, int]]) -> int:
    """Weight parameters of dense layers of these (d_in, d_out) shapes together."""
    return sum(n * m for n, m in shapes)


def weighted_sq_error(w: Tensor, approx: Tensor, cov: Tensor) -> Tensor:
    """tr((W - W^) C (W - W^)^T) = ||(W - W^) X||^2 / n for the input covariance C = X X^T / n."""
    d = w - approx
    return torch.einsum("oi,ij,oj->", d, cov, d)


def damped(cov: Tensor, ridge: float = 1e-9) -> Tensor:
    """C + ridge * mean(diag C) * I. Fewer calibration tokens than inputs leave C singular, and
    the pure weighted optimum then sets the unseen input directions arbitrarily (worse than the
    plain projection on new text); the ridge pulls those towards the Frobenius optimum."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    return cov + ridge * cov.diagonal().mean() * eye


@torch.no_grad()
def weighted_refine(
    w: Tensor, cov: Tensor, a: Tensor, groups: list[tuple[Tensor, Tensor]], blocks: Tensor,
    sweeps: int = 12, tol: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """Alternating least squares for W ~ A @ blockdiag(blocks) in the activation-weighted norm
    ||(W - W^) X|| (docs/method.md §9): A (d_out, r) may use, for the output rows `groups[g][0]`,
    only the columns `groups[g][1]`; `blocks` (K, r/K, d_in/K) is the input-side block-diagonal.

    Each half-step is an exact minimisation: A row group by row group (weighted least squares,
    rows do not interact), then each input block in turn (block coordinate descent: blocks are
    coupled only through C). So the error never increases from the starting factors (the plain
    projection); the best iterate is returned. float64 in, float64 out."""
    cov = damped(cov)
    a, blocks = a.clone(), blocks.clone()
    best = (weighted_sq_error(w, a @ torch.block_diag(*blocks), cov), a.clone(), blocks.clone())
    for _ in range(sweeps):
        bd = torch.block_diag(*blocks)  # (r, d_in)
        for rows, cols in groups:  # A[rows][:, cols] = W[rows] C Bs^T (Bs C Bs^T)^+
            bs = bd[cols]
            a[rows[:, None], cols] = w[rows] @ cov @ bs.T @ torch.linalg.pinv(
                bs @ cov @ bs.T, hermitian=True)
        _refine_blocks(w, cov, a, blocks)
        err = weighted_sq_error(w, a @ torch.block_diag(*blocks), cov)
        done = err > best[0] * (1 - tol)
        if err < best[0]:
            best = (err, a.clone(), blocks.clone())
        if done:
            break
    return best[1], best[2]


def _refine_blocks(w: Tensor, cov: Tensor, a: Tensor, blocks: Tensor) -> None:
    """One block-coordinate pass over the input blocks, in place: block k moves by
    (A_k^T A_k)^+ A_k^T E C[:, k] C_kk^+, the exact minimiser with the others fixed."""
    k_n, r, p = blocks.shape
    e = w - a @ torch.block_diag(*blocks)  # (d_out, d_in), kept current
    for k in range(k_n):
        ak = a[:, k * r:(k + 1) * r]  # (d_out, r)
        cols = slice(k * p, (k + 1) * p)
        rhs = ak.T @ (e @ cov[:, cols])  # (r, p)
        delta = torch.linalg.pinv(ak.T @ ak, hermitian=True) @ rhs @ torch.linalg.pinv(
            cov[cols, cols], hermitian=True)
        blocks[k] += delta
        e[:, cols] -= ak @ delta
