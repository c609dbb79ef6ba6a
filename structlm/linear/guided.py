"""Wrappers around a structured layer: self-guided training (`GuidedLinear`) and pre-merge
(`PreMergedLinear`).

Self-guided training (SPEC §4): during the first G steps a dense guide `Wg: (d_out, d_in)` is mixed
in,

    y = alpha * (x Wg^T) + (1 - alpha) * f(x) + b   alpha: 1 -> 0 over G steps (set by the trainer)

so gradients reach Wg scaled by alpha and the factors by (1 - alpha). With `reduce_flop` the trainer
switches the guide off per forward with probability 1 - alpha, and the output is then the pure
structured f(x). When alpha reaches 0 the trainer unwraps the layers (`unwrap_guided`): no dense
FLOPs or parameters remain.

Pre-merge (SPEC §5): a structured map with no nonlinearity between its factors equals one dense
matrix W = f(I)^T. `PreMergedLinear` keeps both and dispatches on the number of tokens in the call:

    tokens <  max_dense_tokens  ->  x W^T + b   (one GEMM: best when latency/memory bound,
                                                 e.g. decoding)
    tokens >= max_dense_tokens  ->  f(x) + b    (fewer FLOPs: best for large batches)

The merged W is a non-persistent buffer (never saved in checkpoints), rebuilt whenever the factors
change (in-place updates by an optimizer or `load_state_dict` bump the tensors' version counters).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from structlm.linear.base import StructuredLinear


def paper_guide_init(layer: StructuredLinear) -> Tensor:
    """The reference code's guide init: exact for LowRank/BlockDense, but for BlockShuffle the
    product of the two block-diagonals WITHOUT the shuffle permutations (SPEC §4.3), which is not
    the layer's map."""
    if layer.kind == "blockshuffle":
        return torch.block_diag(*layer.blkdiag2) @ torch.block_diag(*layer.blkdiag1)  # (M, N)
    return layer.to_dense()


class GuidedLinear(nn.Module):
    """alpha * dense guide + (1 - alpha) * structured, bias added once (self-guided training)."""

    def __init__(
        self, structured: StructuredLinear, init: Literal["exact", "paper"] = "exact"
    ) -> None:
        super().__init__()
        self.structured = structured
        with torch.no_grad():
            w = structured.to_dense() if init == "exact" else paper_guide_init(structured)
        self.guide = nn.Parameter(w.detach().clone())  # (d_out, d_in), trainable
        # 0-dim tensor, not a float: a compiled model does not recompile when the trainer changes it
        self.register_buffer("alpha", torch.ones(()), persistent=False)
        self.use_guide = True  # False when reduce_flop skips the guide for this forward

    def forward(self, x: Tensor) -> Tensor:
        s = self.structured.matmul(x)
        if self.use_guide:
            a = self.alpha.to(s.dtype)
            s = a * F.linear(x, self.guide).to(s.dtype) + (1 - a) * s
        b = self.structured.bias
        return s if b is None else s + b.to(s.dtype)

    def extra_repr(self) -> str:
        return f"alpha={float(self.alpha):.4f}, use_guide={self.use_guide}"


def guided_layers(model: nn.Module) -> list[GuidedLinear]:
    return [m for m in model.modules() if isinstance(m, GuidedLinear)]


def wrap_guided(model: nn.Module, init: Literal["exact", "paper"] = "exact") -> list[GuidedLinear]:
    """Wrap every non-dense StructuredLinear of `model` in a GuidedLinear, in place; returns the
    wrappers."""
    return _replace(model, lambda m: GuidedLinear(m, init) if _is_structured(m) else None)


def unwrap_guided(model: nn.Module) -> list[nn.Parameter]:
    """Replace every GuidedLinear by its structured layer, in place; returns the removed guide
    parameters."""
    guides = [g.guide for g in guided_layers(model)]
    _replace(model, lambda m: m.structured if isinstance(m, GuidedLinear) else None)
    return guides


def set_guide(model: nn.Module, alpha: float, active: list[bool] | None = None) -> None:
    """Set alpha (and, under reduce_flop, which guides run in the next forward) on every
    GuidedLinear."""
    for i, g in enumerate(guided_layers(model)):
        g.alpha.fill_(alpha)
        g.use_guide = True if active is None else active[i]


class PreMergedLinear(nn.Module):
    """A structured layer plus its merged dense matrix; dispatches on the token count of each
    call."""

    def __init__(self, structured: StructuredLinear, max_dense_tokens: int) -> None:
        super().__init__()
        self.structured = structured
        self.max_dense_tokens = max_dense_tokens
        self.register_buffer("merged", torch.empty(0), persistent=False)
        self._versions: tuple[int, ...] | None = None

    @torch.no_grad()
    def refresh(self) -> None:
        """Rebuild the merged matrix from the factors, in their dtype (never under autocast)."""
        w = self.structured.weights()[0]
        with torch.autocast(device_type=w.device.type, enabled=False):
            self.merged = self.structured.to_dense().detach()  # (d_out, d_in)
        self._versions = self._current_versions()

    def _current_versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.structured.parameters())

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.numel() // x.shape[-1]
        if tokens >= self.max_dense_tokens or (self.training and torch.is_grad_enabled()):
            return self.structured(x)  # large calls, and training: gradients must reach the factors
        if self._versions != self._current_versions() or self.merged.device != x.device:
            self.refresh()
        return F.linear(x, self.merged, self.structured.bias)

    def extra_repr(self) -> str:
        return f"max_dense_tokens={self.max_dense_tokens}"


def premerge(model: nn.Module, max_dense_tokens: int | dict[tuple, int]) -> nn.Module:
    """Wrap every non-dense StructuredLinear in a PreMergedLinear, in place. `max_dense_tokens` is
    one threshold, or a dict keyed by `layer_key(layer)` (from calibration); returns the model."""

    def wrap(m: nn.Module):
        if not _is_structured(m):
            return None
        t = (
            max_dense_tokens
            if isinstance(max_dense_tokens, int)
            else max_dense_tokens[layer_key(m)]
        )
        return PreMergedLinear(m, t)

    _replace(model, wrap)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `premerge`, in place."""
    _replace(model, lambda m: m.structured if isinstance(m, PreMergedLinear) else None)
    return model


def merge_linears(model: nn.Module) -> nn.Module:
    """A copy of `model` in which every non-dense StructuredLinear is an nn.Linear holding
    `to_dense()`."""
    model = copy.deepcopy(model)

    def to_linear(m: nn.Module):
        if not _is_structured(m):
            return None
        w = m.weights()[0]
        lin = nn.Linear(m.d_in, m.d_out, bias=m.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(m.to_dense())
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        return lin

    _replace(model, to_linear)
    return model


def layer_key(m: StructuredLinear) -> tuple:
    """What a pre-merge threshold depends on besides the device: the kind, the shape, the
    hyper-parameters."""
    return (m.kind, m.d_in, m.d_out, tuple(sorted(m.hp.items())))


def _is_structured(m: nn.Module) -> bool:
    return isinstance(m, StructuredLinear) and m.kind != "dense"


def _replace(model: nn.Module, fn) -> list[nn.Module]:
    """Replace every submodule m for which fn(m) is not None by fn(m); returns the replacements.
    The insides of wrappers are left alone, so wrapping twice does not nest."""
    out = []
    for parent in list(model.modules()):
        if isinstance(parent, GuidedLinear | PreMergedLinear):
            continue
        for name, child in list(parent.named_children()):
            new = fn(child)
            if new is not None:
                setattr(parent, name, new)
                out.append(new)
    return out
