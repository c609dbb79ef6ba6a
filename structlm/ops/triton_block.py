"""A block-diagonal product whose operands are addressed through index maps, as Triton kernels:
the GPU path of both block kinds, with BlockShuffle's two permutations folded into the loads and
stores instead of materialised as copies.

    y[t, ob*k + os*i] = sum_c x[t, ib*k + is*c] * w[k, i, c]  (+ bias[ob*k + os*i])
    x (T, N), w (B, q, p), in map (ib, is), out map (ob, os), y (T, M)

A plain block-diagonal product is the map (p, 1) -> (q, 1). BlockShuffle's second factor reads
z_j[i] = h[i*B + j] and writes y[i*B + j] = u_j[i]: both are the map (1, B), so the whole layer is
two launches and no copies. The backward is the same kernel (dx: w transposed, the maps swapped)
and a second one for dw (a reduction over tokens per block).

Triton is an optional extra, imported on first use; `TRITON_INTERPRET=1` runs the kernels on CPU
tensors (how the test suite checks them). `kernels.use_triton` decides where they are used.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

Map = tuple[int, int]  # (block step, element step): block k, element c -> k*step + c*elem


@functools.cache
def _kernels(interpret: bool) -> tuple:
    """(forward/dx kernel, dw kernel), jitted once per mode (TRITON_INTERPRET is read when a
    kernel is decorated)."""
    import triton
    import triton.language as tl

    @triton.jit
    def block_mm(x, w, b, y, T, P, Q, sxt, swk, swq, swp, syt, ib, ie, ob, oe,
                 HAS_BIAS: tl.constexpr, PREC: tl.constexpr, F64: tl.constexpr, UP: tl.constexpr,
                 BT: tl.constexpr, BQ: tl.constexpr, BP: tl.constexpr):
        # y[t, ob*k + oe*i] = sum_c x[t, ib*k + ie*c] w[k, i, c]: one (BT, BQ) tile of block k
        k = tl.program_id(2)
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        i = tl.program_id(1) * BQ + tl.arange(0, BQ)
        if F64:  # noqa: SIM108 (a constexpr branch); fp64 accumulates in fp64, the rest in fp32
            acc = tl.zeros((BT, BQ), dtype=tl.float64)
        else:
            acc = tl.zeros((BT, BQ), dtype=tl.float32)
        for c0 in range(0, P, BP):
            c = c0 + tl.arange(0, BP)
            xt = tl.load(x + t[:, None] * sxt + (ib * k + ie * c)[None, :],
                         mask=(t[:, None] < T) & (c[None, :] < P), other=0.0)  # (BT, BP)
            wt = tl.load(w + k * swk + i[None, :] * swq + c[:, None] * swp,
                         mask=(i[None, :] < Q) & (c[:, None] < P), other=0.0)  # (BP, BQ)
            if UP:  # the interpreter's bf16 dot is wrong: it multiplies in fp32 instead
                xt, wt = xt.to(tl.float32), wt.to(tl.float32)
            acc = tl.dot(xt, wt, acc, input_precision=PREC)
        col = ob * k + oe * i  # (BQ,)
        if HAS_BIAS:
            acc += tl.load(b + col, mask=i < Q, other=0.0).to(acc.dtype)[None, :]
        tl.store(y + t[:, None] * syt + col[None, :], acc.to(y.dtype.element_ty),
                 mask=(t[:, None] < T) & (i[None, :] < Q))

    @triton.jit
    def block_mm_dw(dy, x, dw, T, P, Q, sdt, sxt, swk, swq, swp, ib, ie, ob, oe,
                    PREC: tl.constexpr, F64: tl.constexpr, UP: tl.constexpr,
                    BT: tl.constexpr, BQ: tl.constexpr, BP: tl.constexpr):
        # dw[k, i, c] = sum_t dy[t, ob*k + oe*i] x[t, ib*k + ie*c]: one (BQ, BP) tile of block k
        k = tl.program_id(2)
        i = tl.program_id(0) * BQ + tl.arange(0, BQ)
        c = tl.program_id(1) * BP + tl.arange(0, BP)
        if F64:  # noqa: SIM108
            acc = tl.zeros((BQ, BP), dtype=tl.float64)
        else:
            acc = tl.zeros((BQ, BP), dtype=tl.float32)
        for t0 in range(0, T, BT):
            t = t0 + tl.arange(0, BT)
            gt = tl.load(dy + t[None, :] * sdt + (ob * k + oe * i)[:, None],
                         mask=(t[None, :] < T) & (i[:, None] < Q), other=0.0)  # (BQ, BT)
            xt = tl.load(x + t[:, None] * sxt + (ib * k + ie * c)[None, :],
                         mask=(t[:, None] < T) & (c[None, :] < P), other=0.0)  # (BT, BP)
            if UP:
                gt, xt = gt.to(tl.float32), xt.to(tl.float32)
            acc = tl.dot(gt, xt, acc, input_precision=PREC)
        tl.store(dw + k * swk + i[:, None] * swq + c[None, :] * swp, acc.to(dw.dtype.element_ty),
                 mask=(i[:, None] < Q) & (c[None, :] < P))

    return block_mm, block_mm_dw


_TILE = dict(BT=64, BQ=64, BP=32)  # tl.dot needs every tile dimension >= 16


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _precision(x: Tensor) -> str:
    """fp32 products as torch computes them: tf32 only where torch allows it."""
    return "tf32" if x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _dtype_args(x: Tensor, interpret: bool) -> dict:
    return dict(PREC=_precision(x), F64=x.dtype == torch.float64,
                UP=interpret and x.dtype == torch.bfloat16)


def _launch_mm(x: Tensor, w: Tensor, bias: Tensor | None, in_map: Map, out_map: Map,
               m: int) -> Tensor:
    """x (T, N), w viewed (B, Q, P) through its strides -> y (T, m) by the maps."""
    nb, q, p = w.shape
    y = x.new_empty(x.shape[0], m)
    grid = (_cdiv(x.shape[0], _TILE["BT"]), _cdiv(q, _TILE["BQ"]), nb)
    interpret = _interpreting()
    _kernels(interpret)[0][grid](
        x, w, bias if bias is not None else x, y, x.shape[0], p, q, x.stride(0), *w.stride(),
        y.stride(0), *in_map, *out_map, HAS_BIAS=bias is not None, **_dtype_args(x, interpret),
        **_TILE)
    return y


def _launch_dw(dy: Tensor, x: Tensor, shape: torch.Size, in_map: Map, out_map: Map) -> Tensor:
    nb, q, p = shape
    dw = x.new_empty(shape)
    grid = (_cdiv(q, _TILE["BQ"]), _cdiv(p, _TILE["BP"]), nb)
    interpret = _interpreting()
    _kernels(interpret)[1][grid](dy, x, dw, x.shape[0], p, q, dy.stride(0), x.stride(0),
                                 *dw.stride(), *in_map, *out_map, **_dtype_args(x, interpret),
                                 **_TILE)
    return dw


class _MappedBlockFn(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, w: Tensor, bias: Tensor | None, in_map: Map, out_map: Map) -> Tensor:
        return _launch_mm(x, w, bias, in_map, out_map, w.shape[0] * w.shape[1])

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        x, w, bias, ctx.in_map, ctx.out_map = inputs
        ctx.save_for_backward(x, w)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple:
        x, w = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # backward(create_graph=True): a differentiable backward
            dx, dw = _backward_composable(dy, x, w, ctx.in_map, ctx.out_map)
        else:
            dy = dy.contiguous()
            dx = _launch_mm(dy, w.transpose(1, 2), None, ctx.out_map, ctx.in_map, x.shape[1]) \
                if need_dx else None
            dw = _launch_dw(dy, x, w.shape, ctx.in_map, ctx.out_map) if need_dw else None
        db = dy.sum(0) if ctx.has_bias and need_db else None
        return dx if need_dx else None, dw if need_dw else None, db, None, None


def _columns(m: Map, nb: int, n: int) -> Tensor:
    """The columns (block k, element c) address, block-major: (nb*n,)."""
    k, c = torch.arange(nb)[:, None], torch.arange(n)[None, :]
    return (m[0] * k + m[1] * c).reshape(-1)


def _backward_composable(dy: Tensor, x: Tensor, w: Tensor, in_map: Map,
                         out_map: Map) -> tuple[Tensor, Tensor]:
    """(dx, dw) from differentiable ops (gathers and einsums), for double backward."""
    nb, q, p = w.shape
    cols_in = _columns(in_map, nb, p).to(x.device)
    cols_out = _columns(out_map, nb, q).to(x.device)
    dyb = dy[:, cols_out].view(-1, nb, q)  # (T, B, q)
    xb = x[:, cols_in].view(-1, nb, p)  # (T, B, p)
    dxb = torch.einsum("tkq,kqp->tkp", dyb, w).reshape(-1, nb * p)
    dx = dxb.new_zeros(x.shape).index_copy(1, cols_in, dxb)
    return dx, torch.einsum("tkq,tkp->kqp", dyb, xb)


def mapped_block_matmul(x: Tensor, w: Tensor, bias: Tensor | None, in_map: Map,
                        out_map: Map) -> Tensor:
    """x (T, N), w (B, q, p), bias (B*q,) in output-column order -> (T, B*q) by the module
    docstring's formula. The maps must be a bijection onto the columns (every column of x read by
    exactly one (block, element), every column of y written once)."""
    return _MappedBlockFn.apply(x.contiguous(), w.contiguous(), bias, in_map, out_map)


def block_diag_matmul_triton(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """blockdiag(w) x + bias, x (T, B*p), w (B, q, p): one launch over all blocks."""
    nb, q, p = w.shape
    return mapped_block_matmul(x, w, bias, (p, 1), (q, 1))


def blockshuffle_matmul_triton(x: Tensor, blkdiag1: Tensor, blkdiag2: Tensor,
                               bias: Tensor | None = None) -> Tensor:
    """BlockShuffle in two launches: x (T, B*p) -> h (T, B*q) plain; h -> y (T, B*s) with the
    shuffle in the second product's loads (z_j[i] = h[i*B + j]) and the un-shuffle in its stores
    (y[i*B + j] = u_j[i]); the bias is added in y's own order."""
    nb, q, p = blkdiag1.shape
    h = mapped_block_matmul(x, blkdiag1, None, (p, 1), (q, 1))  # (T, B*q)
    return mapped_block_matmul(h, blkdiag2, bias, (1, nb), (1, nb))  # (T, B*s)
