"""The product-form causal attention (attention.py) against SDPA: values and gradients in fp64,
fp32 and bf16, double backward, where each path is chosen, and the switch's error."""

import pytest
import torch
import torch.nn.functional as F

from structlm.config import ModelConfig
from structlm.model.gpt import GPT
from structlm.ops import attention as A


def _run(fn, q, k, v, g):
    args = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    y = fn(*args)
    return (y, *torch.autograd.grad(y, args, g))


def _sdpa(scale):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def _inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(4)]


@pytest.fixture(autouse=True)
def _auto(monkeypatch):
    monkeypatch.delenv(A.ATTENTION_ENV, raising=False)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("shape", [(2, 3, 17, 8), (1, 2, 1, 4), (3, 1, 64, 16)])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_matches_sdpa_forward_and_backward(shape, dtype, tol, scale):
    q, k, v, g = _inputs(shape, dtype)
    got = _run(lambda *a: A._CausalAttentionFn.apply(*a, scale or shape[-1] ** -0.5), q, k, v, g)
    want = _run(_sdpa(scale), q, k, v, g)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == dtype and a.shape == shape
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_bf16_errors_are_the_fused_kernels_size():
    """Against an fp64 reference, the bf16 product form errs no more than 1.5x as much as SDPA's
    fused kernel does in bf16 (relative norm of the output and of each gradient), with scores of
    std 4, where rounding the scores themselves to bf16 would err ~4x as much."""
    q, k, v, g = _inputs((2, 4, 128, 64), torch.float64)
    q, k = 2 * q, 2 * k
    q, k, v, g = (t.to(torch.bfloat16) for t in (q, k, v, g))
    ref = _run(_sdpa(None), *(t.double() for t in (q, k, v, g)))
    mine = _run(lambda *a: A._CausalAttentionFn.apply(*a, 0.125), q, k, v, g)
    fused = _run(_sdpa(None), q, k, v, g)
    for r, m, f in zip(ref, mine, fused, strict=True):
        assert m.dtype == torch.bfloat16
        assert _rel_err(m, r) <= 1.5 * _rel_err(f, r), (_rel_err(m, r), _rel_err(f, r))


@pytest.mark.parametrize("shape", [(2, 3, 17, 8), (1, 2, 1, 4), (3, 1, 64, 16), (1, 2, 100, 64),
                                   (1, 2, 37, 9)])  # odd hs: the fp32 form, not bf16 pairs
def test_bf16_kernel_matches_the_fp32_path(shape, monkeypatch):
    """Our scores-and-softmax kernel (bf16) against baddbmm + softmax on the upcast inputs: zeros
    above the diagonal, every probability within one bf16 ulp of the fp32 path's (both round)."""
    q, k, _, _ = (t.flatten(0, 1) for t in _inputs(shape, torch.bfloat16))
    if A._probs_kernel(q, k) is None:
        pytest.skip("no C compiler: the kernel is not built")
    got = A._causal_probs(q, k, 0.3)
    monkeypatch.setenv(A.PROBS_ENV, "aten")
    assert A._probs_kernel(q, k) is None
    want = A._causal_probs(q, k, 0.3)
    T = shape[-2]
    assert got.dtype == torch.bfloat16 and got.shape == (shape[0] * shape[1], T, T)
    assert torch.equal(got.float().triu(1), torch.zeros(T, T).expand_as(got))
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-6)  # one ulp


@pytest.mark.parametrize("kernel", ["native", "aten"])
def test_autocast_does_not_round_the_scores(kernel, monkeypatch):
    """Under bf16 autocast (the training step) the forward computes what it computes outside it:
    autocast would otherwise run the scores' product in bf16 (4x the error at scores of std 4)."""
    monkeypatch.setenv(A.PROBS_ENV, kernel)
    q, k, v, g = _inputs((2, 4, 33, 16), torch.bfloat16)
    fn = lambda *a: A._CausalAttentionFn.apply(*a, 0.5)  # noqa: E731
    plain = _run(fn, 2 * q, 2 * k, v, g)
    with torch.autocast("cpu", torch.bfloat16):
        cast = _run(fn, 2 * q, 2 * k, v, g)
    for a, b in zip(plain, cast, strict=True):
        assert torch.equal(a, b)


def test_mixed_dtypes_and_meta_tensors(monkeypatch):
    """bf16 queries with fp32 keys take the torch ops (the kernel reads bf16 only), and meta
    tensors (shape inference) pass through the forward, which has no autocast to leave there."""
    q, k, v, _ = _inputs((1, 2, 8, 16), torch.float64)
    fn = lambda *a: A._CausalAttentionFn.apply(*a, 0.25)  # noqa: E731
    got = fn(q.bfloat16(), k.float(), v.bfloat16())
    monkeypatch.setenv(A.PROBS_ENV, "aten")
    torch.testing.assert_close(got, fn(q.bfloat16(), k.float(), v.bfloat16()))
    meta = torch.empty(1, 2, 8, 16, device="meta")
    assert fn(meta, meta, meta).shape == (1, 2, 8, 16)


def _rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def test_double_backward_and_gradcheck():
    q, k, v, _ = _inputs((1, 2, 5, 3), torch.float64)
    args = [t.requires_grad_() for t in (q, k, v)]
    fn = lambda *a: A._CausalAttentionFn.apply(*a, 0.7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


def test_path_choice(monkeypatch):
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    assert A._use_bmm(q, q, q)  # CPU, training, short
    with torch.no_grad():
        assert not A._use_bmm(q, q, q)  # inference: SDPA
    long = torch.randn(1, 1, A.MAX_T + 1, 4, requires_grad=True)
    assert not A._use_bmm(long, long, long)
    kv = torch.randn(1, 1, 8, 4)
    assert not A._use_bmm(q, kv, kv)  # other head counts: SDPA
    monkeypatch.setenv(A.ATTENTION_ENV, "sdpa")
    assert not A._use_bmm(q, q, q)
    monkeypatch.setenv(A.ATTENTION_ENV, "bmm")
    with torch.no_grad():
        assert A._use_bmm(q, q, q)
    monkeypatch.setenv(A.ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match="choose auto, sdpa or bmm"):
        A.causal_attention(q, q, q)


def test_model_loss_and_gradients_match_under_either_path(monkeypatch):
    cfg = ModelConfig(n_layer=2, d_model=32, n_head=4, d_ff=64, vocab_size=50, block_size=16)
    torch.manual_seed(0)
    model = GPT(cfg).double()
    idx = torch.randint(0, 50, (2, 16))
    out = []
    for choice in ("bmm", "sdpa"):
        monkeypatch.setenv(A.ATTENTION_ENV, choice)
        model.zero_grad()
        _, loss = model(idx, idx)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(out[0][1], out[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
