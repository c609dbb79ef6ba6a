"""The `structlm` command: one small adapter per subcommand, each calling one public function.

    structlm info     [--preset P] [--config F] [--tokens N] [--json] [--model.* ...]
    structlm prepare  [--preset P] [--data.* ...]
    structlm train    [--preset P] [--config F] [--resume DIR] [--model.* --data.* --optim.* --train.* ...]
    structlm eval     RUN_DIR [--data DIR | --text FILE]
    structlm generate RUN_DIR --prompt "..." [--max_new_tokens N --temperature T --top_k K --top_p P]
    structlm sweep    [FILE.toml] [--sizes 2x128 4x256 --structures dense lowrank:0.32 --tokens_per_param R] [--dry-run]
    structlm scaling  RUNS... [--x train_flops|params] [--json F] [--plot F.png]
    structlm plan     --flops C [--target_loss L --max_params N --from RUNS... --extrapolate] [--json F]
    structlm report   RUNS... [--decode_batch B...] [--md F.md] [--csv F.csv]
    structlm export   RUN_DIR OUT_DIR [--format hf-merged] [--dtype fp32|bf16|fp16]
    structlm import   HF_DIR OUT_RUN_DIR
    structlm convert  RUN_OR_HF_DIR OUT_RUN_DIR [--model.ffn.kind K --fraction F --calib FILE]
    structlm serve    RUN_DIR [--host 127.0.0.1 --port 8000 --max_batch 32 --api_key KEY]
    structlm --version

Config flags are generated from the dataclasses in structlm.config by tyro, so `--help` lists every field with
its type, default and comment; unknown flags and bad types are refused before any work starts.
"""  # noqa: E501 -- printed verbatim by `structlm --help`; rewrapping would change that output

from __future__ import annotations

import argparse
import errno
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import tyro

from structlm._version import __version__
from structlm.bench import BENCHMARKS, BenchOptions, plot_rows
from structlm.config import DEFAULT_PRESET, PRESETS, RunConfig, load_run_config
from structlm.convert_run import convert_run
from structlm.data import prepare
from structlm.evaluate import evaluate_run
from structlm.generate import Generator
from structlm.hf.export import default_format, export_run
from structlm.hf.importer import import_hf
from structlm.info import format_info, model_info
from structlm.linear.registry import LINEARS
from structlm.model import check_sampling
from structlm.plan import PlanOptions, format_plan, paper_rows, plan
from structlm.report import report as report_runs
from structlm.scaling import FORMS, X_KEYS, collect
from structlm.scaling import report as scaling_report
from structlm.sweep import SweepConfig, load_sweep, run_sweep
from structlm.training import train
from structlm.training.rundir import refuse_checkpoint_dir
from structlm.utils import autocast_dtype, autodetect_device, json_safe, reuse_freed_memory


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


def cmd_eval(argv: list[str]) -> None:
    """Loss and perplexity of a trained run on its validation split, another prepared dir, or a text
    file."""
    p = argparse.ArgumentParser(prog="structlm eval", description=cmd_eval.__doc__)
    p.add_argument("run_dir", help="a run directory (or one checkpoint directory)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--data", default=None, help="a prepared data directory (its val split is used)")
    g.add_argument("--text", default=None, help="a text file, tokenized with the run's tokenizer")
    p.add_argument("--split", default="val", choices=["train", "val"],
                   help="split of --data / the run's data")
    p.add_argument("--batch_size", type=positive_int, default=8, help="sequences per forward")
    p.add_argument("--seq_len", type=positive_int, default=None,
                   help="window length (default: the run's training sequence length)")
    p.add_argument("--max_tokens", type=positive_float, default=None,
                   help="evaluate at most this many tokens")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    max_tokens = int(a.max_tokens) if a.max_tokens else None
    res = evaluate_run(a.run_dir, data=a.data, text=a.text, split=a.split,
                       batch_size=a.batch_size, max_tokens=max_tokens, device=a.device,
                       dtype=a.dtype, progress=sys.stderr.isatty(), seq_len=a.seq_len)
    if a.json:
        print(json.dumps(res))
    else:
        print(f"{res['source']}: loss {res['loss']:.4f} | ppl {res['ppl']:.2f} | "
              f"{res['tokens']:,} tokens")


