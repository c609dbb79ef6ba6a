"""ModelConfig: the architecture, and its µP variants (the base-width model, the logit scales)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from structlm.linear.registry import (
    DENSE,
    LinearSpec,
    check_spec,
    choose_hparams,
    linear_class,
)


@dataclass
class ModelConfig:
    """A pre-LN decoder-only transformer whose FFN linears are built from `ffn`
    (docs/method.md §3)."""

    vocab_size: int = 32000  # tokenizer vocabulary size
    block_size: int = 1024  # maximum context length (sequence length)
    n_layer: int = 12  # number of transformer blocks
    n_head: int = 12  # query heads
    n_kv_head: int | None = None  # key/value heads; None = n_head (MHA), fewer = GQA/MQA
    d_model: int = 768  # residual stream width ("FFN width" in the paper)
    attn_dim: int | None = None  # total query width n_head*head_dim; None = d_model
    d_ff: int = 3072  # FFN intermediate size
    act: Literal["gelu", "swiglu"] = "gelu"  # gelu (tanh approx.) or swiglu (fc1 outputs 2*d_ff)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"  # normalisation layer
    norm_eps: float = 1e-5  # epsilon of every norm (imported checkpoints may use 1e-6)
    bias: bool = True  # biases in qkv, o, fc1, fc2
    tie_embeddings: bool = True  # lm_head shares the token embedding
    pos_emb: Literal["rope", "absolute"] = "rope"  # rotary or learned absolute positions
    rope_base: float = 10000.0  # RoPE frequency base
    rope_interleaved: bool = False  # rotate adjacent pairs instead of halves
    rope_scale: float = 1.0  # position interpolation factor (positions are divided by it)
    dropout: float = 0.0  # dropout on embeddings and residual branches
    init_std: float = 0.02  # std of the N(0, std^2) init of every matrix and embedding
    ffn: LinearSpec = field(default_factory=LinearSpec)  # the FFN linear map (fc1 and fc2)
    # blocks whose FFN stays dense (the paper keeps block 0)
    dense_ffn_layers: tuple[int, ...] = (0,)
    # hyper-parameters of `ffn`'s kind that one linear overrides, keyed "block.fc1" / "block.fc2"
    # ({"3.fc1": {"rank": 40}}): the uneven ranks of `structlm convert --allocate error`; inert
    # while `ffn` is dense (a dense parent built by replacing `ffn`)
    ffn_overrides: dict[str, dict[str, int]] = field(default_factory=dict)
    # attention logits q.k * attn_scale; None = 1/sqrt(head_dim); under --optim.param_scaling mup
    # derived from the widths (a value given is replaced)
    attn_scale: float | None = None
    # logits = lm_head(h * logit_scale); under --optim.param_scaling mup base_width / d_model
    logit_scale: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.ffn, dict):
            self.ffn = LinearSpec(**self.ffn)
        self.dense_ffn_layers = tuple(self.dense_ffn_layers)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "d_ff"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be positive")
        if self.n_kv_head is not None and (self.n_kv_head <= 0 or self.n_head % self.n_kv_head):
            raise ValueError(
                f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head}; "
                "pick a divisor of n_head (or leave it unset for multi-head attention)"
            )
        if self.attention_dim % self.n_head:
            raise ValueError(
                f"model.attn_dim={self.attention_dim} is not divisible by "
                f"model.n_head={self.n_head}; "
                "choose attn_dim = n_head * head_dim"
            )
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ValueError(
                f"RoPE needs an even head_dim, got {self.head_dim}; change attn_dim or n_head"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
        for name, example in (("init_std", "0.02"), ("rope_scale", "1.0"), ("rope_base", "1e4"),
                              ("norm_eps", "1e-5"), ("logit_scale", "1.0"),
                              ("attn_scale", "0.125")):
            v = getattr(self, name)
            if v is None:
                continue
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"model.{name}={v} must be a positive number (e.g. {example})")
        bad = [i for i in self.dense_ffn_layers if not 0 <= i < self.n_layer]
        if bad:
            raise ValueError(
                f"model.dense_ffn_layers={list(self.dense_ffn_layers)} names blocks {bad} outside "
                f"0..{self.n_layer - 1}"
            )
        for name, d_in, d_out in self.ffn_shapes():
            try:
                check_spec(self.ffn, d_in, d_out)
            except ValueError as e:
                raise ValueError(f"model.ffn ({name}: {d_in}->{d_out}): {e}") from None
        self._check_overrides()

    def _check_overrides(self) -> None:
        """Each key names a structured block's fc1 or fc2, and its spec builds that layer."""
        shapes = {name: (d_in, d_out) for name, d_in, d_out in self.ffn_shapes()}
        structured = [i for i in range(self.n_layer) if i not in self.dense_ffn_layers]
        for key in self.ffn_overrides:
            block, _, name = key.partition(".")
            if not (block.isdigit() and int(block) in structured and name in shapes):
                raise ValueError(
                    f"model.ffn_overrides names {key!r}: keys are BLOCK.fc1 or BLOCK.fc2 for a "
                    f"block with a structured FFN ({structured})")
            if self.ffn.kind == DENSE:
                continue
            try:
                check_spec(self.linear_spec(int(block), name), *shapes[name])
            except ValueError as e:
                raise ValueError(f"model.ffn_overrides[{key!r}]: {e}") from None

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def attention_dim(self) -> int:
        return self.attn_dim or self.d_model

    @property
    def head_dim(self) -> int:
        return self.attention_dim // self.n_head

    def ffn_shapes(self) -> list[tuple[str, int, int]]:
        """(name, d_in, d_out) of the two FFN linears; SwiGLU's fc1 emits gate and up together."""
        fc1_out = 2 * self.d_ff if self.act == "swiglu" else self.d_ff
        return [("fc1", self.d_model, fc1_out), ("fc2", self.d_ff, self.d_model)]

    def ffn_spec(self, layer: int) -> LinearSpec:
        """The LinearSpec of block `layer`: dense for `dense_ffn_layers`, else `ffn`."""
        return LinearSpec() if layer in self.dense_ffn_layers else self.ffn

    def linear_spec(self, layer: int, name: str) -> LinearSpec:
        """The LinearSpec of block `layer`'s FFN linear `name` (fc1, fc2): its block's, with the
        hyper-parameters `ffn_overrides` gives it."""
        spec = self.ffn_spec(layer)
        hp = self.ffn_overrides.get(f"{layer}.{name}")
        if spec.kind == DENSE or not hp:
            return spec
        return LinearSpec.of(spec.kind, init=spec.init, **{**spec.hparams(), **hp})

    def at_width(self, width: int) -> ModelConfig:
        """This architecture at residual width `width` (muP's base model, `structlm bench
        coord`'s widths): d_ff and attn_dim scaled with it (head count kept, so head_dim scales),
        a structured FFN at the same share of its dense parameters by its kind's budget rule."""
        if width < 2 * self.n_head:
            raise ValueError(f"width {width} is below 2 * n_head = {2 * self.n_head}: every "
                             "head needs an even head_dim; choose a larger width")
        f = width / self.d_model
        step = 2 * self.n_head  # an even head_dim for every head
        attn = max(step, round(self.attention_dim * f / step) * step)
        d_ff = max(8, round(self.d_ff * f / 8) * 8)
        out = dataclasses.replace(self, d_model=width, d_ff=d_ff, ffn=LinearSpec(),
                                  ffn_overrides={},
                                  attn_dim=None if attn == width else attn, attn_scale=None,
                                  logit_scale=1.0)
        if self.ffn.kind == DENSE:
            return out
        share = (sum(linear_class(self.ffn.kind).weight_params(n, m, **self.ffn.hparams())
                     for _, n, m in self.ffn_shapes())
                 / sum(n * m for _, n, m in self.ffn_shapes()))
        spec = choose_hparams(self.ffn.kind, [(n, m) for _, n, m in out.ffn_shapes()], share)
        return dataclasses.replace(out, ffn=dataclasses.replace(spec, init=self.ffn.init))


def mup_scales(model: ModelConfig, base_width: int) -> tuple[float, float]:
    """muP's (attn_scale, logit_scale) for `model` against its base at `base_width`: attention
    logits over head_dim rather than its square root (equal at the base), logits times
    base_width / d_model."""
    hd0 = model.at_width(base_width).head_dim
    return math.sqrt(hd0) / model.head_dim, base_width / model.d_model


def mup_model(model: ModelConfig, base_width: int, pretrained: bool) -> ModelConfig:
    """`model` with muP's attention and output scales, derived from its widths (so a config
    resized after they were set, as a sweep does, gets its own); refuses a pretrained start,
    whose function those scales would change."""
    if pretrained:
        raise ValueError("optim.param_scaling=mup initialises a model from scratch; a run from "
                         "--train.init_from keeps its own parametrisation: use "
                         "--optim.param_scaling standard")
    attn, logit = mup_scales(model, base_width)
    return dataclasses.replace(model, attn_scale=attn, logit_scale=logit)
