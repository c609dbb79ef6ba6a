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
    from structlm.linear.blockshuffle import blockshuffle_matmul, blockshuffle_matmul_reference

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


BLOCK_CASES = [
    ("blockdense", 16, 24, {"rank": 8, "nblocks": 4}),
    ("blockshuffle", 16, 32, {"nblocks": 4}),  # expanding, q % nblocks == 0
    ("blockshuffle", 12, 6, {"nblocks": 2}),  # contracting, q = 3: not a multiple of nblocks
    ("blockshuffle", 8, 8, {"nblocks": 1}),  # one block: the shuffles are the identity
]


@pytest.mark.parametrize("needs", ["all", "no_input", "frozen_weights"])
@pytest.mark.parametrize("kind, d_in, d_out, hp", BLOCK_CASES)
def test_block_layers_with_bias_equal_reference(kind, d_in, d_out, hp, needs):
    """The layer (bias folded into its last product) against reference op + bias: values and every
    gradient asked for, also when the input or the weights take none."""
    g = torch.Generator().manual_seed(3)
    layer = _layer(kind, d_in, d_out, hp)
    weights = random_weights(layer, g)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(d_out, dtype=torch.float64, generator=g))
        for p, w in zip(layer.weights(), weights, strict=True):
            p.copy_(w)
    _, ref = matmul_pair(kind)
    x = torch.randn(3, 5, d_in, dtype=torch.float64, generator=g, requires_grad=needs != "no_input")
    if needs == "frozen_weights":
        layer.requires_grad_(False)
        layer.bias.requires_grad_(True)
    params = [p for p in layer.parameters() if p.requires_grad]
    wanted = ([x] if x.requires_grad else []) + params
    y = layer(x)
    y_ref = ref(x, *layer.weights()) + layer.bias
    torch.testing.assert_close(y, y_ref)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    for gf, gr in zip(torch.autograd.grad(y, wanted, dy), torch.autograd.grad(y_ref, wanted, dy),
                      strict=True):
        torch.testing.assert_close(gf, gr)


def test_block_diag_matmul_values_grads_and_strided_input():
    from structlm.ops.blocks import block_diag_matmul

    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(12, dtype=torch.float64, generator=g, requires_grad=True)
    x = torch.randn(7, 15, dtype=torch.float64, generator=g, requires_grad=True)
    dense = torch.block_diag(*w)  # (12, 15)
    torch.testing.assert_close(block_diag_matmul(x, w, b), x @ dense.T + b)
    # a column slice of a wider activation: read in place, same products
    wide = torch.randn(7, 20, dtype=torch.float64, generator=g)
    torch.testing.assert_close(block_diag_matmul(wide[:, 5:], w), wide[:, 5:] @ dense.T)
    assert torch.autograd.gradcheck(block_diag_matmul, (x[:2], w, b))
    assert torch.autograd.gradcheck(block_diag_matmul, (x[:2], w, None))


def test_transpose_within_rows():
    from structlm.ops.blocks import transpose_within_rows

    x = torch.arange(2 * 6, dtype=torch.float64).view(2, 6).requires_grad_()
    y = transpose_within_rows(x, 2, 3)  # each row [[0 1 2] [3 4 5]] -> [[0 3] [1 4] [2 5]]
    assert y.tolist() == [[0, 3, 1, 4, 2, 5], [6, 9, 7, 10, 8, 11]]
    assert torch.autograd.gradcheck(lambda t: transpose_within_rows(t, 2, 3), (x,))
    one = transpose_within_rows(x, 1, 6)  # nothing moves, but the result is a new tensor
    assert torch.equal(one, x) and one.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("rows, a, b", [(7, 4, 1024), (5, 256, 4), (3, 2, 6), (9, 16, 8),
                                        (4, 3, 5), (1, 8, 2), (2, 32, 2), (0, 4, 8), (65, 4, 64)])
def test_native_shuffles_equal_the_strided_copy(monkeypatch, dtype, rows, a, b):
    """csrc/shuffle.c (block counts 2-16 on one side, any number of rows over the threads) moves
    every element where PyTorch's strided copy does, bit for bit, forward and backward."""
    from structlm.ops.blocks import transpose_within_rows

    x = torch.randn(rows, a * b).to(dtype).requires_grad_()
    g = torch.randn(rows, b * a).to(dtype)
    out = {}
    for mode in ("native", "aten"):
        monkeypatch.setenv("STRUCTLM_SHUFFLE", mode)
        y = transpose_within_rows(x, a, b)
        (dx,) = torch.autograd.grad(y, x, g)
        out[mode] = (y, dx)
    expected = x.detach().view(-1, a, b).transpose(1, 2).reshape(rows, b * a)
    assert torch.equal(out["native"][0], expected) and torch.equal(out["aten"][0], expected)
    assert torch.equal(out["native"][1], out["aten"][1])
    assert torch.equal(out["native"][1], g.view(-1, b, a).transpose(1, 2).reshape(rows, a * b))


