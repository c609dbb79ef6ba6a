"""The one extension seam: `StructuredLinear`, the interface every FFN linear map shares, and its
registry.

A structured linear layer computes `y = x @ W.T + b` with `W: (d_out, d_in)` stored in factored form
and never materialised in training. Subclasses implement `matmul` (no bias), `weight_params` (a pure
parameter formula) and `_post_init` (the paper's factor-specific init); everything else is shared
here.

Adding a structure is one new file with a `@register("name")` class. Modelled on HazyResearch/fly
`src/models/layers/structured_linear.py` (forward = matmul + bias, dense weight via the identity).
"""

from __future__ import annotations

import math
import os
from typing import ClassVar

import torch
from torch import Tensor, nn

LINEARS: dict[str, type[StructuredLinear]] = {}


def register(name: str):
    """Class decorator: add a StructuredLinear subclass to LINEARS under `name` (one name per
    structure)."""

    def deco(cls: type[StructuredLinear]) -> type[StructuredLinear]:
        if name in LINEARS:
            raise ValueError(
                f"structured linear kind {name!r} is already registered by {LINEARS[name]}"
            )
        cls.kind = name
        LINEARS[name] = cls
        return cls

    return deco


class StructuredLinear(nn.Module):
    """y = x @ W.T + b with W of shape (d_out, d_in) in factored form.

    Constructors take plain typed keyword arguments (rank, nblocks), `init`/`init_std` for the
    initial draw, and `device`/`dtype` factory kwargs; they validate the hyper-parameters before
    allocating any tensor.
    """

    kind: ClassVar[str] = ""
    hparams: ClassVar[tuple[str, ...]] = ()  # names of the hyper-parameters this kind takes
    post_inits: ClassVar[tuple[str, ...]] = ()  # kind-specific inits beyond fixed/xavier
    default_init: ClassVar[str] = "fixed"  # what init="default" means (the paper's choice)
    # matmul(x, bias) folds the bias into its last GEMM (one pass over the output instead of two)
    fuses_bias: ClassVar[bool] = False

    def __init__(
        self, d_in: int, d_out: int, *, bias: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        if bias:
            self.bias = nn.Parameter(torch.zeros(d_out, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    # --- subclass API ---------------------------------------------------------------------------
    def matmul(self, x: Tensor) -> Tensor:
        """(..., d_in) -> (..., d_out), without the bias. Kinds with `fuses_bias` take an optional
        second argument, the bias, and add it inside their last GEMM."""
        raise NotImplementedError  # abstract: every registered subclass overrides it

    @classmethod
    def weight_params(cls, d_in: int, d_out: int, **hp: int) -> int:
        """Number of weight (matrix/block) parameters; pure, no tensors."""
        raise NotImplementedError  # abstract: every registered subclass overrides it

    def weights(self) -> list[Tensor]:
        """The weight tensors (not the bias), in the order of the math."""
        return [p for n, p in self.named_parameters(recurse=False) if n != "bias"]

    def _post_init(self, init: str, std: float) -> None:
        """Kind-specific re-initialisation after the plain draw (svd, ortho)."""

    # --- shared ---------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.bias is not None and self.fuses_bias:
            return self.matmul(x, self.bias)
        y = self.matmul(x)
        # the bias in y's dtype, as nn.Linear does: under autocast y is bf16, and adding the fp32
        # bias as is would promote the output to fp32
        return y if self.bias is None else y + self.bias.to(y.dtype)

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
        invalid."""
        for name, v in (("d_in", d_in), ("d_out", d_out)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v} must be a positive integer")
        for name, v in hp.items():
            if name not in cls.hparams:
                if v is None:
                    continue
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
        """Forward FLOPs per token (multiply-adds x 2, bias ignored): 2 x weight params for every
        kind."""
        return 2 * self.weight_params(self.d_in, self.d_out, **self.hp)

    @torch.no_grad()
    def reset_parameters(self, init: str = "default", std: float = 0.02) -> None:
        """Re-initialise (SPEC §1.6): bias 0; every weight N(0, std^2) ('fixed') or N(0, 1/fan_in)
        ('xavier'); then the kind's post-init ('svd', 'ortho'), which 'default' selects for each
        kind."""
        self.check_init(init)
        init = self.default_init if init == "default" else init
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


def polar_(w: Tensor) -> None:
    """Replace each matrix in `w` (..., m, n) by its polar factor U V^T (all singular values 1), in
    place."""
    wide = w.to(torch.promote_types(w.dtype, torch.float32))  # fp32 at least; fp64 stays fp64
    u, _, vh = torch.linalg.svd(wide, full_matrices=False)
    w.copy_(u @ vh)


# --- the block-diagonal product both block kinds use ----------------------------------------------

BLOCK_MATMUL_ENV = "STRUCTLM_BLOCK_MATMUL"  # auto | bmm | loop


def _block_matmul_impl(a: Tensor) -> str:
    """bmm, or one mm per block: on CPU in bf16/fp16, torch.bmm copies strided operands (in
    autograd's backward, always) and a loop of mm's, which takes strides as they are, was 1.6-1.8x
    faster fwd+bwd (BENCHMARKS.md); in fp32 on CPU, and on CUDA, one bmm is the faster call."""
    choice = os.environ.get(BLOCK_MATMUL_ENV, "auto")
    if choice not in ("auto", "bmm", "loop"):
        raise ValueError(f"{BLOCK_MATMUL_ENV}={choice!r}: choose auto, bmm or loop")
    if choice != "auto":
        return choice
    dev = a.device.type
    dtype = a.dtype
    if dev == "cpu" and torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
    return "loop" if dev == "cpu" and dtype in (torch.bfloat16, torch.float16) else "bmm"


def block_matmul(a: Tensor, b: Tensor) -> Tensor:
    """torch.bmm(a, b) for a: (B, T, p), b: (B, p, q) -> (B, T, q), by the faster implementation
    for a's device and (autocast) dtype; both give the same products."""
    if _block_matmul_impl(a) == "loop":
        # unbind, not a[k]: its backward stacks the block grads once instead of adding B
        # zero-filled full-size tensors
        pairs = zip(a.unbind(), b.unbind(), strict=True)
        return torch.stack([torch.mm(ak, bk) for ak, bk in pairs])
    return torch.bmm(a, b)
