"""Parsing shared by the verbs: a RunConfig from a preset or file plus overrides, checked numbers
and paths, row printing.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import tyro

from structlm.config import DEFAULT_PRESET, PRESETS, RunConfig, load_run_config
from structlm.linear.registry import LINEARS
from structlm.training.rundir import refuse_checkpoint_dir


def parse_run_config(
    prog: str, argv: list[str], extra: argparse.ArgumentParser, resume: bool = False
) -> tuple:
    """Split argv into the command's own flags (argparse `extra`) and config overrides (tyro).

    `--preset NAME` or `--config FILE` picks the starting RunConfig; every `--a.b.c value` then
    overrides it.
    """
    if resume:
        extra.add_argument("--resume", default=None, help="continue the run in this directory")
        extra.add_argument("--override", action="store_true",
                           help="with --resume: allow changed optim.* / train.dtype fields "
                                "(e.g. a lower lr after a loss spike); recorded in the run")
    extra.add_argument("--preset", default=None,
                       help=f"one of {sorted(PRESETS)} (default {DEFAULT_PRESET})")
    extra.add_argument("--config", default=None,
                       help="start from a saved config.json instead of a preset")
    ns, rest = extra.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        extra.print_help()
        print("\nConfig overrides (every field of RunConfig):\n")
    if sum(bool(v) for v in (ns.preset, ns.config, getattr(ns, "resume", None))) > 1:
        raise ValueError("give only one of --preset, --config, --resume")
    if getattr(ns, "resume", None):
        run = Path(ns.resume)
        if not (run / "config.json").exists():
            what = ("does not exist" if not run.exists()
                    else "holds no config.json (not a structlm run)")
            raise FileNotFoundError(f"--resume {run}: the directory {what}")
        refuse_checkpoint_dir(run, "--resume")
        base = load_run_config(str(run / "config.json"))
        base.train.out_dir = str(run)
    elif ns.config:
        base = load_run_config(ns.config)
    else:
        name = ns.preset or DEFAULT_PRESET
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        base = PRESETS[name]()
    _switch_ffn_kind(base, rest)
    cfg = tyro.cli(
        RunConfig, default=base, args=rest, prog=prog, use_underscores=True,
        config=(tyro.conf.FlagConversionOff,),  # booleans take a value: --train.compile True
    )
    if getattr(ns, "resume", None) and Path(cfg.train.out_dir) != Path(ns.resume):
        raise ValueError(f"--resume {ns.resume} continues the run in that directory; drop "
                         f"--train.out_dir {cfg.train.out_dir} (to start a new run there from "
                         f"this one's weights, use --train.init_from {ns.resume})")
    return cfg, ns


def _switch_ffn_kind(base: RunConfig, args: list[str]) -> None:
    """When `--model.ffn.kind` changes the kind, drop the preset's hyper-parameters the new kind
    does not take (so `--model.ffn.kind blockshuffle --model.ffn.nblocks 4` works on a LowRank
    preset)."""
    kind = None
    for i, a in enumerate(args):
        if a.startswith("--model.ffn.kind="):
            kind = a.split("=", 1)[1]
        elif a == "--model.ffn.kind" and i + 1 < len(args):
            kind = args[i + 1]
    if kind in LINEARS and kind != base.model.ffn.kind:
        base.model.ffn = base.model.ffn.with_kind(kind)


def print_rows(rows: list[dict], cols: tuple[str, ...]) -> None:
    cols = [c for c in cols if any(c in r for r in rows)]
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    widths = [max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(cell(r.get(c)).rjust(w) for c, w in zip(cols, widths, strict=True)))


def _number(cast, test, what: str):
    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            v = None
        if v is None or not test(v):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return v
    return parse

positive_int = _number(int, lambda v: v >= 1, "a positive integer")

nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")

positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive number")

port_number = _number(int, lambda v: 0 <= v <= 65535, "a port number (0-65535)")


def output_path(text: str) -> str:
    """A file to write at the end of a command, checked before its work: its folder is made now
    (so a long benchmark does not lose its rows to a missing folder); a folder is refused."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name in it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot make the folder of {text!r}: {e}") from e
    return text


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true/false)")
