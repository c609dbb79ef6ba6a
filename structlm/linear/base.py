"""`StructuredLinear`: the interface every FFN linear map shares. A kind is one subclass in one
module of this package, and declares on its class everything the rest of structlm asks of it:

    kind, hparams, check()          its name, hyper-parameter names and their validation
    weight_params(), weight_flops() parameters and forward FLOPs per token (pure, no tensors)
    budget()                        hyper-parameters for a share of the dense parameters
    post_inits, default_init        its inits beyond the plain draw (`_post_init` applies them)
    matmul(), to_dense()            the map itself (bias folded into the last GEMM) and its matrix
    paper_guide_init()              what the reference code initialised an SGT guide to
    project()                       its factors from a dense matrix (structuring a dense model)
    bench_fractions                 the budgets `structlm bench kernel` times it at

A structured layer computes `y = x @ W.T + b` with `W: (d_out, d_in)` stored in factored form and
never materialised in training. Modelled on HazyResearch/fly's structured_linear.py (forward =
matmul + bias, the dense weight via the identity). Registration is in `structlm.linear.registry`.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn


class StructuredLinear(nn.Module):
    """y = x @ W.T + b with W of shape (d_out, d_in) in factored form.

    Constructors take plain typed keyword arguments (the kind's `hparams`), `init`/`init_std` for
    the initial draw, and `device`/`dtype` factory kwargs; they validate the hyper-parameters
    before allocating any tensor.
    """

    kind: ClassVar[str] = ""  # the registry name (set on every registered subclass)
    hparams: ClassVar[tuple[str, ...]] = ()  # names of the hyper-parameters this kind takes
    post_inits: ClassVar[tuple[str, ...]] = ()  # kind-specific inits beyond fixed/xavier
    default_init: ClassVar[str] = "fixed"  # what init="default" means (the paper's choice)
    bench_fractions: ClassVar[tuple[float, ...]] = (0.32,)  # budgets `bench kernel` times

    def __init__(
        self, d_in: int, d_out: int, *, bias: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        if bias:
            self.bias = nn.Parameter(torch.zeros(d_out, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    # --- what a kind implements -----------------------------------------------------------------
    def matmul(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """(..., d_in) -> (..., d_out); `bias` (d_out,), when given, is added inside the last
        GEMM (one pass over the output instead of two)."""
        raise NotImplementedError  # abstract: every registered subclass overrides it

    @classmethod
    def weight_params(cls, d_in: int, d_out: int, **hp: int) -> int:
        """Number of weight (matrix/block) parameters; pure, no tensors."""
        raise NotImplementedError  # abstract: every registered subclass overrides it

    @classmethod
    def weight_flops(cls, d_in: int, d_out: int, **hp: int) -> int:
        """Forward FLOPs per token (2 per multiply-add, bias ignored). Every shipped kind applies
        each weight once per token, so 2 x its weight parameters; a kind that reuses weights
        overrides this."""
        return 2 * cls.weight_params(d_in, d_out, **hp)

    @classmethod
    def budget(cls, shapes: list[tuple[int, int]], fraction: float, **given: int) -> dict:
        """The hyper-parameters that give layers `shapes` [(d_in, d_out), ...] about `fraction` of
        their dense weight parameters, all shapes counted together (`given` fixes some of them,
        e.g. nblocks). Kinds without a rule refuse."""
        raise ValueError(
            f"kind {cls.kind!r} has no parameter budget rule; set its hyper-parameters "
            f"({', '.join(cls.hparams) or 'none'}) instead of a fraction"
        )

    def weights(self) -> list[Tensor]:
        """The weight tensors (not the bias), in the order of the math."""
        return [p for n, p in self.named_parameters(recurse=False) if n != "bias"]

    def _post_init(self, init: str, std: float) -> None:
        """Kind-specific re-initialisation after the plain draw (svd, ortho)."""

    @torch.no_grad()
    def project(self, w: Tensor, cov: Tensor | None = None) -> None:
        """Set the factors to the best approximation of the dense `w` (d_out, d_in) the structure
        allows; with `cov` (the input covariance) in the activation-weighted norm. Used by
        `structure()` to convert a dense model."""
        raise ValueError(f"kind {self.kind!r} has no projection from dense weights; structure "
                         "with init='paper' (its own initialisation)")

    @torch.no_grad()
    def paper_guide_init(self) -> Tensor:
        """The dense guide the reference code started self-guided training from (d_out, d_in):
        the layer's own matrix unless a kind overrides it."""
        return self.to_dense()

    # --- shared ---------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.matmul(x, self.bias)

    @torch.no_grad()
    def to_dense(self) -> Tensor:
        """The equivalent dense matrix (d_out, d_in): the layer applied to the identity,
        transposed."""
        w = self.weights()[0]
        eye = torch.eye(self.d_in, device=w.device, dtype=w.dtype)
        return self.matmul(eye).T.contiguous()

    @property
    def hp(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.hparams}

    @classmethod
    def check(cls, d_in: int, d_out: int, **hp: int | None) -> None:
        """Raise ValueError, naming the field and the fix, if the shape or hyper-parameters are
        invalid. Kinds extend it with their own constraints."""
        for name, v in (("d_in", d_in), ("d_out", d_out)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v} must be a positive integer")
        for name, v in hp.items():
            if name not in cls.hparams and v is not None:
                raise ValueError(f"{name}={v} is not used by kind {cls.kind!r}; remove it")
        for name in cls.hparams:
            v = hp.get(name)
            if v is None:
                raise ValueError(
                    f"kind {cls.kind!r} needs {name}; set it (e.g. --model.ffn.{name})"
                )
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v} must be a positive integer")

    @classmethod
    def check_init(cls, init: str) -> None:
        valid = ("default", "fixed", "xavier", *cls.post_inits)
        if init not in valid:
            raise ValueError(
                f"init={init!r} is not available for kind {cls.kind!r}; choose one of {valid}"
            )

    @classmethod
    def count_params(cls, d_in: int, d_out: int, *, bias: bool = True, **hp: int) -> int:
        """Parameters of a layer of this kind, bias included when `bias`; pure, validates first."""
        cls.check(d_in, d_out, **hp)
        return cls.weight_params(d_in, d_out, **hp) + (d_out if bias else 0)

    def flops_per_token(self) -> int:
        """Forward FLOPs per token of this layer (bias ignored)."""
        return self.weight_flops(self.d_in, self.d_out, **self.hp)

    @torch.no_grad()
    def reset_parameters(self, init: str = "default", std: float = 0.02) -> None:
        """Re-initialise (docs/method.md §1.6): bias 0; every weight N(0, std^2) ('fixed') or
        N(0, 1/fan_in) ('xavier'); then the kind's post-init ('svd', 'ortho'), which 'default'
        selects for each kind."""
        self.check_init(init)
        init = self.default_init if init == "default" else init
        self.init = init  # what re-initialising at another std (muP) draws again
        if self.bias is not None:
            self.bias.zero_()
        for w in self.weights():
            s = 1.0 / math.sqrt(w.shape[-1]) if init == "xavier" else std
            w.normal_(0.0, s)
        if init in self.post_inits:
            self._post_init(init, std)

    def extra_repr(self) -> str:
        hp = "".join(f", {k}={v}" for k, v in self.hp.items())
        return f"d_in={self.d_in}, d_out={self.d_out}{hp}, bias={self.bias is not None}"
