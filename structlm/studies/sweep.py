"""Sweeps: a grid of runs (model sizes x FFN structures x SGT on/off) under one token-budget rule.

    plan = plan_sweep(SweepConfig(sizes=("2x128", "4x256"), structures=("dense", "lowrank:0.32"),
                                  tokens_per_param=0.12))
    run_sweep(cfg)        # trains each planned run in out_dir/<name>; finished runs are skipped

Each run is an ordinary run directory (config.json, checkpoints, summary.json), so `structlm train
--resume`, `eval`, `generate`, `scaling` and `report` work on it. A sweep re-run skips the runs
whose summary.json exists and resumes the interrupted ones from their last checkpoint (train()
does that); a run directory that holds a different configuration is refused, never overwritten.

Budget rules (exactly one):
* tokens_per_param: tokens = ratio x parameters (`param_group` of param_groups) of the size's
  *dense* model, so all structures of a size see the same tokens (the paper's scaling curves), or
  of each run's own model with budget_from="self" (Chinchilla-style per model);
* flops: every run gets the same training-FLOP budget (iso-FLOP; structured runs see more tokens);
* tokens: the same explicit number of tokens for every run.
Self-guided runs (sgt=true) always get the dense model's tokens for their size and solve the guided
steps so their training FLOPs equal the dense model's (docs/method.md §4.5, fixedflop +
reduce_flop, as in the paper's SGT runs).

A sweep file is TOML: the SweepConfig fields at the top level, and optionally several [[grid]]
tables, each overriding sizes / structures / sgt for a sub-grid (e.g. BlockShuffle at two sizes),
or giving it its own base (preset, and set overrides added to the sweep's): a grid with a preset
and no sizes runs at the preset's size and names its runs by it (paper-m-lowrank32); a grid's tag
is appended to its run names (a second seed: set = ["train.seed=2"], tag = "seed2"). With
gpu_peak_flops, the plan shows each run's GPU-hours at the stated MFU.
"""

from __future__ import annotations

import builtins
import dataclasses
import itertools
import json
import os
import re
import sys
import time
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro
from tqdm import tqdm
from tyro.constructors import PrimitiveConstructorSpec

from structlm.config import (
    PRESETS,
    LinearSpec,
    RunConfig,
    checked,
    from_dict,
    load_run_config,
    to_dict,
)
from structlm.linear.registry import DENSE, choose_hparams, structured_kinds
from structlm.model.flops import param_groups, train_flops
from structlm.training import train
from structlm.training.optim import total_steps
from structlm.training.rundir import check_run_dir
from structlm.training.sgt import make_plan
from structlm.utils.files import atomic_write_text, is_tty

GRID_KEYS = ("sizes", "structures", "sgt", "preset", "set", "tag")
_SIZE = re.compile(r"^(\d+)x(\d+)(?:h(\d+))?$")  # LxD or LxDhH: layers, width, heads


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false)")


# booleans on the command line: --sgt false true
_BOOLS = PrimitiveConstructorSpec(
    nargs="+", metavar="{true,false} ...", instance_from_str=lambda args: tuple(map(_bool, args)),
    is_instance=lambda x: isinstance(x, tuple | list),
    str_from_instance=lambda x: [str(v).lower() for v in x])


