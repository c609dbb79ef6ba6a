"""structlm bench NAME: one benchmark of the suite, its table, JSONL and plot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from structlm.bench.suite import BENCHMARKS, BenchOptions, plot_rows
from structlm.cli.args import output_path, parse_run_config, positive_int, print_rows
from structlm.linear.registry import LINEARS
from structlm.utils.device import autocast_dtype, autodetect_device


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
