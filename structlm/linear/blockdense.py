"""BlockDense: a block-diagonal projection to rank R, then a dense R -> M map (docs/method.md §1.3).

    x (N) = [x_0 | x_1 | ... | x_{B-1}]          B contiguous chunks of p = N/B
             |      |            |
       blkdiag[0] blkdiag[1] ... blkdiag[B-1]    each (r, p), r = R/B
             |      |            |
    h (R) = [h_0 | h_1 | ... | h_{B-1}]          concatenated in block order (no shuffle)
             |
          up: (M, R)  dense
             |
           y (M)                                 y = up (blockdiag(blkdiag) x) + b

    params = MACs per token = R * N / B + M * R;  N % B == 0, R % B == 0, R <= min(N, M)

Init 'ortho' (default): every block and the dense `up` are replaced by their polar factor U V^T.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from structlm.linear.base import StructuredLinear
from structlm.linear.factors import dense_weights, polar_, rank_step, weighted_refine
from structlm.ops.blocks import block_diag_matmul


def blockdense_matmul_reference(x: Tensor, blkdiag: Tensor, up: Tensor) -> Tensor:
    """Materialise W = up @ blockdiag(blkdiag) and apply it.

    x: (..., N), blkdiag: (B, r, p) with N = B*p, up: (M, B*r) -> (..., M).
    """
    return x @ (up @ torch.block_diag(*blkdiag)).T


def blockdense_matmul(
    x: Tensor, blkdiag: Tensor, up: Tensor, bias: Tensor | None = None
) -> Tensor:
    """One row-layout block-diagonal product, then one dense matmul (+ bias, inside it): no
    transposes. Shapes as in the reference."""
    h = block_diag_matmul(x, blkdiag)  # (..., R), block order
    return F.linear(h, up, bias)  # (..., M)


class BlockDenseLinear(StructuredLinear):
    """y = up(blockdiag(x)) + b; blkdiag: (nblocks, rank/nblocks, d_in/nblocks), up: (d_out, rank).
    """

    kind = "blockdense"
    hparams = ("rank", "nblocks")
    post_inits = ("ortho",)
    default_init = "ortho"

    def __init__(
        self, d_in: int, d_out: int, *, rank: int, nblocks: int, bias: bool = True,
        init: str = "default", init_std: float = 0.02, device=None, dtype=None,
    ) -> None:
        self.check(d_in, d_out, rank=rank, nblocks=nblocks)
        self.check_init(init)
        super().__init__(d_in, d_out, bias=bias, device=device, dtype=dtype)
        self.rank, self.nblocks = rank, nblocks
        blk = (nblocks, rank // nblocks, d_in // nblocks)
        self.blkdiag = nn.Parameter(torch.empty(blk, device=device, dtype=dtype))
        self.up = nn.Parameter(torch.empty(d_out, rank, device=device, dtype=dtype))
        self.reset_parameters(init, init_std)

    def matmul(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        return blockdense_matmul(x, self.blkdiag, self.up, bias)

    @torch.no_grad()
    def to_dense(self) -> Tensor:
        return self.up @ torch.block_diag(*self.blkdiag)

    @classmethod
    def check(cls, d_in: int, d_out: int, **hp: int | None) -> None:
        super().check(d_in, d_out, **hp)
        rank, nb = hp["rank"], hp["nblocks"]
        if d_in % nb:
            raise ValueError(
                f"d_in={d_in} is not divisible by nblocks={nb}; choose nblocks dividing {d_in}"
            )
        if rank % nb:
            raise ValueError(
                f"rank={rank} is not divisible by nblocks={nb}; "
                f"choose a rank that is a multiple of {nb}"
            )
        if rank > min(d_in, d_out):
            raise ValueError(
                f"rank={rank} is larger than min(d_in, d_out)={min(d_in, d_out)} "
                f"for a {d_in}->{d_out} layer; choose rank <= {min(d_in, d_out)}"
            )

    @classmethod
    def weight_params(cls, d_in: int, d_out: int, *, rank: int, nblocks: int) -> int:
        return rank * d_in // nblocks + d_out * rank

    @classmethod
    def budget(cls, shapes: list[tuple[int, int]], fraction: float, **given: int) -> dict:
        """B given, else 4 for power-of-two widths and 2 otherwise (the paper's choice per size);
        R = f * sum(N*M) / sum(M + N/B), rounded down to a multiple of B and of the rank step
        (2d/3, d/3 at B=2; 0.75d, 0.375d at B=4), and capped at min(d_in, d_out) (a narrowing
        layer alone, e.g. 3072 -> 768 at 63%, would otherwise ask for more)."""
        d = min(x for s in shapes for x in s)
        nb = given.get("nblocks") or (4 if d & (d - 1) == 0 else 2)
        step = math.lcm(rank_step(shapes), nb)
        rank = int(fraction * dense_weights(shapes) / sum(m + n / nb for n, m in shapes))
        cap = d // nb * nb  # d: the smallest side of any shape
        return {"rank": max(min(rank // step * step, cap), nb), "nblocks": nb}

    def _post_init(self, init: str, std: float) -> None:
        polar_(self.blkdiag)
        polar_(self.up)

    @torch.no_grad()
    def project(self, w: Tensor, cov: Tensor | None = None) -> None:
        """W ~ up @ blockdiag(blkdiag) splits by input block: columns k of the product are
        up[:, block k] @ blkdiag[k], and those columns of `up` serve no other block. So each
        block's truncated SVD of W[:, block k] is the Frobenius optimum (Eckart-Young per block),
        exact when W has this structure. With `cov`, that optimum is refined by weighted
        alternating least squares (`weighted_refine`)."""
        nb, r, p = self.blkdiag.shape
        ups, blocks = [], []
        for k in range(nb):
            u, s, vh = torch.linalg.svd(w[:, k * p:(k + 1) * p], full_matrices=False)
            root = s[:r].sqrt()
            ups.append(u[:, :r] * root)  # (M, r)
            blocks.append(root[:, None] * vh[:r])  # (r, p)
        up, blkdiag = torch.cat(ups, dim=1), torch.stack(blocks)
        if cov is not None:
            everything = [(torch.arange(self.d_out), torch.arange(self.rank))]  # `up` is dense
            up, blkdiag = weighted_refine(w, cov, up, everything, blkdiag)
        self.up.copy_(up)
        self.blkdiag.copy_(blkdiag)