@dataclass
class SweepConfig:
    """A grid of runs and the rule that gives each its token budget (`structlm sweep`'s flags and
    a sweep file's keys; a field's comment is its --help)."""

    out_dir: str = "runs/sweep"  # one run directory per planned run inside it
    preset: str = "small"  # the base run every grid point modifies
    config: str | None = None  # or a saved config.json as the base
    # every run: dotted overrides of the base, e.g. "train.batch_size=64", "optim.lr=1e-3"
    set: Annotated[tuple[str, ...], tyro.conf.arg(metavar="PATH=VALUE")] = ()
    # model sizes "LxD" (layers x width, d_ff = 4*D, D/64 heads) or "LxDhH"; empty = the base size
    sizes: Annotated[tuple[str, ...], tyro.conf.arg(metavar="LxD")] = ()
    # "dense" or "KIND:FRACTION" (KIND a registered structure), hparams by its budget rule
    structures: Annotated[tuple[str, ...], tyro.conf.arg(metavar="KIND:FRAC")] = (
        "dense", "lowrank:0.63", "lowrank:0.32")
    # self-guided training off/on for each structured run
    sgt: Annotated[tuple[bool, ...], _BOOLS] = (False,)
    tokens_per_param: float | None = None  # budget: tokens = ratio x params
    param_group: str = "total"  # which param_groups entry counts: total | non_embedding | matrix
    # with tokens_per_param: of the size's dense model, or of each run's own ("self")
    budget_from: Literal["dense", "self"] = "dense"
    flops: float | None = None  # budget: the same training FLOPs for every run (iso-FLOP)
    tokens: float | None = None  # budget: the same tokens for every run
    evals: int = 4  # periodic validations per run (the final one always happens)
    # [[grid]] tables of a sweep file: sub-grids overriding sizes/structures/sgt, and preset/set
    # (a sub-grid on its own base, e.g. one paper size each) (not a CLI flag)
    grids: Annotated[tuple[dict, ...], tyro.conf.Suppress] = ()
    # per GPU, e.g. 989e12 (H100 SXM bf16 dense): the plan shows each run's GPU-hours, train
    # FLOPs / (gpu_peak_flops x mfu); None = not shown
    gpu_peak_flops: float | None = None
    mfu: float = 0.4  # model FLOPs utilisation assumed for the GPU-hours

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(SweepConfig)
        for f in dataclasses.fields(self):  # TOML values arrive untyped
            setattr(self, f.name, checked(getattr(self, f.name), hints[f.name], f"sweep {f.name}"))
        rules = [r for r in (self.tokens_per_param, self.flops, self.tokens) if r is not None]
        if len(rules) != 1:
            raise ValueError(
                "a sweep needs exactly one budget rule: --tokens_per_param R, --flops F or "
                f"--tokens N (got {len(rules)})"
            )
        if rules[0] <= 0:
            raise ValueError(f"the sweep budget must be positive, got {rules[0]}")
        if self.evals < 0:
            raise ValueError(f"evals={self.evals} must be >= 0")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu={self.mfu} must be in (0, 1]")
        for g in self.grids:
            bad = set(g) - set(GRID_KEYS)
            if bad:
                raise ValueError(
                    f"a [[grid]] table may set {', '.join(GRID_KEYS)} only; got {sorted(bad)}"
                )


@dataclass
class PlannedRun:
    name: str  # run directory name inside the sweep's out_dir
    size: str
    structure: str
    sgt: bool
    cfg: RunConfig = field(repr=False)
    params: int  # param_groups total
    ffn_params: int
    steps: int  # optimizer steps (S + G for self-guided fixedflop runs)
    tokens: int  # tokens read by those steps
    train_flops: float  # the run's expected training FLOPs (guides included)


def read_sweep_file(path: str) -> dict:
    """A sweep file's keys as SweepConfig fields (its [[grid]] tables as `grids`, lists as tuples),
    unchecked; an unknown key, bad TOML or a missing file is refused by name."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    try:
        d = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"sweep file {path} is not valid TOML: {e}") from None
    d["grids"] = tuple(d.pop("grid", ()))
    names = {f.name for f in dataclasses.fields(SweepConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {path}; valid keys: {sorted(names)}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def load_sweep(path: str, **overrides) -> SweepConfig:
    """A SweepConfig from a TOML file, with overrides (None values ignored) on top."""
    d = read_sweep_file(path)
    d.update({k: v for k, v in overrides.items() if v is not None})
    for k in ("set", "sizes", "structures", "sgt"):
        if k in d:
            d[k] = tuple(d[k])
    return SweepConfig(**d)


def _value(text: str):
    """An override's value: JSON (numbers, true/false, null, lists) or else the raw string."""
    try:
        return json.loads(text)
    except ValueError:
        return {"True": True, "False": False, "None": None}.get(text, text)


# the fields the planner sets for every run, and the sweep option that decides each
PLANNED = {"train.max_steps": "tokens, tokens_per_param or flops",
           "train.max_tokens": "tokens, tokens_per_param or flops",
           "train.max_flops": "tokens, tokens_per_param or flops",
           "train.eval_interval": "evals (evaluations per run)", "train.out_dir": "out_dir",
           "model.ffn": "structures (e.g. lowrank:0.32)"}


