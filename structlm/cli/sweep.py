"""structlm sweep: a grid of runs under one token-budget rule (its own module: it imports the
training loop, which the other studies verbs never need)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import tyro

from structlm.cli.args import FLAT, defaults, draft, parse
from structlm.studies.sweep import SweepConfig, read_sweep_file, run_sweep


@dataclass(frozen=True)
class SweepArgs:
    """Train a grid of runs (sizes x structures x SGT) under one token-budget rule; finished runs
    are skipped, interrupted ones resumed. Flags override the sweep file's keys."""

    sweep: Annotated[SweepConfig, FLAT]  # the grid and its budget
    # a TOML sweep file (keys as the flags; [[grid]] tables for sub-grids)
    file: Annotated[str | None, tyro.conf.Positional, tyro.conf.arg(metavar="FILE.toml")] = None
    # print the planned runs and stop
    dry_run: Annotated[bool, tyro.conf.arg(aliases=("--dry-run",))] = False


def cmd_sweep(argv: list[str]) -> None:
    first = draft(SweepArgs, argv)  # where the file is, before its keys become the defaults
    keys = read_sweep_file(first.file) if first and first.file else {}
    a = parse(SweepArgs, argv, "structlm sweep",
              default=SweepArgs(sweep=defaults(SweepConfig, **keys)))
    run_sweep(a.sweep, dry_run=a.dry_run)
