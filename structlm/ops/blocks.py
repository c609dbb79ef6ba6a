"""The block-diagonal kernels both block kinds (BlockShuffle, BlockDense) are built from.

    block_diag_matmul(x, w, bias)    x (T, B*p), w (B, q, p) -> (T, B*q), block k from block k
    transpose_within_rows(x, a, b)   each row of x (T, a*b) read as (a, b), transposed: (T, b*a)

Each op exists three ways: an eager autograd.Function with a hand-written backward (the fast path),
a torch.library custom op with a fake kernel (what torch.compile traces), and a path from
composable ops (einsum/reshape: for torch.func transforms, forward AD and double backward). On
CUDA with Triton installed, a fourth: Triton kernels (`triton_block`) that fold BlockShuffle's
permutations into their loads and stores (`use_triton` decides). On CPU the within-row shuffle
of a block count 2-16 is csrc/shuffle.c's kernel (faster than PyTorch's strided copy,
BENCHMARKS.md; STRUCTLM_SHUFFLE=aten for PyTorch's). FLOP formulas for the custom ops
are registered with torch.utils.flop_counter, so FlopCounterMode counts them as it counts mm.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from structlm.ops import native, triton_block

SHUFFLE_ENV = native.SWITCHES["shuffle"]
_SHUFFLE_BLOCKS = (2, 4, 8, 16)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls on `x` run in: the autocast dtype inside an autocast region (which, like
    autocast, leaves fp64 alone), else x's."""
    dev = x.device.type
    if (
        x.is_floating_point()
        and x.dtype != torch.float64
        and torch.amp.is_autocast_available(dev)  # not on the meta device
        and torch.is_autocast_enabled(dev)
    ):
        return torch.get_autocast_dtype(dev)
    return x.dtype


# Row-layout block-diagonal product: y[:, k*q:(k+1)*q] = x[:, k*p:(k+1)*p] @ w[k].T (+ b).
# One mm per block that reads its operands and writes its result as column slices of the
# (T, features) activations: GEMMs take a row stride as it is, so nothing is transposed or copied,
# forward or backward. (bmm wants block-major (B, T, p) operands: the transposes around it, and the
# copies CPU bf16 bmm makes of strided operands in autograd's backward, cost as much as the
# products did; BENCHMARKS.md.)
# Each op is a plain function, run eagerly through a small autograd.Function, and registered as a
# custom op for torch.compile, which cannot trace an mm into a strided out= (and generated a
# slower copy for the shuffle). Eager skips the custom-op wrapper: its per-call overhead is
# noticeable on a 1-token BlockShuffle FFN.