def base_config(sweep: SweepConfig) -> RunConfig:
    """The preset or config.json every run starts from, with the sweep's `set` overrides."""
    if sweep.config:
        cfg = load_run_config(sweep.config)
    elif sweep.preset in PRESETS:
        cfg = PRESETS[sweep.preset]()
    else:
        raise ValueError(f"unknown preset {sweep.preset!r}; choose one of {sorted(PRESETS)}")
    d = to_dict(cfg)
    for item in sweep.set:
        key, sep, text = item.partition("=")
        owner = next((o for f, o in PLANNED.items()
                      if key.strip() == f or key.strip().startswith(f + ".")), None)
        if owner:
            raise ValueError(f"bad override {item!r}: the sweep plans {key.strip()} for every "
                             f"run; set {owner} instead")
        *parents, leaf = key.strip().split(".")
        node = d
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                break
        if not sep or not isinstance(node, dict) or leaf not in node:
            raise ValueError(
                f"bad override {item!r}: write PATH=VALUE with a config field path such as "
                "train.batch_size=64 (see `structlm train --help`)"
            )
        node[leaf] = _value(text.strip())
    try:
        return from_dict(RunConfig, d)
    except ValueError as e:
        raise ValueError(f"the sweep's overrides (set = {list(sweep.set)}) give a bad config: "
                         f"{e}") from None


