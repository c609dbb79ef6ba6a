"""RunConfig = ModelConfig + DataConfig + OptimConfig + TrainConfig (+ SGTConfig), each validated
when made.
"""

from __future__ import annotations

import encodings
import math
from dataclasses import dataclass, field
from typing import Literal

from structlm.config.model import ModelConfig, mup_model
from structlm.linear.registry import (
    DENSE,
    structured_kinds,
)


@dataclass
class DataConfig:
    """Where the training text comes from and where its prepared tokens live."""

    # 'shakespeare' (built in), a text file, a directory, a glob or a .jsonl file; None: the data
    # already prepared in data_dir, as it is (`structlm train --data.data_dir DIR` with no other
    # --data flag sets it when DIR holds prepared data)
    source: str | None = "shakespeare"
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
        if self.source is None and not self.data_dir:
            raise ValueError("data.source=None trains on data already prepared in data.data_dir, "
                             "but no data.data_dir is given; set --data.data_dir DIR")
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
    # validation tokens per periodic evaluation (the final one: final_eval_tokens)
    eval_tokens: int = 65536
    # validation tokens of the final evaluation (summary.json's final_val_loss); None: the whole
    # validation split (bound it on big corpora: 5% of 10B tokens is a long evaluation)
    final_eval_tokens: int | None = None
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
        if self.final_eval_tokens is not None and self.final_eval_tokens < 1:
            raise ValueError(f"train.final_eval_tokens={self.final_eval_tokens} must be >= 1 "
                             "(or None: the whole validation split)")
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
