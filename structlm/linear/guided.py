"""Self-guided training's layer (`GuidedLinear`) and its converters (docs/method.md §4).

During the first G steps a dense guide `Wg: (d_out, d_in)` is mixed into every structured layer,

    y = alpha * (x Wg^T) + (1 - alpha) * f(x) + b   alpha: 1 -> 0 over G steps (set by the trainer)

so gradients reach Wg scaled by alpha and the factors by (1 - alpha). With `reduce_flop` the trainer
switches the guide off per forward with probability 1 - alpha, and the output is then the pure
structured f(x). When alpha reaches 0 the trainer unwraps the layers: no dense FLOPs or parameters
remain.

    wrap_guided(model)     every structured layer of any nn.Module -> GuidedLinear, in place
    unwrap_guided(model)   the inverse (take guide_parameters(model) first: their AdamW state)
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from structlm.linear.base import StructuredLinear
from structlm.linear.replace import Patterns, Wrapper, is_structured, replace_modules


class GuidedLinear(Wrapper):
    """alpha * dense guide + (1 - alpha) * structured, bias added once (self-guided training)."""

    def __init__(
        self, structured: StructuredLinear, init: Literal["exact", "paper"] = "exact",
        weight: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.structured = structured
        with torch.no_grad():
            if weight is not None:  # e.g. the dense weights a converted layer was projected from
                _check_guide(weight, structured)
                w = weight.to(structured.weights()[0])
            else:
                w = structured.to_dense() if init == "exact" else structured.paper_guide_init()
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

    def unwrap(self) -> StructuredLinear:
        return self.structured

    def extra_repr(self) -> str:
        return f"alpha={float(self.alpha):.4f}, use_guide={self.use_guide}"


def _check_guide(weight: Tensor, layer: StructuredLinear) -> None:
    want = (layer.d_out, layer.d_in)
    if tuple(weight.shape) != want:
        raise ValueError(f"a guide of shape {tuple(weight.shape)} for a {layer.d_in} -> "
                         f"{layer.d_out} layer: guides are (d_out, d_in) = {want}, as "
                         "nn.Linear.weight (a transformers Conv1D stores its weight transposed: "
                         "pass conv.weight.T)")


def guided_layers(model: nn.Module) -> list[GuidedLinear]:
    """The model's GuidedLinear layers, in `model.modules()` order (the order guide draws use)."""
    return [m for m in model.modules() if isinstance(m, GuidedLinear)]


def guide_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The dense guides of the model's GuidedLinear layers."""
    return [g.guide for g in guided_layers(model)]


def wrap_guided(
    model: nn.Module, init: Literal["exact", "paper"] = "exact", *,
    guides: dict[str, Tensor] | None = None, include: Patterns = None, exclude: Patterns = None,
) -> nn.Module:
    """Wrap every structured (non-dense) StructuredLinear of `model` whose name matches in a
    GuidedLinear, in place; `guides` gives some layers (by qualified name) their guide's starting
    matrix, e.g. the dense weights they were converted from. Returns the model."""
    guides = guides or {}
    structured = {name for name, m in model.named_modules() if is_structured(m)}
    if unknown := sorted(set(guides) - structured):
        raise ValueError(
            f"guides for {len(unknown)} name(s) that are no structured layer of this model "
            f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}); its structured "
            f"layers are named like {min(structured, default='(none)')}: the guides would be "
            "ignored and the model would start away from the dense function")

    def wrap(name: str, m: nn.Module) -> nn.Module | None:
        return GuidedLinear(m, init, guides.get(name)) if is_structured(m) else None

    replace_modules(model, wrap, include, exclude)
    return model


def unwrap_guided(model: nn.Module) -> nn.Module:
    """Replace every GuidedLinear by its structured layer, in place; returns the model."""
    replace_modules(model, lambda _, m: m.unwrap() if isinstance(m, GuidedLinear) else None)
    return model


def set_guide(model: nn.Module, alpha: float, active: list[bool] | None = None) -> None:
    """Set alpha (and, under reduce_flop, which guides run in the next forward) on every
    GuidedLinear."""
    for i, g in enumerate(guided_layers(model)):
        g.alpha.fill_(alpha)
        g.use_guide = True if active is None else active[i]
