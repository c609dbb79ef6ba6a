"""The `structlm` command: one small adapter per subcommand, each calling one public function.

    structlm info     [--preset P] [--config F] [--tokens N] [--json] [--model.* ...]
    structlm prepare  [--preset P] [--data.* ...]
    structlm train    [--preset P] [--config F] [--resume DIR] [--model.* --data.* --optim.* --train.* ...]
    structlm eval     RUN_DIR [--data DIR | --text FILE]
    structlm generate RUN_DIR --prompt "..." [--max_new_tokens N --temperature T --top_k K --top_p P]
    structlm sweep    [FILE.toml] [--sizes 2x128 4x256 --structures dense lowrank:0.32 --tokens_per_param R] [--dry-run]
    structlm scaling  RUNS... [--x train_flops|params] [--json F] [--plot F.png]
    structlm report   RUNS... [--decode_batch B...] [--md F.md] [--csv F.csv]

Config flags are generated from the dataclasses in structlm.config by tyro, so `--help` lists every field with
its type, default and comment; unknown flags and bad types are refused before any work starts.
"""  # noqa: E501 -- printed verbatim by `structlm --help`; rewrapping would change that output

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

from structlm.config import DEFAULT_PRESET, PRESETS, LinearSpec, RunConfig, load_run_config
from structlm.utils import reuse_freed_memory


def parse_run_config(
    prog: str, argv: list[str], extra: argparse.ArgumentParser, resume: bool = False
) -> tuple:
    """Split argv into the command's own flags (argparse `extra`) and config overrides (tyro).

    `--preset NAME` or `--config FILE` picks the starting RunConfig; every `--a.b.c value` then
    overrides it.
    """
    import tyro

    extra.add_argument("--resume", default=None,
                       help="continue the run in this directory") if resume else None
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
    return cfg, ns