def cmd_serve(argv: list[str]) -> None:
    """An OpenAI-compatible server (completions, chat completions, streaming) with continuous
    batching and per-step pre-merge."""
    p = argparse.ArgumentParser(prog="structlm serve", description=cmd_serve.__doc__)
    p.add_argument("run_dir", help="a run directory (or one checkpoint directory)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument("--max_batch", type=positive_int, default=32,
                   help="sequences decoded together (KV cache slots)")
    p.add_argument("--max_tokens", type=positive_int, default=1024,
                   help="the most tokens one request may generate")
    p.add_argument("--max_queue", type=positive_int, default=256,
                   help="requests waiting for a slot before new ones get 429")
    p.add_argument("--prefill_chunk", type=positive_int, default=256,
                   help="prompt tokens prefilled per engine step")
    p.add_argument("--api_key", default=None, help="require Authorization: Bearer API_KEY")
    p.add_argument("--context", type=positive_int, default=None,
                   help="tokens per sequence the KV cache holds (default: the model's context, "
                        "at most 4096; the cache takes max_batch x context positions)")
    p.add_argument("--no_premerge", action="store_true", help="decode with the structured factors")
    p.add_argument("--calibrate", action="store_true", help="measure pre-merge thresholds first")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    a = p.parse_args(argv)
    from structlm.serving.server import serve

    serve(a.run_dir, a.host, a.port, device=a.device, dtype=a.dtype, max_batch=a.max_batch,
          max_queue=a.max_queue, prefill_chunk=a.prefill_chunk, premerge=not a.no_premerge,
          calibrate=a.calibrate, max_tokens=a.max_tokens, api_key=a.api_key, context=a.context)


def cmd_generate(argv: list[str]) -> None:
    """Sample text from a trained run with the KV cache, streaming tokens to the terminal."""
    p = argparse.ArgumentParser(prog="structlm generate", description=cmd_generate.__doc__)
    p.add_argument("run_dir", help="a run directory (or one checkpoint directory)")
    p.add_argument("--prompt", default="", help="text to continue (empty: start of a document)")
    p.add_argument("--max_new_tokens", type=nonnegative_int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=200, help="sample from the k likeliest (>= 1)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling, in (0, 1]")
    p.add_argument("--num_samples", type=positive_int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no_cache", action="store_true",
                   help="recompute the whole context every token")
    p.add_argument("--no_premerge", action="store_true", help="decode with the structured factors")
    p.add_argument("--calibrate", action="store_true", help="measure pre-merge thresholds first")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32", choices=["auto", "bf16", "fp32"])
    a = p.parse_args(argv)
    check_sampling(a.temperature, a.top_k, a.top_p)  # before the model is loaded
    gen = Generator.load(a.run_dir, a.device, a.dtype, premerge=not a.no_premerge,
                         calibrate=a.calibrate)
    for i in range(a.num_samples):
        sys.stdout.write(a.prompt)
        for piece in gen.stream(a.prompt, a.max_new_tokens, temperature=a.temperature,
                                top_k=a.top_k, top_p=a.top_p, seed=a.seed + i,
                                use_cache=not a.no_cache):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if i + 1 < a.num_samples:
            print("-" * 40)


def print_rows(rows: list[dict], cols: tuple[str, ...]) -> None:
    cols = [c for c in cols if any(c in r for r in rows)]
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    widths = [max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(cell(r.get(c)).rjust(w) for c, w in zip(cols, widths, strict=True)))


