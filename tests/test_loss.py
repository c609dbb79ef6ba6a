"""The chunked cross-entropy against F.cross_entropy on fp32 logits: values, gradients, ignored
rows, dtypes, chunk boundaries, double backward, torch.func, and bad shapes."""

import pytest
import torch
import torch.nn.functional as F

from structlm.ops import xent as L


def _ref(logits, targets):
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets)


def _both(logits, targets):
    out = []
    for fn in (L.cross_entropy, _ref):
        x = logits.detach().requires_grad_()
        value = fn(x, targets)
        value.backward()
        out.append((value.detach(), x.grad))
    return out


@pytest.mark.parametrize("path", ["native", "aten"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_value_and_gradient_match_the_reference(dtype, path, monkeypatch):
    """Our kernel (fp32, bf16 on CPU) and the chunked torch ops (fp64, or STRUCTLM_CROSS_ENTROPY=
    aten) against F.cross_entropy."""
    monkeypatch.setenv(L.XENT_ENV, path)
    monkeypatch.setattr(L, "CHUNK_ELEMENTS", 3 * 50)  # 3 rows a chunk: 37 rows straddle chunks
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 50, generator=g, dtype=torch.float64) * 4).to(dtype)
    targets = torch.randint(0, 50, (37,), generator=g)
    (v, dx), (rv, rdx) = _both(logits, targets)
    assert v.dtype == rv.dtype and dx.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-6}[dtype]
    torch.testing.assert_close(v, rv, rtol=tol, atol=tol)
    # bf16: both round the same fp32 gradient once; at most one bf16 ulp apart
    # fp32: a few ulps (exp(x - lse) against log_softmax's exp(x - max - log(sum)))
    gtol, atol = {torch.float64: (1e-12, 1e-15), torch.float32: (1e-6, 1e-7),
                  torch.bfloat16: (2e-3, 1e-9)}[dtype]
    torch.testing.assert_close(dx.double(), rdx.double(), rtol=gtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_ignored_rows_get_no_gradient_and_leave_the_mean(dtype):
    logits = torch.randn(8, 11, dtype=torch.float64).to(dtype)
    targets = torch.tensor([1, -100, 3, -100, 0, 10, -100, 2])
    (v, dx), (rv, rdx) = _both(logits, targets)
    torch.testing.assert_close(v, rv)
    torch.testing.assert_close(dx, rdx, rtol=2e-3 if dtype == torch.bfloat16 else None,
                               atol=1e-6 if dtype == torch.bfloat16 else None)
    assert dx[targets == -100].abs().max() == 0


def test_double_backward_matches_the_reference():
    logits = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 9, (6,))
    v = torch.randn(6, 9, dtype=torch.float64)
    hvps = []
    for fn in (L.cross_entropy, _ref):
        (gx,) = torch.autograd.grad(fn(logits, targets), logits, create_graph=True)
        (hv,) = torch.autograd.grad((gx * v).sum(), logits)
        hvps.append(hv)
    torch.testing.assert_close(*hvps)
    assert torch.autograd.gradcheck(lambda x: L.cross_entropy(x, targets), (logits,))


def test_under_torch_func():
    logits = torch.randn(5, 7, dtype=torch.float64)
    targets = torch.randint(0, 7, (5,))
    got = torch.func.grad(lambda x: L.cross_entropy(x, targets))(logits)
    want = torch.func.grad(lambda x: _ref(x, targets))(logits)
    torch.testing.assert_close(got, want)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"logits \(N, V\) and targets \(N,\)"):
        L.cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_logits_and_out_of_range_targets(dtype):
    """-inf logits (a masked vocabulary) get probability and gradient 0; a target outside the
    vocabulary is an error before any gradient is written."""
    logits = torch.randn(4, 40, dtype=torch.float64)
    logits[:, 30:] = float("-inf")
    targets = torch.tensor([0, 5, 29, -100])
    (v, dx), (rv, rdx) = _both(logits.to(dtype), targets)
    torch.testing.assert_close(v, rv)
    assert torch.isfinite(v) and dx[:, 30:].abs().max() == 0
    torch.testing.assert_close(dx.double(), rdx.double(), rtol=2e-3, atol=1e-6)
    with pytest.raises((RuntimeError, IndexError), match="out of bounds|index"):
        L.cross_entropy(logits.to(dtype), torch.tensor([0, 5, 40, 1]))
