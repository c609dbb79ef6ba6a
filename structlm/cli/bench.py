"""structlm bench NAME: one benchmark of the suite, its table, JSONL and plot."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Annotated

from structlm.bench.suite import BENCHMARKS, BenchOptions, plot_rows
from structlm.cli.args import FLAT, OUTPUT_FILE, parse_run_config, print_rows


@dataclass(frozen=True)
class BenchArgs:
    """Benchmarks (tables, JSON rows, plots); model benchmarks take a preset plus --model.*
    overrides."""

    bench: Annotated[BenchOptions, FLAT]  # what to measure, and how
    # append one JSON row per measurement to this file
    json: Annotated[str | None, OUTPUT_FILE] = None
    plot: Annotated[str | None, OUTPUT_FILE] = None  # draw the result to this PNG


def cmd_bench(argv: list[str]) -> None:
    if not argv or argv[0] not in BENCHMARKS:
        raise ValueError(f"structlm bench needs one of {list(BENCHMARKS)}, "
                         "e.g. `structlm bench ffn --quick`")
    sub, argv = argv[0], argv[1:]
    cfg, _, a = parse_run_config(f"structlm bench {sub}", argv, BenchArgs,
                                 description=BenchArgs.__doc__)
    opts = dataclasses.replace(a.bench, optim=cfg.optim, data=cfg.data)
    bench = BENCHMARKS[sub]
    rows = bench.run(opts, cfg.model)
    print_rows(rows, bench.columns)
    for line in bench.notes(rows) if bench.notes else ():
        print(line)
    if a.json:
        with open(a.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if a.plot:
        title = f"structlm bench {sub} ({rows[0]['device']}, {rows[0]['dtype']})"
        if bench.draw:
            bench.draw(rows, a.plot, title)
        else:
            plot_rows(rows, a.plot, *bench.plot, title, facet=bench.facet)
        print(f"plot: {a.plot}")
