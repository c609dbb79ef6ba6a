"""Causal self-attention for training: three batched GEMMs and a softmax where they beat SDPA.

    causal_attention(q, k, v, scale)   q, k, v (B, H, T, hs) -> (B, H, T, hs)

On a CPU, PyTorch's fused (flash) attention kernel is slow in training at short sequences: the
product form below (the masked scores and their softmax, p v, and a hand-written backward of
four GEMMs) takes about half its time there (measured in BENCHMARKS.md).
It holds the (B, H, T, T) probabilities for the backward, which the fused kernel does not, so
it is used only where that is small: on CPU, for inputs that need gradients, at T <= MAX_T.
Elsewhere (CUDA, inference, longer sequences, torch.compile, torch.func transforms) SDPA runs.

Numerics: the scores and their softmax are computed in fp32, the probabilities rounded once to
the inputs' dtype for p v and the backward's GEMMs, as the fused kernel does; in bf16 its
errors against an fp64 reference are the fused kernel's size (rounding the scores to bf16, as
a bf16 GEMM does, errs several times as much at scores of std 4). For bf16 on CPU, scores and
softmax are one C kernel over the causal half (csrc/attention.c; STRUCTLM_ATTENTION_KERNEL=aten
for torch's baddbmm of the upcast q, k and softmax instead). The forward runs outside autocast,
which would otherwise run that baddbmm in bf16.
STRUCTLM_ATTENTION=sdpa picks SDPA everywhere, =bmm this path wherever it applies.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from structlm.ops import native
from structlm.ops.blocks import _needs_composable_ops

ATTENTION_ENV = "STRUCTLM_ATTENTION"
PROBS_ENV = native.SWITCHES["attention"]  # native (csrc/attention.c) or aten
MAX_T = 512  # the probabilities cost B*H*T*T elements: 1.3x q, k, v's memory at T=256, hs=64


@functools.cache
def _causal_bias(T: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(T, T): 0 on and below the diagonal, -inf above it."""
    return torch.full((T, T), float("-inf"), dtype=dtype, device=device).triu_(1)


def _probabilities(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """softmax of the masked scores from differentiable ops: (..., T, T)."""
    s = (q @ k.transpose(-1, -2)) * scale + _causal_bias(q.shape[-2], q.dtype, q.device)
    return torch.softmax(s, dim=-1)


def _probs_kernel(q: Tensor, k: Tensor):
    """Our fused scores-and-softmax kernel (csrc/attention.c) for bf16 CPU q and k, else None."""
    if q.dtype != torch.bfloat16 or k.dtype != q.dtype or q.device.type != "cpu":
        return None
    return native.kernel("attention", "causal_probs_bf16", PROBS_ENV)


def _causal_probs(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """softmax(q k^T scale + causal mask) of (BH, T, hs) inputs: (BH, T, T) in q's dtype, the
    scores and softmax in at least fp32."""
    fn = _probs_kernel(q, k)
    BH, T, hs = q.shape
    if fn is not None:
        q, k, p = q.contiguous(), k.contiguous(), q.new_empty(BH, T, T)
        native.call(fn, [q, k, p], BH, T, hs, scale=scale)
        return p
    dt = torch.promote_types(q.dtype, torch.float32)
    s = torch.baddbmm(_causal_bias(T, dt, q.device), q.to(dt), k.to(dt).transpose(1, 2),
                      alpha=scale)  # (BH, T, T), masked
    return torch.softmax(s, dim=-1).to(q.dtype)


def _no_autocast(device_type: str):
    """autocast off for this device type (a no-op where it has no autocast, e.g. meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _CausalAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        shape = q.shape  # (B, H, T, hs)
        with _no_autocast(q.device.type):  # autocast would round the scores
            p = _causal_probs(q.flatten(0, 1), k.flatten(0, 1), scale)  # (BH, T, T)
            y = torch.bmm(p, v.flatten(0, 1).to(p.dtype)).view(shape)
        ctx.save_for_backward(q, k, v, p)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        q, k, v, p = ctx.saved_tensors
        if torch.is_grad_enabled():  # backward(create_graph=True): differentiable ops
            p = _probabilities(q, k, ctx.scale)
            dp = dy @ v.transpose(-1, -2)
            ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * ctx.scale
            return ds @ k, ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ dy, None
        shape, scale = dy.shape, ctx.scale
        dy, qb, kb, vb = (t.flatten(0, 1) for t in (dy, q, k, v))  # (BH, T, hs)
        dv = torch.bmm(p.transpose(1, 2), dy)
        dp = torch.bmm(dy, vb.transpose(1, 2))  # (BH, T, T)
        ds = torch._softmax_backward_data(dp, p, -1, p.dtype)  # the scaled scores' gradient
        dq = torch.bmm(ds, kb).mul_(scale)
        dk = torch.bmm(ds.transpose(1, 2), qb).mul_(scale)
        return dq.view(shape), dk.view(shape), dv.view(shape), None


def _use_bmm(q: Tensor, k: Tensor, v: Tensor) -> bool:
    choice = os.environ.get(ATTENTION_ENV, "auto")
    if choice not in ("auto", "sdpa", "bmm"):
        raise ValueError(f"{ATTENTION_ENV}={choice!r}: choose auto, sdpa or bmm")
    if (choice == "sdpa" or torch.compiler.is_compiling() or _needs_composable_ops(q, k, v)
            or q.shape != k.shape or k.shape != v.shape):
        return False
    if choice == "bmm":
        return True
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                              or v.requires_grad)
    return q.device.type == "cpu" and needs_grad and q.shape[-2] <= MAX_T


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale + causal mask) v over (B, H, T, hs) inputs with as many K/V heads
    as query heads; scale None = 1/sqrt(hs). The product form where it is faster, else SDPA."""
    if _use_bmm(q, k, v):
        return _CausalAttentionFn.apply(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