def test_shuffle_switch_names_its_choices(monkeypatch):
    from structlm.ops.blocks import transpose_within_rows

    monkeypatch.setenv("STRUCTLM_SHUFFLE", "fast")
    with pytest.raises(ValueError, match="STRUCTLM_SHUFFLE='fast': choose native or aten"):
        transpose_within_rows(torch.zeros(2, 8), 2, 4)


def test_native_shuffle_is_used_for_small_block_counts():
    """The kernel is picked where it applies (so the equality test above tests it), and not
    for non-contiguous input, other widths, or no small side."""
    from structlm.ops.blocks import _native_shuffle

    assert _native_shuffle(torch.zeros(4, 64, dtype=torch.bfloat16), 4, 16) is not None
    assert _native_shuffle(torch.zeros(4, 128), 32, 4)[1] == 32  # deinterleave_4, rows of 32
    assert _native_shuffle(torch.zeros(4, 64, dtype=torch.float64), 4, 16) is None
    assert _native_shuffle(torch.zeros(4, 60), 3, 20) is None
    assert _native_shuffle(torch.zeros(64, 4).t(), 4, 16) is None


@pytest.mark.parametrize("kind, d_in, d_out, hp", BLOCK_CASES[:3])
def test_block_layers_under_bf16_autocast(kind, d_in, d_out, hp):
    """Under autocast the products run in bf16 and the gradients reach the fp32 parameters as
    fp32, close to the fp32 computation."""
    torch.manual_seed(0)
    layer = LINEARS[kind](d_in, d_out, **hp)
    x = torch.randn(64, d_in)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    grads = [p.grad for p in layer.parameters()]
    layer.zero_grad()
    y32 = layer(x)
    y32.square().sum().backward()
    torch.testing.assert_close(y.float(), y32, atol=0.05, rtol=0.05)
    for g16, p in zip(grads, layer.parameters(), strict=True):
        assert g16.dtype == torch.float32
        torch.testing.assert_close(g16, p.grad, atol=0.1 * p.grad.abs().max().item(), rtol=0.05)


@pytest.mark.parametrize("kind, d_in, d_out, hp", BLOCK_CASES[:2])
def test_block_layers_compile_without_graph_breaks(kind, d_in, d_out, hp):
    """torch.compile traces the block ops whole (custom ops) and gives eager's values and grads."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = LINEARS[kind](d_in, d_out, **hp)
    x = torch.randn(8, d_in, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)  # fullgraph: a graph break is an error
    y_c = compiled(x)
    gx_c, *gw_c = torch.autograd.grad(y_c.square().sum(), [x, *layer.parameters()])
    y_e = layer(x)
    gx_e, *gw_e = torch.autograd.grad(y_e.square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(y_c, y_e)
    for a, b in zip([gx_c, *gw_c], [gx_e, *gw_e], strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind, d_in, d_out, hp", BLOCK_CASES[:2])
def test_flop_counter_sees_inside_the_block_ops(kind, d_in, d_out, hp):
    """FlopCounterMode counts the custom block ops: forward + backward = 3x the layer's FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    layer = LINEARS[kind](d_in, d_out, **hp)
    x = torch.randn(10, d_in, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    assert counter.get_total_flops() == 3 * layer.flops_per_token() * 10
    # the custom ops torch.compile calls carry the same counts
    w = torch.randn(4, 3, 5)
    with FlopCounterMode(display=False) as counter:
        torch.ops.structlm.block_diag_mm(torch.randn(10, 20), w, None)
        torch.ops.structlm.block_diag_mm_backward(torch.randn(10, 12), torch.randn(10, 20), w,
                                                  True, False)
    assert counter.get_total_flops() == 2 * (2 * 10 * 4 * 3 * 5)


@pytest.mark.parametrize("kind, d_in, d_out, hp", BLOCK_CASES[:3])
def test_block_layers_compose_with_autograd_and_torch_func(kind, d_in, d_out, hp):
    """fp64 stays fp64 under autocast (as autocast leaves it), and the layers support double
    backward, torch.func.vmap and forward-mode AD, all equal to the reference op."""
    g = torch.Generator().manual_seed(5)
    layer = _layer(kind, d_in, d_out, hp)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(d_out, dtype=torch.float64, generator=g))
    _, ref_op = matmul_pair(kind)

    def ref(t):
        return ref_op(t, *layer.weights()) + layer.bias

    x = torch.randn(2, 3, d_in, dtype=torch.float64, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.float64
    # double backward: the gradient of a gradient
    hvp = []
    for f in (layer, ref):
        (gx,) = torch.autograd.grad(f(x).pow(2).sum(), [x], create_graph=True)
        hvp.append(torch.autograd.grad(gx.sum(), [x, *layer.parameters()]))
    for a, b in zip(*hvp, strict=True):
        torch.testing.assert_close(a, b)
    # vmap over a leading axis, and forward-mode AD
    xs = x.detach()
    torch.testing.assert_close(torch.func.vmap(layer)(xs), ref(xs))
    t = torch.randn(xs.shape, dtype=torch.float64, generator=g)
    out, tangent = torch.func.jvp(layer, (xs,), (t,))
    out_r, tangent_r = torch.func.jvp(ref, (xs,), (t,))
    torch.testing.assert_close(out, out_r)
    torch.testing.assert_close(tangent, tangent_r)