def _switch_ffn_kind(base: RunConfig, args: list[str]) -> None:
    """When `--model.ffn.kind` changes the kind, drop the preset's hyper-parameters the new kind
    does not take (so `--model.ffn.kind blockshuffle --model.ffn.nblocks 4` works on a LowRank
    preset)."""
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
    from structlm.flops import flops_per_token, guide_params, param_groups, train_flops

    p = argparse.ArgumentParser(prog="structlm info", add_help=False)
    p.add_argument("--tokens", type=float, default=None,
                   help="training tokens, for total training FLOPs")
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
        "ffn": {"kind": m.ffn.kind, **m.ffn.hparams(),
                "dense_ffn_layers": list(m.dense_ffn_layers)},
    }
    if ns.tokens is not None:
        out["tokens"] = ns.tokens
        out["train_flops"] = train_flops(m, ns.tokens, cfg.seq_len)
    if cfg.train.sgt.mode != "off":
        from structlm.sgt import make_plan
        from structlm.train import total_steps

        per_step = cfg.train.batch_size * cfg.seq_len
        base = int(ns.tokens // per_step) if ns.tokens is not None else total_steps(cfg)
        plan = make_plan(cfg.train.sgt, m, base, per_step, cfg.seq_len)
        out["sgt"] = {**dataclasses.asdict(plan), "guide_params": guide_params(m)}
        out["train_flops"] = plan.train_flops
    if ns.json:
        print(json.dumps(out))
        return
    kv = f", {m.kv_heads} kv" if m.kv_heads != m.n_head else ""
    hp = "".join(f" {k}={v}" for k, v in m.ffn.hparams().items())
    print(
        f"model: d_model={m.d_model} n_layer={m.n_layer} heads={m.n_head}{kv} "
        f"attn_dim={m.attention_dim} "
        f"d_ff={m.d_ff} vocab={m.vocab_size} seq={cfg.seq_len} {m.act}/{m.norm}/{m.pos_emb}"
    )
    print(f"ffn:   {m.ffn.kind}{hp} (dense in blocks {list(m.dense_ffn_layers)})\n")
    print(f"{'parameters':<22}{'count':>16}{'':>10}")
    for k in ("embedding", "position", "attention", "ffn", "norms", "lm_head", "total",
              "non_embedding"):
        if groups[k] or k in ("total", "ffn"):
            print(f"{k:<22}{groups[k]:>16,}{format_count(groups[k]):>10}")
    print(f"{'ffn matrices':<22}{groups['ffn_matrix']:>16,}"
          f"{format_count(groups['ffn_matrix']):>10}")
    print(f"\n{'forward FLOPs/token':<22}{'count':>16}")
    for k, v in fpt.items():
        print(f"{k:<22}{v:>16,}{format_count(v):>10}")
    if "sgt" in out:
        p = out["sgt"]
        print(f"\nself-guided training ({p['mode']}): S={p['base_steps']} steps, "
              f"G={p['guided_steps']} guided (ratio {p['ratio']:.3f}), {p['total_steps']} steps in "
              f"all, guides {p['guide_params']:,} params")
        print(f"training FLOPs: {p['train_flops']:.3e} with SGT vs {p['dense_train_flops']:.3e} "
              f"for the dense model at S steps ({p['train_flops'] / p['dense_train_flops']:.4f}x)")
    elif ns.tokens is not None:
        print(f"\ntraining FLOPs for {format_count(ns.tokens)} tokens: "
              f"{out['train_flops']:.3e} (3 x forward)")


def cmd_prepare(argv: list[str]) -> None:
    """Tokenize a corpus into data_dir (train.bin, val.bin, tokenizer.json, meta.json)."""
    from structlm.data import prepare

    cfg, _ = parse_run_config("structlm prepare", argv, argparse.ArgumentParser(add_help=False))
    prepare(cfg.data)


def cmd_train(argv: list[str]) -> None:
    """Train (or resume) a run; prints the validation perplexity and how to generate from it."""
    from structlm.train import train

    p = argparse.ArgumentParser(prog="structlm train", add_help=False)
    cfg, _ = parse_run_config("structlm train", argv, p, resume=True)
    s = train(cfg)
    print(
        f"\ndone: {s.steps} steps, {s.tokens / 1e6:.1f}M tokens in {s.wall_time_s / 60:.1f} min | "
        f"val loss {s.final_val_loss:.4f} | val ppl {s.final_val_ppl:.2f}\n"
        f"run: {s.out_dir} (summary.json, metrics.jsonl, loss.png, checkpoints/)\n"
        f"generate: structlm generate {s.out_dir} --prompt \"ROMEO:\""
    )


def cmd_eval(argv: list[str]) -> None:
    """Loss and perplexity of a trained run on its validation split, another prepared dir, or a text
    file."""
    from structlm.checkpoint import load_model
    from structlm.data import eval_batches, load_meta, load_tokens, resolve_data_dir
    from structlm.evaluate import evaluate
    from structlm.generate import run_tokenizer_path
    from structlm.utils import autocast_dtype, autodetect_device, file_sha256

    p = argparse.ArgumentParser(prog="structlm eval", description=cmd_eval.__doc__)
    p.add_argument("run_dir", help="a run directory (or one checkpoint directory)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--data", default=None, help="a prepared data directory (its val split is used)")
    g.add_argument("--text", default=None, help="a text file, tokenized with the run's tokenizer")
    p.add_argument("--split", default="val", choices=["train", "val"],
                   help="split of --data / the run's data")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per forward")
    p.add_argument("--max_tokens", type=float, default=None,
                   help="evaluate at most this many tokens")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    device = autodetect_device(a.device)
    model, cfg = load_model(a.run_dir, device)
    tok_path = run_tokenizer_path(a.run_dir)
    if a.text:
        from structlm.data import encode_text_file, load_tokenizer

        tokens = encode_text_file(a.text, load_tokenizer(tok_path))
        source = a.text
    else:
        data_dir = Path(a.data) if a.data else resolve_data_dir(cfg.data)
        meta = load_meta(data_dir)
        if meta["tokenizer_sha256"] != file_sha256(tok_path):
            raise ValueError(
                f"{data_dir} was tokenized with a different tokenizer than the run {a.run_dir}; "
                "evaluate on data prepared with the run's tokenizer "
                "(--data.tokenizer RUN/tokenizer.json)"
            )
        tokens = load_tokens(data_dir, a.split)
        source = f"{data_dir} ({a.split})"
    seq = cfg.seq_len
    max_tokens = int(a.max_tokens) if a.max_tokens else None
    n_batches = -(-min(len(tokens) - 1, max_tokens or len(tokens)) // (seq * a.batch_size))
    res = evaluate(
        model, eval_batches(tokens, seq, a.batch_size, max_tokens), device,
        autocast_dtype(device, a.dtype), progress=sys.stderr.isatty(), total=n_batches,
    )
    if a.json:
        print(json.dumps({"source": source, **res}))
    else:
        print(f"{source}: loss {res['loss']:.4f} | ppl {res['ppl']:.2f} | {res['tokens']:,} tokens")


def cmd_generate(argv: list[str]) -> None:
    """Sample text from a trained run with the KV cache, streaming tokens to the terminal."""
    from structlm.generate import Generator

    p = argparse.ArgumentParser(prog="structlm generate", description=cmd_generate.__doc__)
    p.add_argument("run_dir", help="a run directory (or one checkpoint directory)")
    p.add_argument("--prompt", default="", help="text to continue (empty: start of a document)")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no_cache", action="store_true",
                   help="recompute the whole context every token")
    p.add_argument("--no_premerge", action="store_true", help="decode with the structured factors")
    p.add_argument("--calibrate", action="store_true", help="measure pre-merge thresholds first")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32", choices=["auto", "bf16", "fp32"])
    a = p.parse_args(argv)
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


BENCH_COLUMNS = {  # what each benchmark's table shows
    "peak": ["n", "ms", "gflops"],
    "kernel": ["kind", "d_in", "d_out", "rank", "nblocks", "tokens", "pass", "ms", "dense_ms",
               "speedup", "ideal", "efficiency"],
    "ffn": ["variant", "width", "tokens", "pass", "ms", "ms_min", "ms_max", "speedup", "ideal"],
    "train": ["variant", "d_model", "batch", "seq", "ms", "tokens_per_s", "gflops", "mfu",
              "speedup"],
    "prefill": ["variant", "batch", "seq", "ms", "tokens_per_s", "speedup"],
    "decode": ["variant", "batch", "ms_per_token", "ms_min", "ms_max", "tokens_per_s", "vs_dense"],
    "maxbatch": ["variant", "gen", "max_batch", "step_ms", "tokens_per_s", "hit_limit"],
    "crossover": ["kind", "d_in", "d_out", "tokens", "structured_ms", "merged_ms", "speedup"],
}


def print_rows(rows: list[dict], cols: list[str]) -> None:
    cols = [c for c in cols if any(c in r for r in rows)]
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    widths = [max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(cell(r.get(c)).rjust(w) for c, w in zip(cols, widths, strict=True)))


def cmd_bench(argv: list[str]) -> None:
    """Benchmarks (tables, JSON rows, plots); model benchmarks take a preset plus --model.*
    overrides."""
    from structlm import bench
    from structlm.utils import autocast_dtype, autodetect_device

    if not argv or argv[0] not in BENCH_COLUMNS:
        raise ValueError(f"structlm bench needs one of {list(BENCH_COLUMNS)}, "
                         "e.g. `structlm bench ffn --quick`")
    sub, argv = argv[0], argv[1:]
    p = argparse.ArgumentParser(prog=f"structlm bench {sub}", add_help=False)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--json", default=None, help="append one JSON row per measurement to this file")
    p.add_argument("--plot", default=None, help="draw the result to this PNG")
    p.add_argument("--quick", action="store_true",
                   help="small shapes, few repetitions (under a minute)")
    p.add_argument("--backward", action="store_true", help="kernel/ffn: time forward+backward")
    p.add_argument("--compile", action="store_true",
                   help="ffn/train: torch.compile every variant (compiled in the warm-up)")
    p.add_argument("--widths", default="768,1024,1536,2048", help="ffn: comma-separated widths")
    p.add_argument("--tokens", default="1,16,256,4096",
                   help="ffn: token counts; kernel: the first one")
    p.add_argument("--batch", type=int, default=None, help="decode/train/prefill: batch size")
    p.add_argument("--seq", type=int, default=256, help="train/prefill: sequence length")
    p.add_argument("--prompt", type=int, default=32, help="decode: prompt tokens before timing")
    p.add_argument("--gen", type=int, default=32, help="decode/maxbatch: generated tokens")
    p.add_argument("--reps", type=int, default=5, help="repetitions (interleaved)")
    p.add_argument("--max_batch", type=int, default=4096, help="maxbatch: stop searching here")
    p.add_argument("--calibrate", action="store_true",
                   help="decode: calibrate pre-merge thresholds first")
    cfg, ns = parse_run_config(f"structlm bench {sub}", argv, p)
    device = autodetect_device(ns.device)
    dtype = autocast_dtype(device, ns.dtype)
    ints = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
    m = cfg.model
    if ns.quick and sub in ("train", "prefill", "decode", "maxbatch"):
        m = dataclasses.replace(m, n_layer=2, d_model=128, d_ff=512, n_head=4, vocab_size=1024,
                                ffn=LinearSpec("lowrank", rank=32))
    if sub == "peak":
        rows = bench.bench_peak(device, dtype, ns.quick)
    elif sub == "kernel":
        rows = bench.bench_kernel(device, dtype, ints(ns.tokens)[-1], ns.quick, ns.backward)
    elif sub == "ffn":
        rows = bench.bench_ffn(device, dtype, ints(ns.widths), ints(ns.tokens), ns.backward,
                               ns.quick, compile=ns.compile)
    elif sub == "train":
        peak = bench.peak_gflops(bench.bench_peak(device, dtype, quick=True))
        rows = bench.bench_train(m, device, dtype, ns.batch or 8, 32 if ns.quick else ns.seq,
                                 2 if ns.quick else ns.reps, peak, compile=ns.compile)
    elif sub == "prefill":
        rows = bench.bench_prefill(m, device, dtype, ns.batch or 4, 32 if ns.quick else ns.seq,
                                   ns.reps)
    elif sub == "decode":
        rows = bench.bench_decode(m, device, dtype, ns.batch or 1, ns.prompt,
                                  8 if ns.quick else ns.gen, 2 if ns.quick else ns.reps,
                                  ns.calibrate)
    elif sub == "maxbatch":
        limit = 64 if ns.quick else ns.max_batch
        rows = bench.bench_maxbatch(m, device, dtype, ns.gen, 32 if ns.quick else 256,
                                    32 if ns.quick else 256, limit)
    else:  # crossover
        from structlm.model import GPT

        thresholds, rows = bench.thresholds_for(GPT(m), device, dtype, calibrate=True,
                                                progress=True)
    print_rows(rows, BENCH_COLUMNS[sub])
    if sub == "crossover":
        for key, t in thresholds.items():
            print(f"pre-merge {key}: merged dense below {t} tokens per call")
        print(f"cached in {bench.cache_path()}")
    if ns.json:
        with open(ns.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    if ns.plot:
        how = {"ffn": ("tokens", "speedup", "variant"), "kernel": ("tokens", "efficiency", "kind"),
               "crossover": ("tokens", "speedup", "d_out"), "peak": ("n", "gflops", "dtype")}
        x, y, g = how.get(sub, ("batch", "tokens_per_s", "variant"))
        title = f"structlm bench {sub} ({rows[0]['device']}, {rows[0]['dtype']})"
        facet = {"ffn": "width", "crossover": "d_in"}.get(sub)
        bench.plot_rows(rows, ns.plot, x, y, g, title, facet=facet)
        print(f"plot: {ns.plot}")



def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true/false)")


def cmd_sweep(argv: list[str]) -> None:
    """Plan and run a grid of runs (sizes x structures x SGT) under one token-budget rule."""
    from structlm.sweep import SweepConfig, load_sweep, run_sweep

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
    from structlm.scaling import FORMS, X_KEYS, report

    p = argparse.ArgumentParser(
        prog="structlm scaling",
        description="Fit L = A*C^-b and L = E + A*C^-b per family (dense, lowrank-32%, ...) to "
        "the runs' final validation losses; compare the exponents; plot.",
    )
    p.add_argument("runs", nargs="+", help="run directories, parents of them, or globs")
    p.add_argument("--x", default="train_flops", choices=X_KEYS, help="the size axis")
    p.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the fits here")
    p.add_argument("--plot", default=None, help="draw loss vs x with the fits (PNG)")
    ns = p.parse_args(argv)
    report(ns.runs, x=ns.x, forms=ns.forms, n_boot=ns.bootstrap, seed=ns.seed,
           json_path=ns.json, png=ns.plot)


def cmd_report(argv: list[str]) -> None:
    """The paper's Table 1 / 2 layout (params, FFN params, tokens, FLOPs, PPL, decode tokens/s)."""
    from structlm.report import report

    p = argparse.ArgumentParser(prog="structlm report",
                                description="Tabulate finished runs as Markdown and CSV.")
    p.add_argument("runs", nargs="+", help="run directories, parents of them, or globs")
    p.add_argument("--decode_batch", type=int, nargs="+", default=None,
                   help="also measure decode tokens/s at these batches; the best is reported")
    p.add_argument("--gen", type=int, default=256,
                   help="KV-cache position of the timed decode step (capped at block_size)")
    p.add_argument("--md", default=None, help="write the Markdown table here")
    p.add_argument("--csv", default=None, help="write the CSV here")
    ns = p.parse_args(argv)
    report(ns.runs, decode_batch=ns.decode_batch, gen=ns.gen, md=ns.md, csv_path=ns.csv)

COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "prepare": cmd_prepare,
    "train": cmd_train,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "bench": cmd_bench,
    "info": cmd_info,
    "sweep": cmd_sweep,
    "scaling": cmd_scaling,
    "report": cmd_report,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
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
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        print(f"structlm {cmd}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\nstructlm {cmd}: interrupted", file=sys.stderr)
        sys.exit(130)
