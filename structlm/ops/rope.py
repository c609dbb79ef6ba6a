"""Rotary position embeddings: the rotation (eager, and fused with the q/k/v split by csrc/rope.c
on CPU).
"""

from __future__ import annotations

import torch
from torch import Tensor

from structlm.ops import native
from structlm.ops.blocks import _needs_composable_ops


def at_least_fp32(x: Tensor) -> Tensor:
    """x in fp32 if it is narrower (bf16, fp16), else unchanged (fp32, fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _rotate_halves(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x rotated by the angles, halves layout: [x1 c - x2 s | x2 c + x1 s] with c, s the first half
    of cos, sin (the second repeats it); the products and sums in at least fp32, one rounding to
    x's dtype at the end. Three passes over each half (the composable form takes seven over the
    whole: upcast, negate, concatenate, two products, sum, cast)."""
    h = x.shape[-1] // 2
    c, s = cos[..., :h], sin[..., :h]
    x1, x2 = x[..., :h], x[..., h:]
    out = torch.empty_like(x)
    y1 = (x1 * c).addcmul_(x2, s, value=-1.0)  # fp32 (c is fp32), (..., hs/2)
    out[..., :h].copy_(y1)
    y2 = (x2 * c).addcmul_(x1, s)
    out[..., h:].copy_(y2)
    return out


class _RopeFn(torch.autograd.Function):
    """RoPE with its backward as the inverse rotation (angle -θ): nothing but cos and sin is saved,
    and the backward is as cheap as the forward. Differentiable ops inside, so double backward
    works."""

    @staticmethod
    def forward(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return _rotate_halves(x, cos, sin)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        ctx.save_for_backward(inputs[1], inputs[2])

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate_halves(dy, cos, -sin), None, None


ROPE_ENV = native.SWITCHES["rope"]  # native (csrc/rope.c, CPU fp32/bf16) or aten


def _qkv_kernel(direction: str, dtype: torch.dtype):
    """csrc/rope.c's split-and-rotate ("fwd") or its inverse ("bwd") for fp32/bf16, or None."""
    return native.kernel("rope", f"qkv_rope_{direction}_{native.SUFFIX[dtype]}", ROPE_ENV)


def _qkv_fused(h: Tensor, cos: Tensor, sin: Tensor):
    """The forward kernel for the QKV output h (B, T, width) with fp32 angles (T, hs) without
    gradients, or None: CPU, fp32/bf16, contiguous, not under torch.func or torch.compile (which
    trace the torch ops instead)."""
    angles_ok = (cos.dim() == 2 and cos.shape == sin.shape and cos.shape[0] == h.shape[1]
                 and cos.dtype == sin.dtype == torch.float32
                 and not (cos.requires_grad or sin.requires_grad))
    if (h.device.type != "cpu" or h.dtype not in native.SUFFIX or not h.is_contiguous()
            or not angles_ok or _needs_composable_ops(h) or torch.compiler.is_compiling()):
        return None
    return _qkv_kernel("fwd", h.dtype)


class _QkvRopeFn(torch.autograd.Function):
    """h (B, T, (nq + 2 nkv) hs) -> q (B, nq, T, hs), k, v (B, nkv, T, hs), contiguous, q and k
    rotated: the split, the head transpose and RoPE in one pass each way (csrc/rope.c)."""

    @staticmethod
    def forward(ctx, h: Tensor, cos: Tensor, sin: Tensor, nq: int, nkv: int, kernel):
        B, T, _ = h.shape  # kernel: _qkv_fused(h, cos, sin)
        hs = cos.shape[-1]
        q, k, v = h.new_empty(B, nq, T, hs), h.new_empty(B, nkv, T, hs), h.new_empty(B, nkv, T, hs)
        cos, sin = cos.contiguous(), sin.contiguous()
        native.call(kernel, [h, q, k, v, cos, sin], B, T, nq, nkv, hs)
        ctx.save_for_backward(cos, sin)
        return q, k, v

    @staticmethod
    def backward(ctx, dq: Tensor, dk: Tensor, dv: Tensor):
        cos, sin = ctx.saved_tensors
        B, nq, T, hs = dq.shape  # unused outputs' gradients come as zeros (materialize_grads)
        compiled = torch.compiler.is_compiling()  # compiled autograd traces the torch ops
        kernel = None if torch.is_grad_enabled() or compiled else _qkv_kernel("bwd", dq.dtype)
        if kernel is None:  # also backward(create_graph=True): differentiable ops
            parts = [_rotate_halves(dq, cos, -sin), _rotate_halves(dk, cos, -sin), dv]
            return (torch.cat([t.transpose(1, 2).flatten(2) for t in parts], dim=-1),
                    None, None, None, None, None)
        dq, dk, dv = dq.contiguous(), dk.contiguous(), dv.contiguous()
        dh = dq.new_empty(B, T, (nq + 2 * dk.shape[1]) * hs)
        native.call(kernel, [dh, dq, dk, dv, cos, sin], B, T, nq, dk.shape[1], hs)
        return dh, None, None, None, None, None


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """Rotate x: (B, nh, T, hs) by the angles (T, hs); computed in at least fp32, returned in x's
    dtype. The halves layout takes the fast path (`_RopeFn`) unless torch.func transforms or
    forward AD are active (or the angles need gradients)."""
    if not interleaved and not cos.requires_grad and not sin.requires_grad \
            and not _needs_composable_ops(x):
        return _RopeFn.apply(x, cos, sin)
    xf = at_least_fp32(x)
    if interleaved:
        pairs = xf.unflatten(-1, (-1, 2))  # (B, nh, T, hs/2, 2)
        rot = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        rot = torch.cat([-x2, x1], dim=-1)  # rotate_half
    return (xf * cos + rot * sin).to(x.dtype)