def _block_diag_fwd(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    nb, q, p = w.shape
    y = x.new_empty(x.shape[0], nb * q)  # (T, B*q)
    for k in range(nb):
        xk, yk = x[:, k * p:(k + 1) * p], y[:, k * q:(k + 1) * q]  # (T, p), (T, q) views
        if bias is None:
            torch.mm(xk, w[k].t(), out=yk)
        else:
            torch.addmm(bias[k * q:(k + 1) * q], xk, w[k].t(), out=yk)
    return y


def _block_diag_bwd(
    dy: Tensor, x: Tensor, w: Tensor, need_dx: bool, need_dw: bool
) -> tuple[Tensor, Tensor]:
    """(dx, dw); an unneeded one comes back empty."""
    nb, q, p = w.shape
    dy = dy.contiguous()  # (T, B*q); a column stride other than 1 would make every mm copy
    dx = x.new_empty(x.shape if need_dx else (0,))  # (T, B*p)
    dw = w.new_empty(w.shape if need_dw else (0,))  # (B, q, p)
    for k in range(nb):
        dyk, xk = dy[:, k * q:(k + 1) * q], x[:, k * p:(k + 1) * p]
        if need_dw:
            torch.mm(dyk.t(), xk, out=dw[k])  # (q, T) @ (T, p)
        if need_dx:
            torch.mm(dyk, w[k], out=dx[:, k * p:(k + 1) * p])  # (T, q) @ (q, p)
    return dx, dw


def _native_shuffle(x: Tensor, a: int, b: int):
    """csrc/shuffle.c's kernel for this transpose with its row length s, or None: on CPU, 2- or
    4-byte elements, one side a block count of 2, 4, 8 or 16 (STRUCTLM_SHUFFLE=aten: never)."""
    width = {2: "uint16_t", 4: "uint32_t"}.get(x.element_size())
    if (x.device.type != "cpu" or width is None or not x.is_contiguous() or x.numel() == 0
            or not native.enabled(SHUFFLE_ENV)):
        return None
    if a not in _SHUFFLE_BLOCKS and b not in _SHUFFLE_BLOCKS:
        return None
    name, s = (f"interleave_{a}", b) if a in _SHUFFLE_BLOCKS else (f"deinterleave_{b}", a)
    fn = native.kernel("shuffle", f"{name}_{width}", SHUFFLE_ENV)
    return None if fn is None else (fn, s)


def _transpose_rows(x: Tensor, a: int, b: int) -> Tensor:
    y = x.new_empty(x.shape[0], b * a)  # always a new tensor: a custom op's output may not alias
    kernel = _native_shuffle(x, a, b)
    if kernel is None:
        y.view(-1, b, a).copy_(x.view(-1, a, b).transpose(1, 2))
    else:
        fn, s = kernel
        native.call(fn, [x, y], x.numel(), s)
    return y


def _block_diag_composable(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """The same product from composable ops (no out=): for torch.func transforms and forward AD."""
    nb, q, p = w.shape
    y = torch.einsum("tkp,kqp->tkq", x.reshape(-1, nb, p), w).reshape(-1, nb * q)
    return y if bias is None else y + bias


def _block_diag_bwd_composable(dy: Tensor, x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """(dx, dw) from composable ops: differentiable, for a backward that records a graph."""
    nb, q, p = w.shape
    dyb, xb = dy.reshape(-1, nb, q), x.reshape(-1, nb, p)
    return torch.einsum("tkq,kqp->tkp", dyb, w).reshape(x.shape), torch.einsum(
        "tkq,tkp->kqp", dyb, xb
    )


def _needs_composable_ops(*ts: Tensor | None) -> bool:
    """Under torch.func transforms (vmap, jvp, grad) or with forward-AD dual tensors: the fast
    paths write into out= buffers, which neither supports."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    if active is not None and active():
        return True
    return any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in ts)


def _block_diag_setup(ctx, inputs: tuple, output: Tensor) -> None:
    x, w, bias = inputs
    ctx.save_for_backward(x, w)
    ctx.has_bias = bias is not None


def _block_diag_grad(ctx, dy: Tensor, bwd=_block_diag_bwd) -> tuple:
    x, w = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad
    if torch.is_grad_enabled():  # backward(create_graph=True): a differentiable backward
        dx, dw = _block_diag_bwd_composable(dy, x, w)
    else:
        dx, dw = bwd(dy, x, w, need_dx, need_dw)
    db = dy.sum(0) if ctx.has_bias and need_db else None
    return dx if need_dx else None, dw if need_dw else None, db


def _transpose_rows_setup(ctx, inputs: tuple, output: Tensor) -> None:
    _, ctx.a, ctx.b = inputs


class _BlockDiagFn(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        return _block_diag_fwd(x, w, bias)

    setup_context = staticmethod(_block_diag_setup)
    backward = staticmethod(_block_diag_grad)


class _TransposeRowsFn(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, a: int, b: int) -> Tensor:
        return _transpose_rows(x, a, b)

    setup_context = staticmethod(_transpose_rows_setup)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, None, None]:
        return _TransposeRowsFn.apply(dy, ctx.b, ctx.a), None, None


# the same three functions as custom ops, for torch.compile
_block_diag_op = torch.library.custom_op(
    "structlm::block_diag_mm", _block_diag_fwd, mutates_args=()
)
_block_diag_bwd_op = torch.library.custom_op(
    "structlm::block_diag_mm_backward", _block_diag_bwd, mutates_args=()
)
_transpose_rows_op = torch.library.custom_op(
    "structlm::transpose_within_rows", _transpose_rows, mutates_args=()
)


@_block_diag_op.register_fake
def _(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[0] * w.shape[1])


@_block_diag_bwd_op.register_fake
def _(dy: Tensor, x: Tensor, w: Tensor, need_dx: bool, need_dw: bool) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape if need_dx else (0,)), w.new_empty(w.shape if need_dw else (0,))


@_transpose_rows_op.register_fake
def _(x: Tensor, a: int, b: int) -> Tensor:
    return x.new_empty(x.shape[0], b * a)


_block_diag_op.register_autograd(
    lambda ctx, dy: _block_diag_grad(ctx, dy, bwd=_block_diag_bwd_op),
    setup_context=_block_diag_setup,
)
_transpose_rows_op.register_autograd(
    lambda ctx, dy: (_transpose_rows_op(dy, ctx.b, ctx.a), None, None),
    setup_context=_transpose_rows_setup,
)


@register_flop_formula(torch.ops.structlm.block_diag_mm)
def _block_diag_flops(x_shape, w_shape, bias_shape, out_shape=None, **kwargs) -> int:
    """2 per multiply-add, bias ignored: what FlopCounterMode counts for the mm's inside."""
    return 2 * x_shape[0] * w_shape[0] * w_shape[1] * w_shape[2]


@register_flop_formula(torch.ops.structlm.block_diag_mm_backward)
def _block_diag_bwd_flops(
    dy_shape, x_shape, w_shape, need_dx, need_dw, out_shape=None, **kwargs
) -> int:
    return (int(need_dx) + int(need_dw)) * _block_diag_flops(x_shape, w_shape, None)


def transpose_within_rows(x: Tensor, a: int, b: int) -> Tensor:
    """x (T, a*b), each row read as an (a, b) matrix -> (T, b*a), each row that matrix transposed:
    y[t, j*a + i] = x[t, i*b + j]. One copy."""
    if torch.compiler.is_compiling():
        return _transpose_rows_op(x, a, b)
    if _needs_composable_ops(x):
        return x.reshape(-1, a, b).transpose(1, 2).reshape(-1, b * a)
    if torch.is_grad_enabled() and x.requires_grad:
        return _TransposeRowsFn.apply(x, a, b)
    return _transpose_rows(x, a, b)


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(*ts: Tensor | None) -> bool:
    """Whether the block products of these operands run as Triton kernels. STRUCTLM_TRITON=auto
    (default): on CUDA tensors when Triton is installed; 1: on any tensors (CPU tensors need
    TRITON_INTERPRET=1, the interpreter); 0: never. Never under torch.compile (which traces the
    custom ops), torch.func transforms or forward AD."""
    mode = os.environ.get("STRUCTLM_TRITON", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"STRUCTLM_TRITON={mode!r}: use auto, 1 or 0")
    if mode == "0" or torch.compiler.is_compiling() or _needs_composable_ops(*ts):
        return False
    if mode == "1" and not _triton_installed():
        raise ModuleNotFoundError("STRUCTLM_TRITON=1 but Triton is not installed: pip install "
                                  "triton (or unset STRUCTLM_TRITON)")
    return mode == "1" or (ts[0].is_cuda and _triton_installed())


def cast_operands(x: Tensor, *ts: Tensor | None) -> list[Tensor | None]:
    """x and the weights in the dtype the product runs in (`compute_dtype`): inside autocast a
    cast through autograd, so the gradients reach the fp32 parameters, as autocast does for mm."""
    dtype = compute_dtype(x)
    return [None if t is None else t.to(dtype) for t in (x, *ts)]


def block_diag_matmul(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """blockdiag(w) applied to the last axis of x, plus bias: x (..., B*p), w (B, q, p),
    bias (B*q,) -> (..., B*q), block k of the output from block k of the input.

    Inside autocast the operands are cast to the autocast dtype first (through autograd, so the
    gradients reach the fp32 parameters), as autocast does for mm. Double backward, torch.func
    transforms and forward AD work (through composable ops, slower)."""
    nb, q, p = w.shape
    lead = x.shape[:-1]
    x2, w2, b = cast_operands(x.reshape(-1, nb * p), w, bias)
    if use_triton(x2, w2, b):
        y = triton_block.block_diag_matmul_triton(x2, w2, b)
    elif torch.compiler.is_compiling():
        y = _block_diag_op(x2, w2, b)
    elif _needs_composable_ops(x2, w2, b):
        y = _block_diag_composable(x2, w2, b)
    elif torch.is_grad_enabled() and (x2.requires_grad or w2.requires_grad or bias is not None
                                      and bias.requires_grad):
        y = _BlockDiagFn.apply(x2, w2, b)
    else:  # inference: no graph to record, skip autograd.Function's call overhead
        y = _block_diag_fwd(x2, w2, b)
    return y.view(*lead, nb * q)
