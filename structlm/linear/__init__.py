"""Structured linear maps for FFN layers: the interface, the kinds, the registry, the converters.

    base.py        StructuredLinear: what every kind declares and shares
    registry.py    LINEARS, LinearSpec, register, build_linear, choose_hparams
    factors.py     polar init, rank rounding
    replace.py     find and replace modules of any nn.Module by name pattern (the converters' seam)
    guided.py      self-guided training's GuidedLinear and its converters
    merge.py       pre-merge, merge-to-dense, and the calibration of the switch point
    structure.py   dense -> structured for any model, the factors projected from the weights
    <kind>.py      one structure each: dense, lowrank, blockshuffle, blockdense, btt

The block kinds' products (eager, custom ops, Triton) are structlm.ops.blocks. A structure is one
module here: every StructuredLinear subclass with a `kind` defined in a module of this package is
registered below, when the package is imported, in module-name order. A kind defined elsewhere is
registered by calling `register` on it.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from structlm.linear.base import StructuredLinear
from structlm.linear.guided import GuidedLinear, unwrap_guided, wrap_guided
from structlm.linear.merge import PreMergedLinear, merge_linears, premerge, unmerge
from structlm.linear.registry import (
    DENSE,
    LINEARS,
    LinearSpec,
    build_linear,
    check_spec,
    choose_hparams,
    linear_class,
    register,
    structured_kinds,
    unregister,
)
from structlm.linear.replace import is_structured, replace_modules
from structlm.linear.structure import structure

__all__ = [
    "DENSE", "LINEARS", "LinearSpec", "StructuredLinear", "register", "unregister",
    "build_linear", "check_spec", "choose_hparams", "linear_class", "structured_kinds",
    "replace_modules", "is_structured", "GuidedLinear", "wrap_guided", "unwrap_guided",
    "PreMergedLinear", "premerge", "unmerge", "merge_linears", "structure",
]


def _register_package_kinds() -> None:
    """Register the kinds defined in this package's modules (dense first: the baseline)."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__))
    for name in sorted(names, key=lambda n: n != DENSE):
        module = importlib.import_module(f"{__name__}.{name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, StructuredLinear) and cls.__module__ == module.__name__ and cls.kind:
                register(cls)


_register_package_kinds()
