"""Verbs over many finished runs: scaling, plan, report (sweep, which trains, is cli/sweep.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from structlm.cli.args import (
    FLAT,
    OUTPUT_FILE,
    PATHS,
    POSITIVE_INT,
    POSITIVE_INTS,
    one_of,
    parse,
)
from structlm.studies.plan import PlanOptions, format_budget_plan, paper_rows, plan
from structlm.studies.scaling import FORMS, X_KEYS, collect, report_fits
from structlm.utils.files import json_safe

Runs = Annotated[tuple[str, ...], tyro.conf.Positional, PATHS, tyro.conf.arg(metavar="RUNS")]


@dataclass(frozen=True)
class ScalingOptions:
    """Fit L = A*C^-b and L = E + A*C^-b per family (dense, lowrank-32%, ...) to the runs' final
    validation losses; compare the exponents; plot."""

    runs: Runs  # run directories, parents of them, or globs
    x: Annotated[str, one_of(X_KEYS)] = "train_flops"  # the size axis
    forms: Annotated[tuple[str, ...], one_of(FORMS, many=True)] = FORMS  # the laws to fit
    bootstrap: Annotated[int, POSITIVE_INT] = 1000  # bootstrap resamples
    seed: int = 0  # the bootstrap's random seed
    json: Annotated[str | None, OUTPUT_FILE] = None  # write the fits here
    plot: Annotated[str | None, OUTPUT_FILE] = None  # draw loss vs x with the fits (PNG)


def cmd_scaling(argv: list[str]) -> None:
    a = parse(ScalingOptions, argv, "structlm scaling")
    report_fits(a.runs, x=a.x, forms=a.forms, n_boot=a.bootstrap, seed=a.seed,
                json_path=a.json, png=a.plot)


@dataclass(frozen=True)
class PlanArgs:
    """Recommend a structure, model size and token count for a budget from L(N, D) or L(C) fits
    per family: the paper's published points by default, or your sweep's finished runs (--from)."""

    plan: Annotated[PlanOptions, FLAT]  # the budget and the fits' limits
    # fit these run directories / sweeps instead of the paper's points
    runs: Annotated[tuple[str, ...] | None, PATHS,
                    tyro.conf.arg(name="from", metavar="RUN [RUN ...]")] = None
    json: Annotated[str | None, OUTPUT_FILE] = None  # write the plans here


def cmd_plan(argv: list[str]) -> None:
    a = parse(PlanArgs, argv, "structlm plan")
    rows = collect(a.runs) if a.runs else paper_rows()
    print(f"fits from {', '.join(a.runs) if a.runs else rows[0]['source']}")
    result = plan(rows, a.plan)
    print(format_budget_plan(result))
    if a.json:
        Path(a.json).write_text(json.dumps(json_safe(result), indent=1) + "\n")
        print(f"plans: {a.json}")
    if result["recommendation"] is None:
        raise SystemExit(1)


@dataclass(frozen=True)
class ReportOptions:
    """Tabulate finished runs as Markdown and CSV: the paper's Table 1 / 2 layout (params, FFN
    params, tokens, FLOPs, PPL, decode tokens/s)."""

    runs: Runs  # run directories, parents of them, or globs
    # also measure decode tokens/s at these batches; the best is reported
    decode_batch: Annotated[tuple[int, ...] | None, POSITIVE_INTS] = None
    # KV-cache position of the timed decode step (capped at block_size)
    gen: Annotated[int, POSITIVE_INT] = 256
    md: Annotated[str | None, OUTPUT_FILE] = None  # write the Markdown table here
    csv: Annotated[str | None, OUTPUT_FILE] = None  # write the CSV here


def cmd_report(argv: list[str]) -> None:
    a = parse(ReportOptions, argv, "structlm report")
    from structlm.studies.report import report_runs

    report_runs(a.runs, decode_batch=a.decode_batch, gen=a.gen, md=a.md, csv_path=a.csv)
