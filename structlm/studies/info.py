"""`structlm info`: a model's parameter groups, FLOPs per token and training FLOPs by the paper's
accounting (docs/method.md §3.6), and the SGT step plan when self-guided training is on."""

from __future__ import annotations

import dataclasses

from structlm.config import RunConfig
from structlm.linear.registry import LINEARS
from structlm.model.flops import flops_per_token, guide_params, param_groups, train_flops
from structlm.training.optim import total_steps
from structlm.training.sgt import make_plan

GROUPS = ("embedding", "position", "attention", "ffn", "norms", "lm_head", "total",
          "non_embedding")


def model_info(cfg: RunConfig, tokens: float | None = None) -> dict:
    """Everything `structlm info` prints, as one JSON-able dict; `tokens` sets the training tokens
    (else the config's budget gives them, where SGT needs a step count)."""
    m = cfg.model
    groups = param_groups(m)
    fpt = flops_per_token(m, cfg.seq_len)
    out = {
        "params_total": groups["total"],
        "params_ffn": groups["ffn_matrix"],
        "params_matrix": groups["matrix"],
        "params_non_embedding": groups["non_embedding"],
        "param_groups": groups,
        "flops_per_token": fpt["total"],
        "flops_per_token_groups": fpt,
        "seq_len": cfg.seq_len,
        "ffn": {"kind": m.ffn.kind, **m.ffn.hparams(),
                "dense_ffn_layers": list(m.dense_ffn_layers),
                **({"overrides": dict(m.ffn_overrides)} if m.ffn_overrides else {})},
        "kinds": sorted(LINEARS),
    }
    if tokens is not None:
        out["tokens"] = tokens
        out["train_flops"] = train_flops(m, tokens, cfg.seq_len)
    if cfg.train.sgt.mode != "off":
        per_step = cfg.train.batch_size * cfg.seq_len
        base = int(tokens // per_step) if tokens is not None else total_steps(cfg)
        plan = make_plan(cfg.train.sgt, m, base, per_step, cfg.seq_len)
        out["sgt"] = {**dataclasses.asdict(plan), "guide_params": guide_params(m)}
        out["train_flops"] = plan.train_flops
    return out


def format_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_info(cfg: RunConfig, info: dict) -> str:
    """The table `structlm info` prints."""
    m, groups = cfg.model, info["param_groups"]
    kv = f", {m.kv_heads} kv" if m.kv_heads != m.n_head else ""
    hp = "".join(f" {k}={v}" for k, v in m.ffn.hparams().items())
    lines = [
        f"model: d_model={m.d_model} n_layer={m.n_layer} heads={m.n_head}{kv} "
        f"attn_dim={m.attention_dim} d_ff={m.d_ff} vocab={m.vocab_size} seq={cfg.seq_len} "
        f"{m.act}/{m.norm}/{m.pos_emb}",
        f"ffn:   {m.ffn.kind}{hp} (dense in blocks {list(m.dense_ffn_layers)})"
        + (f"; {len(m.ffn_overrides)} linears with their own hyper-parameters "
           "(model.ffn_overrides)" if m.ffn_overrides else "") + "\n",
        f"{'parameters':<22}{'count':>16}{'':>10}",
    ]
    for k in GROUPS:
        if groups[k] or k in ("total", "ffn"):
            lines.append(f"{k:<22}{groups[k]:>16,}{format_count(groups[k]):>10}")
    lines.append(f"{'ffn matrices':<22}{groups['ffn_matrix']:>16,}"
                 f"{format_count(groups['ffn_matrix']):>10}")
    lines.append(f"\n{'forward FLOPs/token':<22}{'count':>16}")
    for k, v in info["flops_per_token_groups"].items():
        lines.append(f"{k:<22}{v:>16,}{format_count(v):>10}")
    if "sgt" in info:
        p = info["sgt"]
        lines.append(
            f"\nself-guided training ({p['mode']}): S={p['base_steps']} steps, "
            f"G={p['guided_steps']} guided (ratio {p['ratio']:.3f}), {p['total_steps']} steps in "
            f"all, guides {p['guide_params']:,} params")
        lines.append(
            f"training FLOPs: {p['train_flops']:.3e} with SGT vs {p['dense_train_flops']:.3e} "
            f"for the dense model at S steps ({p['train_flops'] / p['dense_train_flops']:.4f}x)")
    elif "tokens" in info:
        lines.append(f"\ntraining FLOPs for {format_count(info['tokens'])} tokens: "
                     f"{info['train_flops']:.3e} (3 x forward)")
    return "\n".join(lines)
