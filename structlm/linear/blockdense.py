"""BlockDense: a block-diagonal projection to rank R, then a dense R -> M map (SPEC §1.3).

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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from structlm.linear.base import StructuredLinear, block_diag_matmul, polar_, register


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


@register("blockdense")
class BlockDenseLinear(StructuredLinear):
    """y = up(blockdiag(x)) + b; blkdiag: (nblocks, rank/nblocks, d_in/nblocks), up: (d_out, rank).
    """

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

    fuses_bias = True

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

    def _post_init(self, init: str, std: float) -> None:
        polar_(self.blkdiag)
        polar_(self.up)
