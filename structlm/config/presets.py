"""Presets: functions returning a RunConfig (the CPU sizes, the paper's, wide and GQA)."""

from __future__ import annotations

from collections.abc import Callable

from structlm.config.jsonio import from_dict, to_dict
from structlm.config.model import ModelConfig
from structlm.config.run import OptimConfig, RunConfig, TrainConfig
from structlm.linear.registry import (
    LinearSpec,
)

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
    # the default main job: a few minutes on a 2-core CPU (0.8M tokens; README has the figures)
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
