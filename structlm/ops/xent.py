"""Next-token cross-entropy without materializing fp32 log-probabilities.

    cross_entropy(logits, targets)   logits (N, V) any float dtype, targets (N,) -> mean loss

The same value and gradient as `F.cross_entropy(logits.float(), targets)` (ignore_index -100, mean
over the rows that are not ignored), computed in at least fp32 over chunks of rows that stay in
cache: the forward keeps only each row's log-sum-exp; the backward writes
`(softmax(row) - onehot(target)) * grad / n` in the logits' dtype in one pass per chunk (on a
CPU, for fp32 and bf16 logits, one pass over all rows in our kernel, csrc/xent.c, on PyTorch's
OpenMP threads; STRUCTLM_CROSS_ENTROPY=aten keeps the torch ops). It
replaces the composed path (a bf16 -> fp32 copy of the logits, log_softmax, nll's zero-filled
gradient, log_softmax's backward, the cast back), holding two fp32 (N, V) tensors less. On a CPU
the step time is unchanged where freed memory is reused (the CLI's malloc setting) and ~30%
shorter where it is not; BENCHMARKS.md has the A/B. A backward that records a graph
(create_graph=True) goes through differentiable ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from structlm.ops import native
from structlm.ops.blocks import _needs_composable_ops

IGNORE_INDEX = -100
XENT_ENV = native.SWITCHES["xent"]  # native (csrc/xent.c, CPU fp32/bf16) or aten
CHUNK_ELEMENTS = 1 << 21  # rows per chunk: ~8 MB of fp32, cache-resident on a CPU


def _compute_dtype(logits: Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


def _chunks(n: int, vocab: int):
    rows = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    return ((s, min(s + rows, n)) for s in range(0, n, rows))


def _kernel(direction: str, logits: Tensor):
    """Our one-pass kernel (csrc/xent.c) for contiguous fp32/bf16 CPU logits, else None."""
    if (logits.device.type != "cpu" or logits.dtype not in native.SUFFIX
            or not logits.is_contiguous() or torch.compiler.is_compiling()):
        return None
    return native.kernel("xent", f"xent_{direction}_{native.SUFFIX[logits.dtype]}", XENT_ENV)


class _CrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        n, vocab = logits.shape
        dt = _compute_dtype(logits)
        lse = torch.empty(n, dtype=dt, device=logits.device)  # (N,)
        kernel = _kernel("lse", logits)
        if kernel is not None:
            native.call(kernel, [logits, lse], n, vocab)
        else:
            for s, e in _chunks(n, vocab):
                lse[s:e] = torch.logsumexp(logits[s:e].to(dt), dim=1)
        valid = targets != IGNORE_INDEX  # (N,)
        safe = torch.where(valid, targets, 0)
        picked = logits.gather(1, safe[:, None]).squeeze(1).to(dt)  # (N,)
        count = valid.sum()
        ctx.save_for_backward(logits, safe, valid, lse, count)
        return torch.where(valid, lse - picked, 0).sum() / count

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        logits, safe, valid, lse, count = ctx.saved_tensors
        dt = lse.dtype
        scale = (grad.to(dt) / count) * valid.to(dt)  # (N,): 0 on ignored rows
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops
            p = torch.softmax(logits.to(dt), dim=1) - F.one_hot(safe, logits.shape[1]).to(dt)
            return (p * scale[:, None]).to(logits.dtype), None
        out = torch.empty_like(logits)  # (N, V)
        kernel = _kernel("grad", logits)
        if kernel is not None:
            native.call(kernel, [logits, lse, safe.long().contiguous(), scale.contiguous(), out],
                        *logits.shape)
            return out, None
        for s, e in _chunks(*logits.shape):
            p = logits[s:e].to(dt, copy=True).sub_(lse[s:e, None]).exp_()  # the rows softmax
            p.scatter_add_(1, safe[s:e, None], -torch.ones(e - s, 1, dtype=dt, device=p.device))
            out[s:e] = p.mul_(scale[s:e, None])
        return out, None


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of logits (N, V) against targets (N,), ignoring IGNORE_INDEX; the fp32
    value of `F.cross_entropy(logits.float(), targets)` (fp64 stays fp64)."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: logits (N, V) and targets (N,), got {tuple(logits.shape)}"
                         f" and {tuple(targets.shape)}")
    if _needs_composable_ops(logits):  # vmap/grad/jvp, forward AD: the composable op
        return F.cross_entropy(logits.to(_compute_dtype(logits)), targets)
    return _CrossEntropyFn.apply(logits, targets)
