"""Model converters' shared machinery: find the linear modules of any `nn.Module` by name pattern
and replace them, in place.

Every model change structlm makes goes through `replace_modules`: SGT's guides
(`guided.wrap_guided` / `unwrap_guided`), pre-merge (`merge.premerge` / `unmerge`) and
merge-to-dense (`merge.merge_linears`). A converter takes a model (structlm's GPT or any other
module tree) and returns it converted; patterns are `fnmatch` globs over qualified module names
("blocks.*.mlp.fc1", "*.mlp.*"):

    replace_modules(model, fn, include=("*.mlp.*",), exclude=("blocks.0.*",))

`fn(name, module)` returns the replacement, or None to leave the module alone. A `Wrapper` (a
module around one layer, such as a guided or pre-merged layer) is never looked inside, so
converting twice does not nest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from fnmatch import fnmatchcase

from torch import nn

from structlm.linear.base import StructuredLinear
from structlm.linear.registry import DENSE

Patterns = str | Sequence[str] | None


class Wrapper(nn.Module):
    """A module around one layer; converters treat it as a leaf, and `unwrap()` gives the layer
    back (what the inverse converters put in its place)."""

    def unwrap(self) -> nn.Module:
        raise NotImplementedError  # abstract: every wrapper overrides it


def _as_tuple(p: Patterns) -> tuple[str, ...]:
    return (p,) if isinstance(p, str) else tuple(p or ())


def matches(name: str, include: Patterns = None, exclude: Patterns = None) -> bool:
    """True if `name` matches one of `include` (every name when None) and none of `exclude`."""
    inc, exc = _as_tuple(include), _as_tuple(exclude)
    if inc and not any(fnmatchcase(name, p) for p in inc):
        return False
    return not any(fnmatchcase(name, p) for p in exc)


def named_modules(
    model: nn.Module, include: Patterns = None, exclude: Patterns = None
) -> Iterator[tuple[str, nn.Module, nn.Module, str]]:
    """(qualified name, module, parent, attribute name) of every submodule whose name matches, in
    `model.named_modules()` order (parents first), never inside a Wrapper."""
    yield from _walk(model, "", include, exclude)


def _walk(parent: nn.Module, prefix: str, include: Patterns, exclude: Patterns) -> Iterator:
    for attr, child in list(parent.named_children()):
        name = f"{prefix}{attr}"
        if matches(name, include, exclude):
            yield name, child, parent, attr
        if not isinstance(child, Wrapper):
            yield from _walk(child, f"{name}.", include, exclude)


def replace_modules(
    model: nn.Module, fn: Callable[[str, nn.Module], nn.Module | None],
    include: Patterns = None, exclude: Patterns = None,
) -> dict[str, nn.Module]:
    """Replace every matching submodule m by fn(name, m) where that is not None, in place; returns
    {name: replacement}. A replaced module's children are not visited."""
    out: dict[str, nn.Module] = {}
    replaced: list[str] = []
    for name, child, parent, attr in named_modules(model, include, exclude):
        if any(name.startswith(r + ".") for r in replaced):
            continue
        new = fn(name, child)
        if new is not None:
            setattr(parent, attr, new)
            out[name] = new
            replaced.append(name)
    return out


def is_structured(m: nn.Module) -> bool:
    """A structured (factored, non-dense) linear layer."""
    return isinstance(m, StructuredLinear) and m.kind != DENSE
