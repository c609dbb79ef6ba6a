"""The tanh-approximated GELU (GPT-2's and the paper's activation) in one pass each way on CPU.

    gelu(x) = x/2 (1 + tanh(c (x + a x^3))) = x sigmoid(2c (x + a x^3)),  c = sqrt(2/pi),
                                                                           a = 0.044715

The two forms are the same function. PyTorch's CPU kernel for the tanh form is several times
slower than its erf GELU, and on a small CPU costs about as much as the GEMMs a 32%-structured
FFN saves; our kernel (csrc/gelu.c: the sigmoid form, vectorised by the compiler, on PyTorch's
OpenMP threads; AVX512 intrinsics for bf16 where the CPU has AVX512-BF16) is the fast path
(measured in BENCHMARKS.md).
Both compute in fp32 and round once: in fp32 they agree to 5e-7, in bf16 one output in ~10^4
differs, by one unit, mostly at x < -4, where the tanh form rounds to -0 and the sigmoid form
keeps the tiny true value.

`gelu_tanh` uses our kernel for contiguous fp32/bf16 CPU tensors and PyTorch's elsewhere (on CUDA
that kernel is memory-bound already). STRUCTLM_GELU=aten picks PyTorch's kernel everywhere. Where
the kernel cannot be built (no C compiler) structlm.native warns once and PyTorch's kernel runs.
Inside a torch.compile'd model the sigmoid form is traced as torch ops, which Inductor fuses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from structlm.ops import native

GELU_ENV = native.SWITCHES["gelu"]
_K1 = 2 * 0.7978845608028654  # 2c
_K3 = _K1 * 0.044715  # 2ca


def sigmoid_form(x: Tensor) -> Tensor:
    """The same GELU as torch ops (fp32 inside): what torch.compile traces."""
    xf = x.float()
    return (xf * torch.sigmoid(xf * (_K1 + _K3 * xf * xf))).to(x.dtype)


def _kernel(direction: str, x: Tensor):
    return native.kernel("gelu", f"gelu_{direction}_{native.SUFFIX[x.dtype]}", GELU_ENV)


class _NativeGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # x: flat, contiguous
        ctx.save_for_backward(x)
        y = torch.empty_like(x)
        native.call(_kernel("fwd", x), [x, y], x.numel())
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        dx = torch.empty_like(x)
        native.call(_kernel("bwd", x), [x, grad.contiguous(), dx], x.numel())
        return dx


def _use_native(x: Tensor) -> bool:
    return (native.enabled(GELU_ENV) and x.device.type == "cpu" and x.dtype in native.SUFFIX
            and x.is_contiguous() and x.numel() > 0 and _kernel("fwd", x) is not None)


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation, fp32 arithmetic, output in x's dtype (any shape)."""
    if torch.compiler.is_compiling():
        return sigmoid_form(x)
    if not _use_native(x):
        return F.gelu(x, approximate="tanh")
    return _NativeGelu.apply(x.view(-1)).view(x.shape)
