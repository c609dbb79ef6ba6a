"""Exact parameter and FLOP accounting as pure functions of a ModelConfig (no model is built).

Conventions (docs/method.md §3.6, which reproduces the paper's Tables 1 and 2 exactly):
* FLOPs count 2 per multiply-add of a matrix product; biases, norms, activations and softmax are
  ignored.
* Forward FLOPs per token at sequence length T:
      2*L*(attn_dim*d [Q] + attn_dim*d [O] + 2*hd*n_kv*d [K, V])   attention projections
    + 2*L*(2*T*attn_dim)                             QK^T and AV, full T^2 (no causal halving)
    + FFN linears: each kind's weight_flops         2 x weight params for every shipped kind
    + 2*vocab*d                                      the LM head (the embedding lookup is free)
* Training FLOPs = 3 x forward (backward = 2 x forward) x tokens.
The paper's "model size" counts matrices only (`matrix_params`); `param_groups` counts every
parameter and equals `sum(p.numel() for p in GPT(cfg).parameters())`.
"""

from __future__ import annotations

from structlm.config import ModelConfig
from structlm.linear.registry import DENSE, linear_class


def ffn_layer_params(cfg: ModelConfig, layer: int, *, bias: bool | None = None) -> int:
    """Parameters of block `layer`'s FFN (fc1 + fc2); matrices only when bias=False."""
    b = cfg.bias if bias is None else bias
    total = 0
    for name, n, m in cfg.ffn_shapes():
        spec = cfg.linear_spec(layer, name)
        total += linear_class(spec.kind).count_params(n, m, bias=b, **spec.hparams())
    return total


def ffn_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs per token of all FFN linears: each kind's `weight_flops` (2 x its weight
    parameters for every shipped kind)."""
    total = 0
    for i in range(cfg.n_layer):
        for name, n, m in cfg.ffn_shapes():
            spec = cfg.linear_spec(i, name)
            total += linear_class(spec.kind).weight_flops(n, m, **spec.hparams())
    return total


def ffn_params(cfg: ModelConfig, *, bias: bool | None = None) -> int:
    """All FFN parameters of the model (matrices only when bias=False)."""
    return sum(ffn_layer_params(cfg, i, bias=bias) for i in range(cfg.n_layer))


def attention_params(cfg: ModelConfig, *, bias: bool | None = None) -> int:
    """qkv + o projections of all blocks (matrices only when bias=False)."""
    b = cfg.bias if bias is None else bias
    d, ad, kv = cfg.d_model, cfg.attention_dim, cfg.kv_heads * cfg.head_dim
    per_layer = d * (ad + 2 * kv) + ad * d
    if b:
        per_layer += (ad + 2 * kv) + d
    return cfg.n_layer * per_layer


def param_groups(cfg: ModelConfig) -> dict[str, int]:
    """Every parameter of GPT(cfg), by component. `total` == the model's numel; `matrix` is the
    paper's "model size" (matrices + one tied embedding); `non_embedding` leaves out wte/wpe/untied
    lm_head."""
    d = cfg.d_model
    norm = 2 * d if cfg.norm == "layernorm" else d
    g = {
        "embedding": cfg.vocab_size * d,
        "position": cfg.block_size * d if cfg.pos_emb == "absolute" else 0,
        "attention": attention_params(cfg),
        "ffn": ffn_params(cfg),
        "norms": (2 * cfg.n_layer + 1) * norm,
        "lm_head": 0 if cfg.tie_embeddings else cfg.vocab_size * d,
    }
    g["total"] = sum(g.values())
    g["non_embedding"] = g["total"] - g["embedding"] - g["position"] - g["lm_head"]
    g["matrix"] = matrix_params(cfg)
    g["ffn_matrix"] = ffn_params(cfg, bias=False)
    return g


def matrix_params(cfg: ModelConfig) -> int:
    """The paper's model size (docs/method.md §3.6): attention and FFN matrices plus the (tied)
    embedding once."""
    emb = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    return attention_params(cfg, bias=False) + ffn_params(cfg, bias=False) + emb


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, int]:
    """Forward FLOPs per token by component at sequence length seq_len (default block_size)."""
    T = seq_len or cfg.block_size
    d, ad, kv, L = cfg.d_model, cfg.attention_dim, cfg.kv_heads * cfg.head_dim, cfg.n_layer
    f = {
        "attention": 2 * L * (2 * ad * d + 2 * kv * d),
        "attention_scores": 2 * L * (2 * T * ad),
        "ffn": ffn_flops(cfg),
        "lm_head": 2 * cfg.vocab_size * d,
    }
    f["total"] = sum(f.values())
    return f


def train_flops(cfg: ModelConfig, tokens: float, seq_len: int | None = None) -> float:
    """Training FLOPs for `tokens` tokens: 3 x forward (docs/method.md §3.6)."""
    return 3.0 * flops_per_token(cfg, seq_len)["total"] * tokens


def tokens_for_budget(cfg: ModelConfig, flops: float, seq_len: int | None = None) -> float:
    """Tokens whose training costs `flops` FLOPs."""
    return flops / (3.0 * flops_per_token(cfg, seq_len)["total"])


def guide_params(cfg: ModelConfig) -> int:
    """Parameters of the dense guides self-guided training adds: d_in*d_out per structured FFN
    linear."""
    structured = sum(cfg.ffn_spec(i).kind != DENSE for i in range(cfg.n_layer))
    return structured * sum(n * m for _, n, m in cfg.ffn_shapes())


def sgt_train_flops(
    cfg: ModelConfig, total_steps: int, guide_forwards: float, tokens_per_step: int,
    seq_len: int | None = None,
) -> float:
    """Training FLOPs of a self-guided run (docs/method.md §4.5): the structured model for
    `total_steps`, plus the guides for `guide_forwards` step-equivalents (G without reduce_flop;
    the expected sum of alpha over the guided steps with it, ~G/2 for either
    schedule). 3 x forward, as everywhere."""
    f_struct = flops_per_token(cfg, seq_len)["total"]
    f_guide = 2 * guide_params(cfg)
    return 3.0 * tokens_per_step * (f_struct * total_steps + f_guide * guide_forwards)
