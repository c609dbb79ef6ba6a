"""Hypothesis strategies shared by the structured-linear tests: valid (d_in, d_out, hparams) for
any kind.

The strategy knows only the hyper-parameter *names* (`rank`, `nblocks`); each kind's own `check`
decides validity, so a newly registered kind is covered as long as it takes those hyper-parameters.
"""

import sys

import torch
from hypothesis import reject
from hypothesis import strategies as st

from structlm.linear import LINEARS

KNOWN_HPARAMS = {"rank", "nblocks"}


@st.composite
def layer_shapes(draw, kind: str, max_blocks: int = 4, max_blk: int = 6):
    """(d_in, d_out, hp) with d_in = B*a, d_out = B*b, rank = B*c (c <= min(a, b)).

    a and b are drawn independently, so expanding, contracting and square layers all occur."""
    cls = LINEARS[kind]
    unknown = set(cls.hparams) - KNOWN_HPARAMS
    assert not unknown, f"teach tests/linear_cases.py to draw {sorted(unknown)} for kind {kind!r}"
    nb = draw(st.integers(1, max_blocks)) if "nblocks" in cls.hparams else 1
    a, b = draw(st.integers(1, max_blk)), draw(st.integers(1, max_blk))
    hp = {}
    if "nblocks" in cls.hparams:
        hp["nblocks"] = nb
    if "rank" in cls.hparams:
        hp["rank"] = nb * draw(st.integers(1, min(a, b)))
    try:
        cls.check(nb * a, nb * b, **hp)
    except ValueError:
        reject()
    return nb * a, nb * b, hp


def small_hparams(kind: str, d_in: int, d_out: int) -> dict[str, int]:
    """Fixed valid hyper-parameters for a d_in -> d_out layer (both divisible by 4, min >= 8)."""
    cls = LINEARS[kind]
    hp = {"rank": min(d_in, d_out) // 2, "nblocks": 4}
    return {k: hp[k] for k in cls.hparams}


def matmul_pair(kind: str):
    """The kind's (`<kind>_matmul`, `<kind>_matmul_reference`), by the naming rule every kind
    module follows."""
    module = sys.modules[LINEARS[kind].__module__]
    return getattr(module, f"{kind}_matmul"), getattr(module, f"{kind}_matmul_reference")


def random_weights(layer, generator: torch.Generator) -> list[torch.Tensor]:
    """Fresh N(0, 1) tensors shaped like the layer's weights, float64, requiring grad."""
    return [
        torch.randn(w.shape, dtype=torch.float64, generator=generator).requires_grad_()
        for w in layer.weights()
    ]
