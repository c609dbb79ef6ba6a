"""The Triton kernels (structlm/linear/triton_block.py), run on CPU by Triton's interpreter
(TRITON_INTERPRET=1), against the reference ops and against the eager path: values and gradients,
every dtype, shapes that straddle the kernels' tiles, and the dispatch rules."""

import pytest
import torch

from structlm.linear import LINEARS
from structlm.linear.blockshuffle import blockshuffle_matmul_reference
from structlm.ops import blocks as kernels

pytest.importorskip("triton")
if torch.cuda.is_available():  # the interpreter is for CPU; tests/test_cuda.py runs the kernels
    pytest.skip("on a GPU machine the compiled kernels are tested in test_cuda.py",
                allow_module_level=True)
from structlm.ops import triton_block


@pytest.fixture
def interpret(monkeypatch):
    """The layers routed through the kernels (interpreted, on CPU: tests/conftest.py)."""
    monkeypatch.setenv("STRUCTLM_TRITON", "1")


def _block_reference(x, w, bias):
    return torch.block_diag(*w) @ x.T + (0 if bias is None else bias[:, None])


# (tokens, d_in, d_out, nblocks): inside one tile, and over several tiles in every dimension
# (tiles are 64 tokens x 64 outputs x 32 inputs) with ragged edges
SHAPES = [(5, 8, 16, 2), (37, 48, 96, 2), (70, 96, 48, 4), (130, 160, 160, 2)]


@pytest.mark.parametrize("t, n, m, nb", SHAPES)
def test_blockshuffle_kernel_equals_reference_float64(interpret, t, n, m, nb):
    g = torch.Generator().manual_seed(t)
    p, o = n // nb, m // nb
    q = min(p, o)
    args = [torch.randn(*s, dtype=torch.float64, generator=g, requires_grad=True)
            for s in [(t, n), (nb, q, p), (nb, o, q), (m,)]]
    y = triton_block.blockshuffle_matmul_triton(*args)
    ref = blockshuffle_matmul_reference(*args[:3]) + args[3]
    torch.testing.assert_close(y, ref)
    dy = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    for got, want in zip(torch.autograd.grad(y, args, dy), torch.autograd.grad(ref, args, dy),
                         strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("t, n, m, nb", SHAPES[1:3])
def test_block_diag_kernel_equals_reference_float64(interpret, t, n, m, nb):
    g = torch.Generator().manual_seed(t)
    x = torch.randn(t, n, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(nb, m // nb, n // nb, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(m, dtype=torch.float64, generator=g, requires_grad=True)
    y = triton_block.block_diag_matmul_triton(x, w, b)
    ref = _block_reference(x, w, b).T
    torch.testing.assert_close(y, ref)
    dy = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    for got, want in zip(torch.autograd.grad(y, (x, w, b), dy),
                         torch.autograd.grad(ref, (x, w, b), dy), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_kernels_accumulate_in_fp32(interpret, dtype):
    """Rounded operands, fp32 accumulation, one rounding of the result: within a few ulps of the
    float64 product of the same rounded operands."""
    g = torch.Generator().manual_seed(0)
    nb, p = 4, 24
    x, b1, b2, b = (torch.randn(*s, generator=g).to(dtype)
                    for s in [(37, nb * p), (nb, p, p), (nb, p, p), (nb * p,)])
    y = triton_block.blockshuffle_matmul_triton(x, b1, b2, b)
    assert y.dtype == dtype
    h = triton_block.block_diag_matmul_triton(x, b1)  # the rounded intermediate the kernel uses
    ref = blockshuffle_matmul_reference(x.double(), b1.double(), b2.double()) + b.double()
    ref_from_h = (triton_block.mapped_block_matmul(h.double(), b2.double(), b.double(), (1, nb),
                                                   (1, nb)))
    eps = torch.finfo(dtype).eps
    scale = ref.abs().max().item()
    torch.testing.assert_close(y.double(), ref_from_h, rtol=4 * eps, atol=4 * eps * scale)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=64 * eps * scale)


@pytest.mark.parametrize("kind", sorted(LINEARS))
def test_layers_through_triton_equal_eager_path(monkeypatch, kind):
    """Every kind's layer, forward and backward with bias, through the kernels (where it uses
    block products) and through the eager path: the same numbers."""
    layer = LINEARS[kind](48, 96, **{h: 2 for h in LINEARS[kind].hparams}, dtype=torch.float64)
    x = torch.randn(3, 11, 48, dtype=torch.float64, requires_grad=True)
    results = []
    for mode in ("0", "1"):
        monkeypatch.setenv("STRUCTLM_TRITON", mode)
        y = layer(x)
        grads = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
        results.append((y, grads))
    torch.testing.assert_close(results[0], results[1])


def test_autocast_bf16_reaches_fp32_parameters(interpret):
    layer = LINEARS["blockshuffle"](64, 128, nblocks=4)
    x = torch.randn(20, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())
    torch.testing.assert_close(y.float(), layer(x).detach(), rtol=0.05, atol=0.05)


def test_double_backward_through_the_kernels(interpret):
    """backward(create_graph=True) records a differentiable backward: second derivatives as the
    reference's (a Hessian-vector product in the weights)."""
    g = torch.Generator().manual_seed(3)
    args = [torch.randn(*s, dtype=torch.float64, generator=g, requires_grad=True)
            for s in [(9, 16), (4, 4, 4), (4, 4, 4)]]
    v = [torch.randn(a.shape, dtype=torch.float64, generator=g) for a in args]

    def hvp(fn):
        loss = fn(*args).sin().sum()
        grads = torch.autograd.grad(loss, args, create_graph=True)
        dot = sum((gr * vi).sum() for gr, vi in zip(grads, v, strict=True))
        return torch.autograd.grad(dot, args)

    torch.testing.assert_close(hvp(triton_block.blockshuffle_matmul_triton),
                               hvp(blockshuffle_matmul_reference))


def test_dispatch_rules(monkeypatch):
    x = torch.randn(2, 4)
    monkeypatch.delenv("STRUCTLM_TRITON", raising=False)
    assert not kernels.use_triton(x)  # auto: CUDA tensors only
    monkeypatch.setenv("STRUCTLM_TRITON", "1")
    assert kernels.use_triton(x)
    assert not torch.func.vmap(lambda v: torch.tensor(kernels.use_triton(v)))(x).any()
    monkeypatch.setenv("STRUCTLM_TRITON", "0")
    assert not kernels.use_triton(x)
    monkeypatch.setenv("STRUCTLM_TRITON", "yes")
    with pytest.raises(ValueError, match="STRUCTLM_TRITON='yes': use auto, 1 or 0"):
        kernels.use_triton(x)
