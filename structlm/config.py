"""Typed configuration: one dataclass per concern, presets as Python functions, JSON round trip.

Every field carries a comment (trailing, or on the lines above it); the CLI (tyro) turns the fields
into `--a.b.c` flags with these comments as help. Validation lives in `__post_init__` and raises
`ValueError` naming the field path and the fix. Derived values are properties, so a serialised
config holds no redundant state.

`LinearSpec` (which linear map the FFN uses) lives with the registry of kinds in
`structlm.linear.registry` and is re-exported here; `ModelConfig.__post_init__` asks that registry
to check the FFN hyper-parameters, so that a bad rank or block count fails when the config is
built, not after minutes of work. Imports go one way: config -> linear, never back.
"""

from __future__ import annotations

import dataclasses
import encodings
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from structlm.linear.registry import (
    DENSE,
    LinearSpec,
    check_spec,
    choose_hparams,
    linear_class,
    structured_kinds,
)
from structlm.utils import atomic_write_text

__all__ = [
    "LinearSpec", "ModelConfig", "DataConfig", "OptimConfig", "SGTConfig", "TrainConfig",
    "RunConfig", "PRESETS", "DEFAULT_PRESET", "to_dict", "from_dict", "save_json",
    "load_run_config",
]


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
                                  attn_dim=None if attn == width else attn, attn_scale=None,
                                  logit_scale=1.0)
        if self.ffn.kind == DENSE:
            return out
        share = (sum(linear_class(self.ffn.kind).weight_params(n, m, **self.ffn.hparams())
                     for _, n, m in self.ffn_shapes())
                 / sum(n * m for _, n, m in self.ffn_shapes()))
        spec = choose_hparams(self.ffn.kind, [(n, m) for _, n, m in out.ffn_shapes()], share)
        return dataclasses.replace(out, ffn=dataclasses.replace(spec, init=self.ffn.init))


