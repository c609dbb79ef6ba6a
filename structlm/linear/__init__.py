"""Structured linear maps for FFN layers: the registry, the factory and budget-driven
hyper-parameters.

    LINEARS = {"dense": DenseLinear, "lowrank": LowRankLinear,
               "blockshuffle": BlockShuffleLinear, "blockdense": BlockDenseLinear}

`build_linear(spec, d_in, d_out, bias=...)` is the only place a `LinearSpec` becomes constructor
kwargs.
"""

from __future__ import annotations

import math

from structlm.config import LinearSpec
from structlm.linear.base import LINEARS, StructuredLinear, register
from structlm.linear.blockdense import (
    BlockDenseLinear,
    blockdense_matmul,
    blockdense_matmul_reference,
)
from structlm.linear.blockshuffle import (
    BlockShuffleLinear,
    blockshuffle_matmul,
    blockshuffle_matmul_reference,
)
from structlm.linear.dense import DenseLinear
from structlm.linear.guided import (
    GuidedLinear,
    PreMergedLinear,
    merge_linears,
    premerge,
    unmerge,
    unwrap_guided,
    wrap_guided,
)
from structlm.linear.lowrank import LowRankLinear, lowrank_matmul, lowrank_matmul_reference

__all__ = [
    "LINEARS", "StructuredLinear", "register", "build_linear", "check_spec", "choose_hparams",
    "GuidedLinear", "PreMergedLinear", "merge_linears", "premerge", "unmerge", "wrap_guided",
    "unwrap_guided", "DenseLinear", "LowRankLinear", "BlockShuffleLinear", "BlockDenseLinear",
    "lowrank_matmul", "lowrank_matmul_reference",
    "blockdense_matmul", "blockdense_matmul_reference",
    "blockshuffle_matmul", "blockshuffle_matmul_reference",
]


def linear_class(kind: str) -> type[StructuredLinear]:
    if kind not in LINEARS:
        raise ValueError(
            f"unknown structured linear kind {kind!r}; choose one of {sorted(LINEARS)}"
        )
    return LINEARS[kind]


def check_spec(spec: LinearSpec, d_in: int, d_out: int) -> None:
    """Raise ValueError (field and fix named) unless `spec` builds a valid d_in -> d_out layer."""
    cls = linear_class(spec.kind)
    cls.check(d_in, d_out, rank=spec.rank, nblocks=spec.nblocks)
    cls.check_init(spec.init)


def build_linear(
    spec: LinearSpec, d_in: int, d_out: int, *, bias: bool = True, init_std: float = 0.02,
    device=None, dtype=None,
) -> StructuredLinear:
    """A freshly initialised layer of kind `spec.kind` mapping d_in -> d_out."""
    check_spec(spec, d_in, d_out)
    cls = LINEARS[spec.kind]
    return cls(
        d_in, d_out, bias=bias, init=spec.init, init_std=init_std, device=device, dtype=dtype,
        **spec.hparams(),
    )


def _granularity(dims: list[int]) -> int:
    """Rank rounding step: the power of two nearest below min(dim)/16 (32 at 768, 64 at 1024,
    128 at 2048)."""
    return 2 ** max(0, int(math.floor(math.log2(max(1, min(dims) // 16)))))


def choose_hparams(
    kind: str, shapes: list[tuple[int, int]], fraction: float, nblocks: int | None = None
) -> LinearSpec:
    """The LinearSpec the paper would use for layers `shapes` [(d_in, d_out), ...] at `fraction` of
    their dense parameters (SPEC §1.5, §2.1). The budget counts all shapes together, as the paper
    counts a whole FFN.

    LowRank: R = f * sum(N*M) / sum(N+M), rounded down to the rank granularity (d/2 and d/4 for
    63%/32% FFNs).
    BlockDense: B given, else 4 for power-of-two widths and 2 otherwise (the paper's choice per
    size); R = f * sum(N*M) / sum(M + N/B), rounded down (2d/3, d/3 at B=2; 0.75d, 0.375d at B=4).
    BlockShuffle: B = sum(min(N,M)(N+M)) / (f * sum(N*M)), the nearest valid block count (2 and 4).

    >>> choose_hparams("lowrank", [(768, 3072), (3072, 768)], 0.63)
    LinearSpec(kind='lowrank', rank=384, nblocks=None, init='default')
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must be in (0, 1]")
    if not shapes:
        raise ValueError("shapes must name at least one (d_in, d_out) layer")
    dense = sum(n * m for n, m in shapes)
    dims = [d for s in shapes for d in s]
    g = _granularity(dims)
    if kind == "dense":
        return LinearSpec("dense")
    if kind == "lowrank":
        rank = int(fraction * dense / sum(n + m for n, m in shapes)) // g * g
        spec = LinearSpec("lowrank", rank=max(rank, 1))
    elif kind == "blockdense":
        d = min(dims)
        nb = nblocks or (4 if d & (d - 1) == 0 else 2)
        step = math.lcm(g, nb)
        rank = int(fraction * dense / sum(m + n / nb for n, m in shapes)) // step * step
        spec = LinearSpec("blockdense", rank=max(rank, nb), nblocks=nb)
    elif kind == "blockshuffle":
        ideal = sum(min(n, m) * (n + m) for n, m in shapes) / (fraction * dense)
        valid = [b for b in range(1, min(dims) + 1) if all(d % b == 0 for d in dims)]
        nb = min(valid, key=lambda b: (abs(math.log(b / ideal)), b))
        spec = LinearSpec("blockshuffle", nblocks=nb)
    else:
        linear_class(kind)
        raise ValueError(
            f"choose_hparams has no budget rule for kind {kind!r}; set its hyper-parameters"
        )
    for n, m in shapes:
        check_spec(spec, n, m)
    return spec
