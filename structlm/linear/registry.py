"""The kinds of linear map by name (`LINEARS`), the spec that names one (`LinearSpec`), and the
functions that turn a spec into a layer or a budget into a spec.

    register(MyLinear)                       add a StructuredLinear subclass under MyLinear.kind
    build_linear(spec, d_in, d_out)          the only place a LinearSpec becomes constructor kwargs
    choose_hparams(kind, shapes, fraction)   the kind's budget rule, as a validated LinearSpec

The kinds shipped with structlm are registered by `structlm.linear` (every StructuredLinear
subclass defined in a module of that package); a user's own kind is registered by calling
`register` on it. Nothing here names a kind except the dense baseline, `DENSE`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from structlm.linear.base import StructuredLinear

DENSE = "dense"  # the baseline kind: a plain matrix, what the structures are compared with
LINEARS: dict[str, type[StructuredLinear]] = {}
SHARED_HPARAMS = ("rank", "nblocks")  # the hyper-parameters with their own LinearSpec field


@dataclass
class LinearSpec:
    """Which linear map the FFN layers use, and its hyper-parameters.

    `rank` and `nblocks` are the hyper-parameters most structures share; any other hyper-parameter
    a kind declares goes in `params` (`LinearSpec("mykind", params={"cores": 2})`, or
    `--model.ffn.params cores 2` on the command line)."""

    kind: str = DENSE  # a registered kind: structlm.linear.LINEARS (`structlm info` lists them)
    rank: int | None = None  # lowrank, blockdense: inner dimension R
    nblocks: int | None = None  # blockshuffle, blockdense: number of diagonal blocks B
    # default (the paper's per kind) | fixed | xavier | svd (lowrank) | ortho (block kinds)
    init: str = "default"
    # hyper-parameters of other kinds, by name (rank and nblocks have their own fields)
    params: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clash = sorted(set(self.params) & set(SHARED_HPARAMS))
        if clash:
            raise ValueError(
                f"model.ffn.params sets {clash}, which have their own fields; use "
                + " ".join(f"--model.ffn.{k}" for k in clash)
            )

    @classmethod
    def of(cls, kind: str, init: str = "default", **hp: int) -> LinearSpec:
        """A spec from hyper-parameters by name, whichever field each belongs in."""
        shared = {k: hp.pop(k) for k in SHARED_HPARAMS if k in hp}
        return cls(kind, init=init, params=hp, **shared)

    def hparams(self) -> dict[str, int]:
        """The set hyper-parameters as constructor kwargs (None ones left out)."""
        shared = {k: getattr(self, k) for k in SHARED_HPARAMS if getattr(self, k) is not None}
        return {**shared, **self.params}

    def with_kind(self, kind: str) -> LinearSpec:
        """The same spec for another kind, keeping only the hyper-parameters that kind takes."""
        used = linear_class(kind).hparams
        return LinearSpec.of(kind, self.init, **{
            k: v for k, v in self.hparams().items() if k in used
        })


def register(cls: type[StructuredLinear]) -> type[StructuredLinear]:
    """Add a StructuredLinear subclass to LINEARS under its `kind` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, StructuredLinear)):
        raise TypeError(f"{cls!r} is not a StructuredLinear subclass")
    if not cls.kind:
        raise ValueError(f"{cls.__name__} has no `kind`; set the class attribute kind = 'name'")
    if LINEARS.get(cls.kind, cls) is not cls:
        raise ValueError(
            f"structured linear kind {cls.kind!r} is already registered by {LINEARS[cls.kind]}"
        )
    LINEARS[cls.kind] = cls
    return cls


def unregister(kind: str) -> None:
    """Remove a kind from LINEARS (for kinds registered by tests or notebooks)."""
    LINEARS.pop(kind, None)


def linear_class(kind: str) -> type[StructuredLinear]:
    if kind not in LINEARS:
        raise ValueError(
            f"unknown structured linear kind {kind!r}; choose one of {sorted(LINEARS)}"
        )
    return LINEARS[kind]


def structured_kinds() -> list[str]:
    """Every registered kind but the dense baseline, in registration order."""
    return [k for k in LINEARS if k != DENSE]


def check_spec(spec: LinearSpec, d_in: int, d_out: int) -> None:
    """Raise ValueError (field and fix named) unless `spec` builds a valid d_in -> d_out layer."""
    cls = linear_class(spec.kind)
    cls.check(d_in, d_out, **spec.hparams())
    cls.check_init(spec.init)


def build_linear(
    spec: LinearSpec, d_in: int, d_out: int, *, bias: bool = True, init_std: float = 0.02,
    device=None, dtype=None,
) -> StructuredLinear:
    """A freshly initialised layer of kind `spec.kind` mapping d_in -> d_out."""
    check_spec(spec, d_in, d_out)
    return LINEARS[spec.kind](
        d_in, d_out, bias=bias, init=spec.init, init_std=init_std, device=device, dtype=dtype,
        **spec.hparams(),
    )


def choose_hparams(
    kind: str, shapes: list[tuple[int, int]], fraction: float, **given: int
) -> LinearSpec:
    """The LinearSpec the paper's rule gives layers `shapes` [(d_in, d_out), ...] at `fraction` of
    their dense parameters (docs/method.md §2.1); the budget counts all shapes together, as the
    paper counts a whole FFN. `given` fixes hyper-parameters (e.g. nblocks=2 for BlockDense).

    >>> choose_hparams("lowrank", [(768, 3072), (3072, 768)], 0.63)
    LinearSpec(kind='lowrank', rank=384, nblocks=None, init='default', params={})
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must be in (0, 1]")
    if not shapes:
        raise ValueError("shapes must name at least one (d_in, d_out) layer")
    cls = linear_class(kind)
    spec = LinearSpec.of(kind, **cls.budget(shapes, fraction, **given))
    for n, m in shapes:
        check_spec(spec, n, m)
    return spec