@dataclass
class DataConfig:
    """Where the training text comes from and where its prepared tokens live."""

    # 'shakespeare' (built in), a text file, a directory, a glob or a .jsonl file
    source: str = "shakespeare"
    # prepared data directory; None = data/<source name>-bpe<vocab_size>
    data_dir: str | None = None
    tokenizer: str | None = None  # an existing tokenizer.json to use instead of training a BPE
    vocab_size: int = 8192  # vocabulary of the BPE trained by prepare
    val_fraction: float = 0.05  # share of documents held out for validation
    text_field: str = "text"  # the JSONL field that holds the text
    # text encoding of the source files, decoded strictly (bytes that do not decode are an error)
    encoding: str = "utf-8"
    seed: int = 1005  # seed of the document-level train/val split
    # characters the BPE is trained on: the same leading share of every train document, adding up
    # to about this many; None = all the train text (bounds prepare's time on big corpora)
    tokenizer_chars: int | None = None
    # processes that tokenize (one input file at a time each); None = all cores. The result does
    # not depend on it
    workers: int | None = None
    # tokens per token file of a split (train.bin when it fits in one, else train-00000.bin, ...)
    shard_tokens: int = 1 << 30

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"data.workers={self.workers} must be >= 1 (or None: all cores)")
        if self.shard_tokens < 1:
            raise ValueError(f"data.shard_tokens={self.shard_tokens} must be >= 1")
        # the standard library's codecs only: an installed package may register a search function
        # that claims every name
        info = encodings.search_function(self.encoding.lower())
        if info is None or not getattr(info, "_is_text_encoding", True):
            raise ValueError(f"data.encoding={self.encoding!r} is not a known text encoding "
                             "(e.g. utf-8, latin-1, cp1252)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        if self.vocab_size < 256 + 1:
            raise ValueError(f"data.vocab_size={self.vocab_size} must be > 256 (byte-level BPE)")
        if self.tokenizer_chars is not None:
            if self.tokenizer_chars < 1000:
                raise ValueError(
                    f"data.tokenizer_chars={self.tokenizer_chars} is too small to train a BPE on; "
                    "give at least 1000 characters (10_000_000 suits corpora of 100M+), or None "
                    "for all the train text"
                )
            if self.tokenizer:
                raise ValueError(
                    "data.tokenizer_chars limits the text a new BPE is trained on, but "
                    f"data.tokenizer={self.tokenizer!r} is used as given; leave one of them unset"
                )


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay (docs/method.md §6.3)."""

    lr: float = 6e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    warmup_frac: float = 0.1  # share of total steps spent in linear warm-up
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.999  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    decay_all: bool = True  # decay every parameter (paper); False: only matrices and embeddings
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables
    # standard: one lr and init_std for every parameter (the paper); mup: per-factor lr and init
    # from each factor's fan-in, relative to a model of d_model = base_width (docs/method.md §10)
    param_scaling: Literal["standard", "mup"] = "standard"
    base_width: int = 256  # mup: the width whose lr and init are those of standard

    def __post_init__(self) -> None:
        if self.base_width < 1:
            raise ValueError(f"optim.base_width={self.base_width} must be a positive width")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"optim.lr={self.lr} must be a positive number (e.g. 6e-4)")
        for name in ("grad_clip", "weight_decay"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(
                    f"optim.{name}={v} must be >= 0 (0 turns it off); a negative value would "
                    "train in reverse"
                )
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optim.{name}={getattr(self, name)} must be in [0, 1)")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"optim.eps={self.eps} must be a small positive number (e.g. 1e-8)")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError(f"optim.warmup_frac={self.warmup_frac} must be in [0, 1)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")


@dataclass
class SGTConfig:
    """Self-guided training (docs/method.md §4): a dense guide mixed into every structured FFN
    layer, alpha 1 -> 0."""

    # fixedstep: guide in the first G of S steps; fixedflop: S + G steps, the first G batches
    # replayed without the guide at the end
    mode: Literal["off", "fixedstep", "fixedflop"] = "off"
    # guided steps G = int(ratio * S), S = the budget's steps (unless match_flops)
    ratio: float = 0.5
    # dense: solve ratio so training FLOPs = the dense model's
    match_flops: Literal["none", "dense"] = "none"
    schedule: Literal["cosine", "linear"] = "cosine"  # how alpha decays from 1 to 0 over G steps
    # run the guide only with probability alpha per layer and forward (paper runs: on)
    reduce_flop: bool = False
    # exact: guide = the structured map; paper: the reference's BlockShuffle init (no shuffle);
    # dense: the dense weights a `structlm convert`ed run came from (with --train.init_from it),
    # so training starts at the pretrained model's function and alpha hands it to the factors
    guide_init: Literal["exact", "paper", "dense"] = "exact"

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"train.sgt.ratio={self.ratio} must be in (0, 1]")
        if self.mode == "off" and self.match_flops != "none":
            raise ValueError(
                "train.sgt.match_flops needs --train.sgt.mode fixedflop (or fixedstep)"
            )


@dataclass
class TrainConfig:
    """The loop: budget, batch, evaluation, logging, checkpoints, precision."""

    out_dir: str = "runs/default"  # run directory (config.json, checkpoints, metrics, summary)
    batch_size: int = 16  # global batch in sequences per optimizer step
    # sequences per forward on one process (gradient accumulation fills the rest)
    micro_batch_size: int = 16
    seq_len: int | None = None  # training sequence length; None = model.block_size
    # budget in optimizer steps (exactly one of max_steps/max_tokens/max_flops)
    max_steps: int | None = None
    # budget in training tokens; steps = int(tokens / tokens_per_step)
    max_tokens: float | None = None
    max_flops: float | None = None  # budget in training FLOPs (paper convention, flops.py)
    # evaluate on the validation split every this many steps (0: only at the end)
    eval_interval: int = 100
    # validation tokens per periodic evaluation (the final one uses all of them)
    eval_tokens: int = 65536
    log_interval: int = 10  # one log line every this many steps
    ckpt_interval: int = 0  # checkpoint every this many steps; 0 = at each evaluation
    keep_last: int = 2  # checkpoints kept on disk
    seed: int = 1005  # seed of init, data order and dropout
    # auto = bf16 autocast where the hardware is fast at it
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    compile: bool = False  # torch.compile each transformer block (once, shared by all blocks' code)
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps ...
    # ddp: every rank holds the whole model, gradients and AdamW state; fsdp: FSDP2 shards them
    # per transformer block (and saves sharded checkpoints that resume at any world size)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # fsdp on several ranks: write each sharded checkpoint in the background while training goes on
    async_checkpoint: bool = True
    # recompute activations in the backward instead of keeping them: none, every block's
    # (block), or all but the matmul outputs (selective)
    activation_checkpointing: Literal["none", "block", "selective"] = "none"
    tensorboard: bool = False  # also write TensorBoard events to out_dir/tb
    # start from these weights (a structlm run or checkpoint, or a Hugging Face model directory):
    # a new run with a fresh optimizer and schedule, unlike --resume
    init_from: str | None = None
    sgt: SGTConfig = field(default_factory=SGTConfig)  # self-guided training

    def __post_init__(self) -> None:
        if isinstance(self.sgt, dict):
            self.sgt = SGTConfig(**self.sgt)
        budgets = [b for b in (self.max_steps, self.max_tokens, self.max_flops) if b is not None]
        if len(budgets) > 1:
            raise ValueError(
                "give only one of train.max_steps, train.max_tokens, train.max_flops "
                f"(got steps={self.max_steps}, tokens={self.max_tokens}, flops={self.max_flops})"
            )
        if self.batch_size <= 0 or self.micro_batch_size <= 0:
            raise ValueError("train.batch_size and train.micro_batch_size must be positive")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.batch_size={self.batch_size} must be a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )
        if self.log_interval < 1 or self.keep_last < 1:
            raise ValueError("train.log_interval and train.keep_last must be at least 1")
        if self.eval_interval < 0 or self.ckpt_interval < 0 or self.eval_tokens < 1:
            raise ValueError(
                "train.eval_interval and train.ckpt_interval must be >= 0 (0 = only at the end), "
                "train.eval_tokens >= 1"
            )
        if any(b is not None and b <= 0 for b in budgets):
            raise ValueError(
                "the training budget (max_steps/max_tokens/max_flops) must be positive"
            )


@dataclass
class RunConfig:
    """Everything a run needs; saved as run_dir/config.json."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.train.sgt.mode != "off" and self.model.ffn.kind == DENSE:
            raise ValueError(
                "train.sgt.mode needs a structured FFN (model.ffn.kind one of "
                f"{structured_kinds()})"
            )
        if self.train.sgt.guide_init == "dense" and not self.train.init_from:
            raise ValueError(
                "train.sgt.guide_init=dense starts the guides from the dense weights of a "
                "converted run: give it as --train.init_from RUN (made by structlm convert)"
            )
        if self.optim.param_scaling == "mup":
            self.model = mup_model(self.model, self.optim.base_width, bool(self.train.init_from))
        seq = self.train.seq_len
        if seq is not None and not 0 < seq <= self.model.block_size:
            raise ValueError(
                f"train.seq_len={seq} must be in 1..model.block_size={self.model.block_size}"
            )

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.block_size


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


# --- serialisation --------------------------------------------------------------------------------


def to_dict(cfg: Any) -> dict:
    """A dataclass config as plain JSON-able dicts (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type, d: dict, path: str = "") -> Any:
    """Rebuild a dataclass config from `to_dict` output; unknown keys raise with their field
    path."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        where = path.rstrip(".") or cls.__name__
        raise ValueError(f"unknown config key(s) {unknown} in {where}; valid keys: {sorted(names)}")
    kwargs = {}
    for k, v in d.items():
        t = hints[k]
        if dataclasses.is_dataclass(t) and isinstance(v, dict):
            v = from_dict(t, v, f"{path}{k}.")
        else:
            v = checked(v, t, f"{path}{k}")
        kwargs[k] = v
    return cls(**kwargs)


def checked(v: Any, hint: Any, path: str) -> Any:
    """`v` if it has the type `hint` describes (ints pass as floats, lists as tuples), converted;
    else ValueError naming the field. For values from JSON/TOML, which nothing else type-checks."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, types.UnionType) or origin is typing.Union:
        if v is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return checked(v, a, path)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{path}={v!r} has the wrong type")
    if origin is Literal:
        if v in args:
            return v
        raise ValueError(f"{path}={v!r} must be one of {list(args)}")
    if origin is tuple and isinstance(v, list | tuple):
        item = args[0] if args else Any
        return tuple(checked(x, item, f"{path}[{i}]") for i, x in enumerate(v))
    if origin is dict and isinstance(v, dict):
        return {checked(k, args[0], path): checked(x, args[1], f"{path}.{k}") for k, x in v.items()}
    ok = {int: lambda: isinstance(v, int) and not isinstance(v, bool),
          float: lambda: isinstance(v, int | float) and not isinstance(v, bool),
          bool: lambda: isinstance(v, bool), str: lambda: isinstance(v, str)}
    if hint is Any or (hint in ok and ok[hint]()):
        return float(v) if hint is float else v
    if hint not in ok and isinstance(hint, type) and isinstance(v, hint):
        return v
    want = getattr(hint, "__name__", str(hint))
    raise ValueError(f"{path}={v!r} must be of type {want}")


def save_json(cfg: Any, path: str) -> None:
    """Write a config as JSON, atomically (a kill mid-write leaves the previous file)."""
    atomic_write_text(path, json.dumps(to_dict(cfg), indent=2))


def load_run_config(path: str) -> RunConfig:
    """A RunConfig from a config.json; an unreadable or invalid file is refused by name."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(
            f"cannot read the run configuration {path} ({e}); it is damaged or not a structlm "
            "config.json: restore it, or copy the one inside a checkpoint directory "
            "(checkpoints/step_*/config.json)"
        ) from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} does not hold a config object; it is not a structlm config.json")
    return from_dict(RunConfig, d)