def _bench_parser(sub: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"structlm bench {sub}", add_help=False)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--json", type=output_path, default=None,
                   help="append one JSON row per measurement to this file")
    p.add_argument("--plot", type=output_path, default=None, help="draw the result to this PNG")
    p.add_argument("--quick", action="store_true",
                   help="small shapes, few repetitions (under a minute)")
    p.add_argument("--backward", action="store_true", help="kernel/ffn: time forward+backward")
    p.add_argument("--compile", action="store_true",
                   help="ffn/train: torch.compile every variant (compiled in the warm-up)")
    p.add_argument("--widths", default=None,
                   help="ffn: comma-separated widths (768,1024,1536,2048); coord: 64,128,256,512")
    p.add_argument("--tokens", default="1,16,256,4096",
                   help="ffn: token counts; kernel: the last one")
    p.add_argument("--kinds", nargs="+", default=None, help="kernel/ffn: only these structures")
    p.add_argument("--batch", type=positive_int, default=None,
                   help="decode/train/prefill: batch size")
    p.add_argument("--seq", type=positive_int, default=256, help="train/prefill: sequence length")
    p.add_argument("--prompt", type=positive_int, default=32,
                   help="decode: prompt tokens before timing")
    p.add_argument("--gen", type=positive_int, default=32, help="decode/maxbatch: generated tokens")
    p.add_argument("--reps", type=positive_int, default=None,
                   help="repetitions (interleaved; kernel 7, others 5); coord: seeds per width")
    p.add_argument("--steps", type=positive_int, default=5, help="coord: AdamW steps per width")
    p.add_argument("--max_batch", type=positive_int, default=4096,
                   help="maxbatch: stop searching here")
    p.add_argument("--calibrate", action="store_true",
                   help="decode: calibrate pre-merge thresholds first")
    p.add_argument("--procs", type=positive_int, default=2, help="memory: ranks of each torchrun")
    p.add_argument("--concurrency", default="1,8,32", help="serve: concurrent clients")
    p.add_argument("--against", type=Path, default=None,
                   help="train: nanoGPT's model.py (yours), timed at the same shapes")
    return p


