"""The `structlm` command: one small adapter per subcommand, each calling one public function.

    structlm info     [--preset P] [--config F] [--tokens N] [--json] [--model.* ...]
    structlm prepare  [--preset P] [--data.* ...]
    structlm train    [--preset P] [--config F] [--resume DIR] [--model.* --data.* --optim.* --train.* ...]
    structlm eval     RUN_DIR [--data DIR | --text FILE]
    structlm generate RUN_DIR --prompt "..." [--max_new_tokens N --temperature T --top_k K --top_p P]

Config flags are generated from the dataclasses in structlm.config by tyro, so `--help` lists every field with
its type, default and comment; unknown flags and bad types are refused before any work starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from structlm.config import DEFAULT_PRESET, PRESETS, RunConfig, load_run_config


def parse_run_config(prog: str, argv: list[str], extra: argparse.ArgumentParser) -> tuple:
    """Split argv into the command's own flags (argparse `extra`) and config overrides (tyro).

    `--preset NAME` or `--config FILE` picks the starting RunConfig; every `--a.b.c value` then overrides it.
    """
    import tyro

    extra.add_argument("--preset", default=None, help=f"one of {sorted(PRESETS)} (default {DEFAULT_PRESET})")
    extra.add_argument("--config", default=None, help="start from a saved config.json instead of a preset")
    ns, rest = extra.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        extra.print_help()
        print("\nConfig overrides (every field of RunConfig):\n")
    if ns.preset and ns.config:
        raise ValueError("give either --preset or --config, not both")
    if ns.config:
        base = load_run_config(ns.config)
    else:
        name = ns.preset or DEFAULT_PRESET
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        base = PRESETS[name]()
    _switch_ffn_kind(base, rest)
    cfg = tyro.cli(RunConfig, default=base, args=rest, prog=prog, use_underscores=True)
    return cfg, ns


def _switch_ffn_kind(base: RunConfig, args: list[str]) -> None:
    """When `--model.ffn.kind` changes the kind, drop the preset's hyper-parameters the new kind does not take
    (so `--model.ffn.kind blockshuffle --model.ffn.nblocks 4` works on a LowRank preset)."""
    from structlm.linear import LINEARS

    kind = None
    for i, a in enumerate(args):
        if a.startswith("--model.ffn.kind="):
            kind = a.split("=", 1)[1]
        elif a == "--model.ffn.kind" and i + 1 < len(args):
            kind = args[i + 1]
    if kind in LINEARS and kind != base.model.ffn.kind:
        used = LINEARS[kind].hparams
        ffn = base.model.ffn
        ffn.kind = kind
        ffn.rank = ffn.rank if "rank" in used else None
        ffn.nblocks = ffn.nblocks if "nblocks" in used else None


def format_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def cmd_info(argv: list[str]) -> None:
    """Parameter and FLOP table of a preset plus overrides (the paper's accounting, SPEC §3.6)."""
    from structlm.flops import flops_per_token, param_groups, train_flops

    p = argparse.ArgumentParser(prog="structlm info", add_help=False)
    p.add_argument("--tokens", type=float, default=None, help="training tokens, for total training FLOPs")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    cfg, ns = parse_run_config("structlm info", argv, p)
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
        "ffn": {"kind": m.ffn.kind, **m.ffn.hparams(), "dense_ffn_layers": list(m.dense_ffn_layers)},
    }
    if ns.tokens is not None:
        out["tokens"] = ns.tokens
        out["train_flops"] = train_flops(m, ns.tokens, cfg.seq_len)
    if ns.json:
        print(json.dumps(out))
        return
    kv = f", {m.kv_heads} kv" if m.kv_heads != m.n_head else ""
    hp = "".join(f" {k}={v}" for k, v in m.ffn.hparams().items())
    print(
        f"model: d_model={m.d_model} n_layer={m.n_layer} heads={m.n_head}{kv} attn_dim={m.attention_dim} "
        f"d_ff={m.d_ff} vocab={m.vocab_size} seq={cfg.seq_len} {m.act}/{m.norm}/{m.pos_emb}"
    )
    print(f"ffn:   {m.ffn.kind}{hp} (dense in blocks {list(m.dense_ffn_layers)})\n")
    print(f"{'parameters':<22}{'count':>16}{'':>10}")
    for k in ("embedding", "position", "attention", "ffn", "norms", "lm_head", "total", "non_embedding"):
        if groups[k] or k in ("total", "ffn"):
            print(f"{k:<22}{groups[k]:>16,}{format_count(groups[k]):>10}")
    print(f"{'ffn matrices':<22}{groups['ffn_matrix']:>16,}{format_count(groups['ffn_matrix']):>10}")
    print(f"\n{'forward FLOPs/token':<22}{'count':>16}")
    for k, v in fpt.items():
        print(f"{k:<22}{v:>16,}{format_count(v):>10}")
    if ns.tokens is not None:
        print(f"\ntraining FLOPs for {format_count(ns.tokens)} tokens: {out['train_flops']:.3e} (3 x forward)")


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "info": cmd_info,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("commands:", ", ".join(COMMANDS))
        return
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"structlm: unknown command {cmd!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    try:
        COMMANDS[cmd](rest)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"structlm {cmd}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\nstructlm {cmd}: interrupted", file=sys.stderr)
        sys.exit(130)