# --- presets --------------------------------------------------------------------------------------
# The paper's sizes (docs/method.md §3.2, §6.3): vocab 32000, sequence 1024, global batch
# 512 x 1024 tokens.
# Variants derive by mutation:
# `cfg = PRESETS["paper-m"](); cfg.model.ffn = LinearSpec("lowrank", rank=256)`.

_PAPER = {  # name: (d_model, n_layer, n_head, lr, tokens, micro_batch)
    "s": (768, 12, 12, 6e-4, 2.2e9, 64),
    "m": (1024, 24, 16, 3e-4, 6.7e9, 32),
    "l": (1536, 24, 12, 2.5e-4, 14.58e9, 16),
    "xl": (2048, 24, 16, 2e-4, 25.5e9, 16),
}


def _paper(size: str) -> RunConfig:
    d, n_layer, n_head, lr, tokens, micro = _PAPER[size]
    return RunConfig(
        model=ModelConfig(
            vocab_size=32000, block_size=1024, n_layer=n_layer, n_head=n_head, d_model=d, d_ff=4 * d
        ),
        optim=OptimConfig(lr=lr),
        train=TrainConfig(
            out_dir=f"runs/paper-{size}", batch_size=512, micro_batch_size=micro, max_tokens=tokens,
            # a checkpoint every 500 steps (a few GPU-hours at most), no periodic evaluation
            eval_interval=0, ckpt_interval=500, log_interval=100,
        ),
    )