def cmd_bench(argv: list[str]) -> None:
    """Benchmarks (tables, JSON rows, plots); model benchmarks take a preset plus --model.*
    overrides."""
    if not argv or argv[0] not in BENCHMARKS:
        raise ValueError(f"structlm bench needs one of {list(BENCHMARKS)}, "
                         "e.g. `structlm bench ffn --quick`")
    sub, argv = argv[0], argv[1:]
    cfg, ns = parse_run_config(f"structlm bench {sub}", argv, _bench_parser(sub))
    for kind in ns.kinds or ():
        if kind not in LINEARS:
            raise ValueError(f"--kinds {kind}: unknown kind; choose from {sorted(LINEARS)}")
    device = autodetect_device(ns.device)
    ints = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
    opts = BenchOptions(
        device, autocast_dtype(device, ns.dtype), quick=ns.quick, backward=ns.backward,
        compile=ns.compile, widths=ints(ns.widths) if ns.widths else BENCHMARKS[sub].widths,
        tokens=ints(ns.tokens), batch=ns.batch,
        seq=ns.seq, prompt=ns.prompt, gen=ns.gen, reps=ns.reps, max_batch=ns.max_batch,
        calibrate=ns.calibrate, kinds=tuple(ns.kinds) if ns.kinds else None, procs=ns.procs,
        concurrency=ints(ns.concurrency), against=ns.against, steps=ns.steps, optim=cfg.optim,
        data=cfg.data,
    )
    bench = BENCHMARKS[sub]
    rows = bench.run(opts, cfg.model)
    print_rows(rows, bench.columns)
    for line in bench.notes(rows) if bench.notes else ():
        print(line)
    if ns.json:
        with open(ns.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if ns.plot:
        title = f"structlm bench {sub} ({rows[0]['device']}, {rows[0]['dtype']})"
        if bench.draw:
            bench.draw(rows, ns.plot, title)
        else:
            plot_rows(rows, ns.plot, *bench.plot, title, facet=bench.facet)
        print(f"plot: {ns.plot}")


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
    scaling_report(ns.runs, x=ns.x, forms=ns.forms, n_boot=ns.bootstrap, seed=ns.seed,
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
    print(format_plan(result))
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


def cmd_export(argv: list[str]) -> None:
    """Write a run as a transformers model directory (loads with no structlm installed)."""
    p = argparse.ArgumentParser(prog="structlm export", description=cmd_export.__doc__)
    p.add_argument("run_dir", help="a run directory (or one checkpoint directory)")
    p.add_argument("out_dir", help="a new (or empty) directory to write")
    p.add_argument("--format", default=None, choices=["hf", "hf-merged"],
                   help="hf (default for structured runs): the factors themselves, loaded with "
                        "trust_remote_code=True; hf-merged (default for dense runs): folded into "
                        "a native Llama / GPT-2 / GPT-NeoX")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    a = p.parse_args(argv)
    fmt = a.format or default_format(a.run_dir)
    out = export_run(a.run_dir, a.out_dir, fmt, a.dtype)
    remote = ", trust_remote_code=True" if fmt == "hf" else ""
    print(f"exported {a.run_dir} to {out} as {fmt} (logits checked against structlm's)\n"
          f"load it: transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}{remote})")


def cmd_import(argv: list[str]) -> None:
    """Turn a local transformers checkpoint (Llama, GPT-2, GPT-NeoX; safetensors) into a run."""
    p = argparse.ArgumentParser(prog="structlm import", description=cmd_import.__doc__)
    p.add_argument("hf_dir", help="a directory with config.json, *.safetensors, tokenizer.json")
    p.add_argument("out_dir", help="the structlm run directory to write (new or empty)")
    a = p.parse_args(argv)
    out = import_hf(a.hf_dir, a.out_dir)
    print(f"imported {a.hf_dir} to {out}\n"
          f"evaluate: structlm eval {out} --text FILE\n"
          f"train from it: structlm train --config {out}/config.json --train.init_from {out} "
          "--train.out_dir runs/NEW")


def cmd_convert(argv: list[str]) -> None:
    """Structure a dense run or Hugging Face checkpoint: FFN factors projected from the weights."""
    p = argparse.ArgumentParser(prog="structlm convert", description=cmd_convert.__doc__)
    p.add_argument("source", help="a structlm run, a transformers directory or a .gguf file")
    p.add_argument("out_dir", help="the structured run directory to write (new or empty)")
    p.add_argument("--model.ffn.kind", dest="kind", default="lowrank",
                   choices=[k for k in LINEARS if k != "dense"])
    p.add_argument("--fraction", type=positive_float, default=0.32,
                   help="share of the dense FFN parameters to keep (paper: 0.63, 0.32)")
    p.add_argument("--calib", default=None,
                   help="a text file: activation-aware projection on its first tokens")
    a = p.parse_args(argv)
    out, report = convert_run(a.source, a.out_dir, a.kind, a.fraction, a.calib)
    before = sum(r["params_before"] for r in report)
    after = sum(r["params_after"] for r in report)
    err = max(r["rel_error"] for r in report)
    print(f"converted {len(report)} FFN layers of {a.source} to {a.kind}: {before:,} -> {after:,} "
          f"weights, relative error <= {err:.3f} (per layer: {out}/conversion.json)\n"
          f"heal it: structlm train --config {out}/config.json --train.init_from {out} "
          "--train.out_dir runs/NEW")


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "prepare": cmd_prepare,
    "train": cmd_train,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "bench": cmd_bench,
    "info": cmd_info,
    "sweep": cmd_sweep,
    "scaling": cmd_scaling,
    "plan": cmd_plan,
    "report": cmd_report,
    "export": cmd_export,
    "import": cmd_import,
    "convert": cmd_convert,
    "serve": cmd_serve,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--version":
        print(f"structlm {__version__}")
        return
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("commands:", ", ".join(COMMANDS))
        return
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"structlm: unknown command {cmd!r}; choose one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        sys.exit(2)
    try:
        reuse_freed_memory()
        COMMANDS[cmd](rest)
    except (ValueError, OSError, FloatingPointError, ImportError) as e:
        hint = ""
        if isinstance(e, PermissionError):
            hint = " (choose a directory you can write to, e.g. with --train.out_dir)"
        elif isinstance(e, OSError) and e.errno == errno.ENOSPC:
            hint = " (the disk is full: free some space and rerun; runs resume where they stopped)"
        print(f"structlm {cmd}: error: {e}{hint}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\nstructlm {cmd}: interrupted", file=sys.stderr)
        sys.exit(130)
