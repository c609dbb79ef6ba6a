"""Verbs about a run's configuration and training: info, prepare, train."""

from __future__ import annotations

import argparse
import json

from structlm.cli.args import parse_run_config, positive_float
from structlm.data.prepare import prepare
from structlm.studies.info import format_info, model_info
from structlm.training import train


def cmd_info(argv: list[str]) -> None:
    """Parameter and FLOP table of a preset plus overrides (the paper's accounting)."""
    p = argparse.ArgumentParser(prog="structlm info", add_help=False)
    p.add_argument("--tokens", type=positive_float, default=None,
                   help="training tokens, for total training FLOPs")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    cfg, ns = parse_run_config("structlm info", argv, p)
    info = model_info(cfg, ns.tokens)
    print(json.dumps(info) if ns.json else format_info(cfg, info))


def cmd_prepare(argv: list[str]) -> None:
    """Tokenize a corpus into data_dir (train.bin, val.bin, tokenizer.json, meta.json)."""
    cfg, _ = parse_run_config("structlm prepare", argv, argparse.ArgumentParser(add_help=False))
    prepare(cfg.data)


def cmd_train(argv: list[str]) -> None:
    """Train (or resume) a run; prints the validation perplexity and how to generate from it."""
    p = argparse.ArgumentParser(prog="structlm train", add_help=False)
    cfg, ns = parse_run_config("structlm train", argv, p, resume=True)
    if ns.override and not ns.resume:
        raise ValueError("--override changes a run being resumed; give it with --resume RUN_DIR")
    s = train(cfg, override=ns.override)
    print(
        f"\ndone: {s.steps} steps, {s.tokens / 1e6:.1f}M tokens in {s.wall_time_s / 60:.1f} min | "
        f"val loss {s.final_val_loss:.4f} | val ppl {s.final_val_ppl:.2f}\n"
        f"run: {s.out_dir} (summary.json, metrics.jsonl, loss.png, checkpoints/)\n"
        f"generate: structlm generate {s.out_dir} --prompt \"ROMEO:\""
    )
