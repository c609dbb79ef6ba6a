"""Verbs over many runs: sweep, scaling, plan, report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from structlm.cli.args import _bool, output_path, positive_float, positive_int
from structlm.config import PRESETS
from structlm.studies.plan import PlanOptions, format_budget_plan, paper_rows, plan
from structlm.studies.report import report_runs
from structlm.studies.scaling import FORMS, X_KEYS, collect, report_fits
from structlm.studies.sweep import SweepConfig, load_sweep, run_sweep
from structlm.utils.files import json_safe


def cmd_sweep(argv: list[str]) -> None:
    """Plan and run a grid of runs (sizes x structures x SGT) under one token-budget rule."""
    p = argparse.ArgumentParser(
        prog="structlm sweep",
        description="Train a grid of runs; finished runs are skipped, interrupted ones resumed. "
        "Flags override the sweep file's keys.",
    )
    p.add_argument("file", nargs="?", help="a TOML sweep file (keys as the flags below)")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and stop")
    p.add_argument("--out_dir", help="directory of the run directories (default runs/sweep)")
    p.add_argument("--preset", help=f"base preset, one of {sorted(PRESETS)} (default small)")
    p.add_argument("--config", help="a config.json as the base instead of a preset")
    p.add_argument("--set", nargs="+", metavar="PATH=VALUE",
                   help="overrides of every run, e.g. train.batch_size=64 optim.lr=1e-3")
    p.add_argument("--sizes", nargs="+", metavar="LxD", help="model sizes, e.g. 2x128 4x256h4")
    p.add_argument("--structures", nargs="+", metavar="KIND:FRAC",
                   help="e.g. dense lowrank:0.63 lowrank:0.32 blockdense:0.32 blockshuffle:0.32")
    p.add_argument("--sgt", nargs="+", type=_bool, help="self-guided training: false true")
    p.add_argument("--tokens_per_param", type=float, help="budget: tokens = R x params")
    p.add_argument("--param_group", help="params counted by --tokens_per_param (default total)")
    p.add_argument("--budget_from", choices=("dense", "self"),
                   help="tokens_per_param of the size's dense model (default) or each run's own")
    p.add_argument("--flops", type=float, help="budget: the same training FLOPs for every run")
    p.add_argument("--tokens", type=float, help="budget: the same tokens for every run")
    p.add_argument("--evals", type=int, help="periodic validations per run (default 4)")
    ns = p.parse_args(argv)
    flags = {k: v for k, v in vars(ns).items() if k not in ("file", "dry_run") and v is not None}
    for k in ("set", "sizes", "structures", "sgt"):
        if k in flags:
            flags[k] = tuple(flags[k])
    cfg = load_sweep(ns.file, **flags) if ns.file else SweepConfig(**flags)
    run_sweep(cfg, dry_run=ns.dry_run)


def cmd_scaling(argv: list[str]) -> None:
    """Fit loss-vs-FLOPs (or params) scaling laws per family of finished runs (bootstrap CIs)."""
    p = argparse.ArgumentParser(
        prog="structlm scaling",
        description="Fit L = A*C^-b and L = E + A*C^-b per family (dense, lowrank-32%, ...) to "
        "the runs' final validation losses; compare the exponents; plot.",
    )
    p.add_argument("runs", nargs="+", help="run directories, parents of them, or globs")
    p.add_argument("--x", default="train_flops", choices=X_KEYS, help="the size axis")
    p.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    p.add_argument("--bootstrap", type=positive_int, default=1000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=output_path, default=None, help="write the fits here")
    p.add_argument("--plot", type=output_path, default=None,
                   help="draw loss vs x with the fits (PNG)")
    ns = p.parse_args(argv)
    report_fits(ns.runs, x=ns.x, forms=ns.forms, n_boot=ns.bootstrap, seed=ns.seed,
                   json_path=ns.json, png=ns.plot)


def cmd_plan(argv: list[str]) -> None:
    """For a compute budget: structure, model size and tokens from fitted scaling laws."""
    p = argparse.ArgumentParser(
        prog="structlm plan",
        description="Recommend a structure, model size and token count for a budget from "
        "L(N, D) or L(C) fits per family: the paper's published points by default, or your "
        "sweep's finished runs (--from).")
    p.add_argument("--flops", type=positive_float, default=None,
                   help="compute budget (training FLOPs)")
    p.add_argument("--target_loss", type=positive_float, default=None,
                   help="the validation loss to reach (with --flops: families that miss it are "
                   "not recommended; alone: the least compute per family)")
    p.add_argument("--max_params", type=positive_float, default=None, help="a parameter limit")
    p.add_argument("--from", dest="runs", nargs="+", default=None,
                   help="fit these run directories / sweeps instead of the paper's points")
    p.add_argument("--form", default="power", choices=FORMS,
                   help="the L(C) form where a family's runs cannot separate N from D")
    p.add_argument("--max_extrapolation", type=float, default=10.0,
                   help="refuse budgets beyond this factor of a family's fitted range")
    p.add_argument("--extrapolate", action="store_true", help="predict beyond it anyway")
    p.add_argument("--bootstrap", type=positive_int, default=300, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=output_path, default=None, help="write the plans here")
    ns = p.parse_args(argv)
    rows = collect(ns.runs) if ns.runs else paper_rows()
    print(f"fits from {', '.join(ns.runs) if ns.runs else rows[0]['source']}")
    opts = PlanOptions(ns.flops, ns.target_loss, ns.max_params, ns.form, ns.max_extrapolation,
                       ns.extrapolate, ns.bootstrap, ns.seed)
    result = plan(rows, opts)
    print(format_budget_plan(result))
    if ns.json:
        Path(ns.json).write_text(json.dumps(json_safe(result), indent=1) + "\n")
        print(f"plans: {ns.json}")
    if result["recommendation"] is None:
        raise SystemExit(1)


def cmd_report(argv: list[str]) -> None:
    """The paper's Table 1 / 2 layout (params, FFN params, tokens, FLOPs, PPL, decode tokens/s)."""
    p = argparse.ArgumentParser(prog="structlm report",
                                description="Tabulate finished runs as Markdown and CSV.")
    p.add_argument("runs", nargs="+", help="run directories, parents of them, or globs")
    p.add_argument("--decode_batch", type=positive_int, nargs="+", default=None,
                   help="also measure decode tokens/s at these batches; the best is reported")
    p.add_argument("--gen", type=positive_int, default=256,
                   help="KV-cache position of the timed decode step (capped at block_size)")
    p.add_argument("--md", type=output_path, default=None, help="write the Markdown table here")
    p.add_argument("--csv", type=output_path, default=None, help="write the CSV here")
    ns = p.parse_args(argv)
    report_runs(ns.runs, decode_batch=ns.decode_batch, gen=ns.gen, md=ns.md, csv_path=ns.csv)