def parse_size(size: str) -> tuple[int, int, int]:
    """'4x256' -> (4 layers, width 256, 4 heads); '4x256h8' sets 8 heads."""
    m = _SIZE.match(size)
    if not m:
        raise ValueError(f"bad size {size!r}: write LAYERSxWIDTH such as 4x256 (or 4x256h8)")
    n_layer, d = int(m[1]), int(m[2])
    heads = int(m[3]) if m[3] else max(1, d // 64)
    if d % heads:
        raise ValueError(f"size {size!r}: width {d} is not divisible by {heads} heads; add hH")
    return n_layer, d, heads


def parse_structure(text: str) -> tuple[str, float]:
    """'dense' -> ('dense', 1.0); 'lowrank:0.32' -> ('lowrank', 0.32)."""
    kind, _, frac = text.partition(":")
    if kind == DENSE and not frac:
        return DENSE, 1.0
    try:
        f = float(frac)
    except ValueError:
        f = -1.0
    if kind not in structured_kinds() or not 0 < f < 1:
        raise ValueError(
            f"bad structure {text!r}: write dense or KIND:FRACTION with KIND one of "
            f"{', '.join(structured_kinds())} and 0 < FRACTION < 1 (e.g. lowrank:0.32)"
        )
    return kind, f


def _sized(base: RunConfig, size: str | None, spec: LinearSpec) -> RunConfig:
    d = to_dict(base)
    m = d["model"]
    if size is not None and size not in PRESETS:  # a preset's name: its own size
        m["n_layer"], m["d_model"], m["n_head"] = parse_size(size)
        m["d_ff"], m["attn_dim"], m["n_kv_head"] = 4 * m["d_model"], None, None
        m["dense_ffn_layers"] = [i for i in m["dense_ffn_layers"] if i < m["n_layer"]]
    m["ffn"] = to_dict(spec)
    try:
        return from_dict(RunConfig, d)
    except ValueError as e:
        raise ValueError(f"size {size!r} gives an invalid model: {e}") from None


def _name(size: str | None, kind: str, frac: float, sgt: bool) -> str:
    what = DENSE if kind == DENSE else f"{kind}{round(100 * frac)}"
    return "-".join([p for p in (size, what) if p] + (["sgt"] if sgt else []))


def plan_sweep(sweep: SweepConfig) -> list[PlannedRun]:
    """Every run of the sweep with its configuration, parameters, steps, tokens and FLOPs."""
    grids = sweep.grids or ({},)
    runs: dict[str, PlannedRun] = {}
    for g in grids:
        base = base_config(dataclasses.replace(
            sweep, preset=g.get("preset", sweep.preset), set=(*sweep.set, *g.get("set", ()))))
        # a grid on its own preset and at its size: its runs are named by the preset
        sizes = tuple(g.get("sizes", sweep.sizes)) or ((None,) if "preset" not in g else
                                                         (g["preset"],))
        structures = [parse_structure(s) for s in g.get("structures", sweep.structures)]
        sgts = tuple(g.get("sgt", sweep.sgt))
        for size in sizes:
            dense = _sized(base, size, LinearSpec())
            for kind, frac in structures:
                for sgt in sgts if kind != DENSE else (False,):
                    name = _name(size, kind, frac, sgt) + (f"-{g['tag']}" if "tag" in g else "")
                    if name not in runs:
                        runs[name] = _plan_one(sweep, dense, size, kind, frac, sgt, name)
    return list(runs.values())


def _plan_one(
    sweep: SweepConfig, dense: RunConfig, size: str | None, kind: str, frac: float, sgt: bool,
    name: str,
) -> PlannedRun:
    m = dense.model
    spec = choose_hparams(kind, [(n, k) for _, n, k in m.ffn_shapes()], frac)
    cfg = _sized(dense, None, spec)
    if kind != DENSE and all(i in m.dense_ffn_layers for i in range(m.n_layer)):
        raise ValueError(
            f"run {name}: model.dense_ffn_layers={list(m.dense_ffn_layers)} keeps every FFN of "
            f"this {m.n_layer}-layer model dense, so it would not be {kind}; use more layers or "
            "--set model.dense_ffn_layers=[]"
        )
    t = cfg.train
    t.out_dir = str(Path(sweep.out_dir) / name)
    t.max_steps = t.max_tokens = t.max_flops = None
    group = sweep.param_group
    if group not in param_groups(m):
        raise ValueError(f"param_group={group!r}: choose one of {sorted(param_groups(m))}")
    own = cfg.model if sweep.budget_from == "self" and not sgt else m
    if sweep.tokens_per_param is not None:
        t.max_tokens = sweep.tokens_per_param * param_groups(own)[group]
    elif sweep.tokens is not None:
        t.max_tokens = sweep.tokens
    elif sgt:  # the dense model's tokens under the FLOP budget; the guides fill the difference
        t.max_tokens = sweep.flops / train_flops(m, 1.0, cfg.seq_len)
    else:
        t.max_flops = sweep.flops
    if sgt:
        t.sgt = dataclasses.replace(t.sgt, mode="fixedflop", match_flops="dense", reduce_flop=True)
    cfg = from_dict(RunConfig, to_dict(cfg))  # validate the whole config once more
    per_step = t.batch_size * cfg.seq_len
    try:
        base_steps = total_steps(cfg)
    except ValueError as e:
        raise ValueError(f"run {name}: {e}; raise the sweep budget") from None
    plan = make_plan(cfg.train.sgt, cfg.model, base_steps, per_step, cfg.seq_len)
    cfg.train.eval_interval = max(1, plan.total_steps // sweep.evals) if sweep.evals else 0
    g = param_groups(cfg.model)
    return PlannedRun(
        name=name, size=size if size and size not in PRESETS else f"{m.n_layer}x{m.d_model}",
        structure=_name(None, kind, frac, sgt),
        sgt=sgt, cfg=cfg, params=g["total"], ffn_params=g["ffn"], steps=plan.total_steps,
        tokens=plan.total_steps * per_step, train_flops=plan.train_flops,
    )


def _summary(out: Path) -> dict | None:
    """A run's summary.json, or None where it is missing or unreadable (a run killed while one
    was written by older code): train() redoes the finish and writes it again."""
    try:
        return json.loads((out / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def status(run: PlannedRun) -> str:
    """done (summary.json of the planned steps), partial (checkpoints to resume or extend from) or
    todo. A run finished under a different budget is partial: train() extends it to the new budget,
    or refuses one below the steps it already took."""
    out = Path(run.cfg.train.out_dir)
    if (_summary(out) or {}).get("steps") == run.steps:
        return "done"
    if any((out / "checkpoints").glob("step_*")):
        return "partial"
    return "todo"


def format_grid(runs: list[PlannedRun], gpu_flops: float | None = None) -> str:
    """The plan as an aligned table (also the --dry-run output); with `gpu_flops` (achieved
    FLOP/s of one GPU: peak x MFU) each run's GPU-hours."""
    hours = (lambda r: r.train_flops / gpu_flops / 3600) if gpu_flops else None
    head = (f"{'run':<28}{'params':>14}{'FFN':>14}{'steps':>8}{'tokens':>16}{'FLOPs':>11}"
            + (f"{'GPU-h':>9}" if hours else "") + "  status")
    lines = [head, "-" * len(head)]
    for r in runs:
        lines.append(
            f"{r.name:<28}{r.params:>14,}{r.ffn_params:>14,}{r.steps:>8,}{r.tokens:>16,}"
            f"{r.train_flops:>11.3e}" + (f"{hours(r):>9.1f}" if hours else "") + f"  {status(r)}"
        )
    total = sum(r.train_flops for r in runs)
    todo = sum(r.train_flops for r in runs if status(r) != "done")
    lines.append(f"{len(runs)} runs, {total:.3e} training FLOPs ({todo:.3e} still to do)"
                 + (f", {sum(map(hours, runs)):,.0f} GPU-hours" if hours else ""))
    return "\n".join(lines)


def write_record(out: Path, options: dict) -> Path:
    """The sweep's options as out/sweep.json; where an earlier sweep into the same folder left
    other options there, they are kept and these go to sweep-2.json, sweep-3.json, ..."""
    text = json.dumps(options, indent=2)
    for n in itertools.count(1):
        path = out / ("sweep.json" if n == 1 else f"sweep-{n}.json")
        if not path.exists():
            atomic_write_text(path, text)
            return path
        if path.read_text() == text:
            return path
    raise AssertionError("unreachable")


def run_sweep(sweep: SweepConfig, *, dry_run: bool = False) -> list[dict]:
    """Plan, then train every run not yet done, in order; returns the summaries (dicts). Under
    torchrun every rank trains each run together; only rank 0 prints and writes sweep.json."""
    runs = plan_sweep(sweep)
    lead = int(os.environ.get("RANK", "0")) == 0
    print = builtins.print if lead else (lambda *a, **k: None)  # noqa: A001
    gpu = sweep.gpu_peak_flops * sweep.mfu if sweep.gpu_peak_flops else None
    print(format_grid(runs, gpu), flush=True)
    if gpu:
        print(f"GPU-hours at {sweep.mfu:.0%} MFU of {sweep.gpu_peak_flops:.3g} FLOP/s per GPU "
              "(the paper's FLOP accounting; attention and the LM head included)", flush=True)
    for r in runs:  # refuse a directory holding another run before training anything
        check_run_dir(Path(r.cfg.train.out_dir), r.cfg)
    if dry_run:
        return []
    out = Path(sweep.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if lead:
        record = write_record(out, dataclasses.asdict(sweep))
        print(f"sweep options: {record}", flush=True)
    tty = is_tty() and lead
    bar = tqdm(total=sum(r.train_flops for r in runs), unit="FLOP", unit_scale=True,
               desc="sweep", disable=not tty, position=1)
    summaries = []
    t0 = time.time()
    for i, r in enumerate(runs, 1):
        state = status(r)
        if state == "done":
            s = json.loads((Path(r.cfg.train.out_dir) / "summary.json").read_text())
            print(f"[{i}/{len(runs)}] {r.name}: done (val loss {s['final_val_loss']:.4f}), "
                  "skipped", flush=True)
        else:
            verb = "resuming" if state == "partial" else "training"
            print(f"[{i}/{len(runs)}] {r.name}: {verb} {r.steps:,} steps, {r.tokens:,} tokens, "
                  f"{r.train_flops:.3e} FLOPs ({time.time() - t0:.0f} s into the sweep)",
                  flush=True)
            s = dataclasses.asdict(train(r.cfg))
        summaries.append(s)
        bar.update(r.train_flops)
    bar.close()
    print(f"\nsweep {out}: {len(runs)} runs in {time.time() - t0:.0f} s\n", file=sys.stderr)
    print(f"{'run':<28}{'tokens':>12}{'FLOPs':>11}{'val loss':>10}{'val ppl':>9}")
    for r, s in zip(runs, summaries, strict=True):
        print(f"{r.name:<28}{s['tokens']:>12,}{s['train_flops']:>11.3e}"
              f"{s['final_val_loss']:>10.4f}{s['final_val_ppl']:>9.2f}")
    return summaries
