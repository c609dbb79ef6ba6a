"""The fast `*_matmul` ops against their `*_matmul_reference` (values and gradients), for every
registered kind."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from linear_cases import layer_shapes, matmul_pair, random_weights, small_hparams

from structlm.linear import LINEARS

KINDS = sorted(LINEARS)
lead_shapes = st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)


def _layer(kind: str, d_in: int, d_out: int, hp: dict) -> torch.nn.Module:
    return LINEARS[kind](d_in, d_out, **hp, dtype=torch.float64)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_fast_and_reference_op(kind):
    fast, ref = matmul_pair(kind)
    assert callable(fast) and callable(ref) and fast is not ref


@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data(), lead=lead_shapes, seed=st.integers(0, 2**31 - 1))
def test_matmul_equals_reference_values_and_grads(kind, data, lead, seed):
    """Fast and reference ops agree on outputs and on the gradients w.r.t. input and weights."""
    d_in, d_out, hp = data.draw(layer_shapes(kind))
    g = torch.Generator().manual_seed(seed)
    fast, ref = matmul_pair(kind)
    weights = random_weights(_layer(kind, d_in, d_out, hp), g)
    x = torch.randn(*lead, d_in, dtype=torch.float64, generator=g, requires_grad=True)
    y_fast, y_ref = fast(x, *weights), ref(x, *weights)
    assert y_fast.shape == (*lead, d_out)
    # float64, a handful of products of O(1) numbers: default float64 tolerances (rtol 1e-7) suffice
    torch.testing.assert_close(y_fast, y_ref)
    dy = torch.randn(y_ref.shape, dtype=torch.float64, generator=g)
    grads_fast = torch.autograd.grad(y_fast, [x, *weights], dy, allow_unused=True)
    grads_ref = torch.autograd.grad(y_ref, [x, *weights], dy, allow_unused=True)
    for gf, gr in zip(grads_fast, grads_ref, strict=True):
        if gr is None:  # only possible for an empty input: no gradient flows anywhere
            assert gf is None or not gf.any()
            continue
        torch.testing.assert_close(gf, gr)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d_in, d_out", [(4, 8), (8, 4), (8, 8)])
def test_gradcheck_fast_op(kind, d_in, d_out):
    """torch.autograd.gradcheck (finite differences, float64) of the fast op on tiny shapes."""
    hp = {k: 2 for k in LINEARS[kind].hparams}  # rank 2, nblocks 2
    g = torch.Generator().manual_seed(1)
    fast, _ = matmul_pair(kind)
    weights = random_weights(_layer(kind, d_in, d_out, hp), g)
    x = torch.randn(2, 3, d_in, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(fast, (x, *weights))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lead", [(), (5,), (2, 3), (2, 1, 3), (1, 2, 1, 2)])
def test_matmul_leading_shapes(kind, lead):
    """Any number of leading dimensions: the op equals itself on the flattened (T, d_in) input."""
    d_in, d_out = 8, 16
    g = torch.Generator().manual_seed(2)
    fast, _ = matmul_pair(kind)
    weights = [
        w.detach() for w in random_weights(_layer(kind, d_in, d_out, small_hparams(kind, 8, 16)), g)
    ]
    x = torch.randn(*lead, d_in, dtype=torch.float64, generator=g)
    y = fast(x, *weights)
    assert y.shape == (*lead, d_out)
    # the same rows through a different batching: equal up to float64 summation-order rounding
    torch.testing.assert_close(y.reshape(-1, d_out), fast(x.reshape(-1, d_in), *weights))


@pytest.mark.parametrize("kind", KINDS)
def test_matmul_non_contiguous_input(kind):
    """A transposed (non-contiguous) input gives the same result as its contiguous copy."""
    g = torch.Generator().manual_seed(3)
    fast, _ = matmul_pair(kind)
    weights = [
        w.detach() for w in random_weights(_layer(kind, 8, 16, small_hparams(kind, 8, 16)), g)
    ]
    x = torch.randn(8, 6, dtype=torch.float64, generator=g).T  # (6, 8), strides (1, 6)
    assert not x.is_contiguous()
    torch.testing.assert_close(fast(x, *weights), fast(x.contiguous(), *weights))


@pytest.mark.parametrize(
    "d_in, d_out, nblocks", [(32, 64, 4), (24, 48, 4), (48, 24, 4), (12, 36, 2)]
)
def test_blockshuffle_fast_path_both_shuffle_branches(d_in, d_out, nblocks):
    """q % nblocks == 0 takes the one-copy shuffle, else the general one; both = reference."""
    from structlm.linear import blockshuffle_matmul, blockshuffle_matmul_reference

    p, o = d_in // nblocks, d_out // nblocks
    q = min(p, o)
    w1 = torch.randn(nblocks, q, p, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(nblocks, o, q, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 5, d_in, dtype=torch.float64, requires_grad=True)
    fast, ref = blockshuffle_matmul(x, w1, w2), blockshuffle_matmul_reference(x, w1, w2)
    torch.testing.assert_close(fast, ref)  # float64: exact up to summation order
    g = torch.randn_like(fast)
    grads_fast = torch.autograd.grad(fast, (x, w1, w2), g)
    grads_ref = torch.autograd.grad(ref, (x, w1, w2), g)
    for a, b in zip(grads_fast, grads_ref, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("impl", ["bmm", "loop"])
@pytest.mark.parametrize("kind, d_in, d_out, hp", [
    ("blockdense", 16, 24, {"rank": 8, "nblocks": 4}),
    ("blockshuffle", 16, 32, {"nblocks": 4}),  # q % nblocks == 0: the one-copy shuffle
    ("blockshuffle", 12, 6, {"nblocks": 2}),  # q = 3: the general shuffle
])
def test_block_ops_equal_reference_with_either_block_matmul(monkeypatch, impl, kind, d_in, d_out,
                                                             hp):
    """Both implementations of the block-diagonal product (one bmm, one mm per block) give the
    reference's values and gradients."""
    monkeypatch.setenv("STRUCTLM_BLOCK_MATMUL", impl)
    g = torch.Generator().manual_seed(3)
    fast, ref = matmul_pair(kind)
    weights = random_weights(_layer(kind, d_in, d_out, hp), g)
    x = torch.randn(3, 5, d_in, dtype=torch.float64, generator=g, requires_grad=True)
    y_fast, y_ref = fast(x, *weights), ref(x, *weights)
    torch.testing.assert_close(y_fast, y_ref)
    dy = torch.randn(y_ref.shape, dtype=torch.float64, generator=g)
    for gf, gr in zip(torch.autograd.grad(y_fast, [x, *weights], dy),
                      torch.autograd.grad(y_ref, [x, *weights], dy), strict=True):
        torch.testing.assert_close(gf, gr)


def test_block_matmul_policy(monkeypatch):
    from structlm.linear.base import _block_matmul_impl

    a = torch.randn(2, 3, 4)
    monkeypatch.delenv("STRUCTLM_BLOCK_MATMUL", raising=False)
    assert _block_matmul_impl(a) == "bmm"  # fp32 on CPU
    assert _block_matmul_impl(a.bfloat16()) == "loop"
    with torch.autocast("cpu", torch.bfloat16):
        assert _block_matmul_impl(a) == "loop"  # autocast decides the dtype the products run in
    monkeypatch.setenv("STRUCTLM_BLOCK_MATMUL", "loop")
    assert _block_matmul_impl(a) == "loop"
    monkeypatch.setenv("STRUCTLM_BLOCK_MATMUL", "fast")
    with pytest.raises(ValueError, match="choose auto, bmm or loop"):
        _block_matmul_impl(a)