def _wide(size: str) -> RunConfig:
    """Wide & structured (Table 2): GQA attention of half width + LowRank FFN, more tokens."""
    cfg = _paper(size)
    m = cfg.model
    if size == "m":
        m.d_ff, m.attn_dim, m.n_head, m.n_kv_head = 4864, 512, 8, 4
        m.ffn, cfg.train.max_tokens = LinearSpec("lowrank", rank=512), 10.58e9
    else:
        m.d_ff, m.attn_dim, m.n_head, m.n_kv_head = 7424, 768, 12, 4
        m.ffn, cfg.train.max_tokens = LinearSpec("lowrank", rank=768), 23.36e9
    cfg.train.out_dir = f"runs/wide-{size}"
    return _revalidate(cfg)


def _gqa(size: str) -> RunConfig:
    """The GQA baselines of Table 2: fewer KV heads, FFN enlarged to keep the dense parameter
    count."""
    cfg = _paper(size)
    cfg.model.n_kv_head, cfg.model.d_ff = (4, 4864) if size == "m" else (2, 7424)
    cfg.train.out_dir = f"runs/gqa-{size}"
    return _revalidate(cfg)


def _cpu(
    n_layer: int, d: int, n_head: int, seq: int, batch: int, steps: int, out: str
) -> RunConfig:
    """Small models that train for real on a 2-core CPU on the built-in corpus (8k BPE),
    LowRank-32% FFNs."""
    return RunConfig(
        model=ModelConfig(
            vocab_size=8192, block_size=seq, n_layer=n_layer, n_head=n_head, d_model=d, d_ff=4 * d,
            ffn=LinearSpec("lowrank", rank=d // 4),  # 32% of the structured FFNs' parameters
        ),
        optim=OptimConfig(lr=3e-3, weight_decay=0.1),
        train=TrainConfig(
            out_dir=out, batch_size=batch, micro_batch_size=batch, max_steps=steps,
            eval_interval=max(steps // 4, 1), eval_tokens=16384, log_interval=10,
        ),
    )


def _tiny() -> RunConfig:
    """Seconds-long runs for tests and smoke checks."""
    cfg = _cpu(2, 64, 4, 64, 8, 20, "runs/tiny")
    cfg.model.vocab_size = 512
    cfg.model.ffn = LinearSpec("lowrank", rank=16)
    cfg.data.vocab_size = 512
    cfg.optim.lr = 2e-3
    cfg.train.eval_interval, cfg.train.eval_tokens, cfg.train.log_interval = 10, 4096, 5
    return _revalidate(cfg)


def _revalidate(cfg: RunConfig) -> RunConfig:
    """Rebuild from dicts so every __post_init__ check runs on the mutated config."""
    return from_dict(RunConfig, to_dict(cfg))


PRESETS: dict[str, Callable[[], RunConfig]] = {
    # the default main job: ~5 min on a 2-core AVX2 CPU in fp32 (0.8M tokens)
    "small": lambda: _cpu(4, 256, 4, 128, 32, 200, "runs/small"),
    "medium": lambda: _cpu(6, 384, 6, 256, 16, 2000, "runs/medium"),  # ~1-2 h on 2 cores
    "cpu-d512": lambda: _cpu(6, 512, 8, 256, 16, 3000, "runs/cpu-d512"),
    "tiny": _tiny,
    "paper-s": lambda: _paper("s"),
    "paper-m": lambda: _paper("m"),
    "paper-l": lambda: _paper("l"),
    "paper-xl": lambda: _paper("xl"),
    "wide-m": lambda: _wide("m"),
    "wide-l": lambda: _wide("l"),
    "gqa-m": lambda: _gqa("m"),
    "gqa-l": lambda: _gqa("l"),
}
DEFAULT_PRESET = "small"
