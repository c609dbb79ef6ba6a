"""The table `structlm bench` reads: each benchmark's runner, columns and plot, its options, and
the plot of its rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import tyro
from matplotlib.figure import Figure
from tyro.constructors import PrimitiveConstructorSpec

from structlm.bench.coord import coord_check, plot_coord
from structlm.bench.decode import (
    bench_decode,
    bench_maxbatch,
    bench_prefill,
)
from structlm.bench.kernels import bench_ffn, bench_kernel, bench_kinds, bench_peak
from structlm.bench.memory import bench_memory
from structlm.bench.serve import bench_serve
from structlm.bench.train import bench_train
from structlm.config import DataConfig, ModelConfig, OptimConfig
from structlm.linear.merge import cache_path, thresholds_for
from structlm.linear.registry import LINEARS, LinearSpec, choose_hparams
from structlm.model.flops import ffn_params
from structlm.model.gpt import GPT
from structlm.utils.device import autocast_dtype, autodetect_device
from structlm.utils.timing import context


def _peak_of(o: BenchOptions) -> float:
    return max(r["gflops"] for r in bench_peak(o.device, o.dtype, quick=True))


def _crossover(o: BenchOptions, m: ModelConfig) -> list[dict]:
    thresholds, rows = thresholds_for(GPT(m), o.device, o.dtype, calibrate=True, progress=True)
    for r in rows:
        r["threshold"] = next(t for k, t in thresholds.items() if k[:3] == (r["kind"], r["d_in"],
                                                                            r["d_out"]))
    return rows


def _crossover_notes(rows: list[dict]) -> list[str]:
    seen = {(r["kind"], r["d_in"], r["d_out"]): r["threshold"] for r in rows}
    return [f"pre-merge {k} {n}->{m}: merged dense below {t} tokens per call"
            for (k, n, m), t in seen.items()] + [f"cached in {cache_path()}"]


def plot_rows(
    rows: list[dict], png: str, x: str, y: str, group: str, title: str, logx: bool = True,
    facet: str | None = None,
) -> None:
    """One line per `group` value of y against x (matplotlib, Agg); one panel per `facet` value."""
    panels = list(dict.fromkeys(r[facet] for r in rows)) if facet else [None]
    fig = Figure(figsize=(5 * len(panels) + 1, 4.5))  # no pyplot: no global backend state
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        sub = [r for r in rows if facet is None or r[facet] == panel]
        for g in dict.fromkeys(r[group] for r in sub):
            pts = sorted((r[x], r[y]) for r in sub if r[group] == g)
            ax.plot(*zip(*pts, strict=True), "o-", label=str(g), ms=4)
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title(f"{title}, {facet} {panel}" if facet else title, fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v)
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of integers") from None


# a tuple of ints on the command line: --tokens 1,16,256 (or 1 16 256)
_INTS = PrimitiveConstructorSpec(
    nargs="+", metavar="N,N,...", instance_from_str=lambda args: sum(map(_ints, args), ()),
    is_instance=lambda x: x is None or isinstance(x, tuple),
    str_from_instance=lambda x: [str(x) if x is None else ",".join(map(str, x))])


def _name(metavar: str, choices: tuple[str, ...] | None = None) -> PrimitiveConstructorSpec:
    """A name on the command line (resolved to a torch object by BenchOptions)."""
    return PrimitiveConstructorSpec(
        nargs=1, metavar="{" + ",".join(choices) + "}" if choices else metavar,
        instance_from_str=lambda args: args[0], choices=choices,
        is_instance=lambda x: True, str_from_instance=lambda x: [str(x)])


_POSITIVE = ("batch", "seq", "prompt", "gen", "reps", "max_batch", "procs", "steps")


@dataclass(frozen=True)
class BenchOptions:
    """The options every benchmark draws from: `structlm bench NAME`'s flags (a field's comment is
    its --help)."""

    # a torch.device, or a name: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps
    device: Annotated[torch.device | str, _name("DEVICE")] = "auto"
    # autocast dtype (None: fp32), or a name: auto (bf16 where the hardware is fast at it), bf16,
    # fp32
    dtype: Annotated[torch.dtype | str | None, _name("DTYPE", ("auto", "bf16", "fp32"))] = "auto"
    quick: bool = False  # small shapes, few repetitions (under a minute)
    backward: bool = False  # kernel/ffn: time forward + backward
    compile: bool = False  # ffn/train: torch.compile every variant (compiled in the warm-up)
    # ffn: 768,1024,1536,2048; coord: 64,128,256,512 (None: these, each benchmark's own)
    widths: Annotated[tuple[int, ...] | None, _INTS] = None
    # ffn: token counts; kernel: the last one
    tokens: Annotated[tuple[int, ...], _INTS] = (1, 16, 256, 4096)
    batch: int | None = None  # decode/train/prefill: batch size
    seq: int = 256  # train/prefill: sequence length
    prompt: int = 32  # decode: prompt tokens before timing
    gen: int = 32  # decode/maxbatch: generated tokens
    # repetitions (interleaved; kernel 7, others 5); coord: seeds per width
    reps: int | None = None
    max_batch: int = 4096  # maxbatch: stop searching here
    calibrate: bool = False  # decode: calibrate pre-merge thresholds first
    procs: int = 2  # memory: ranks of each torchrun
    concurrency: Annotated[tuple[int, ...], _INTS] = (1, 8, 32)  # serve: concurrent clients
    # kernel/ffn: only these structures
    kinds: Annotated[tuple[str, ...] | None, tyro.conf.arg(metavar="KIND [KIND ...]")] = None
    against: Path | None = None  # train: nanoGPT's model.py (yours), timed at the same shapes
    steps: int = 5  # coord: AdamW steps per width
    # coord: lr, base_width (the CLI's --optim.* of the preset)
    optim: Annotated[OptimConfig, tyro.conf.Suppress] = dataclasses.field(
        default_factory=OptimConfig)
    # coord: its batch's source (the CLI's --data.* of the preset)
    data: Annotated[DataConfig, tyro.conf.Suppress] = dataclasses.field(
        default_factory=DataConfig)

    def __post_init__(self) -> None:
        if isinstance(self.device, str):
            object.__setattr__(self, "device", autodetect_device(self.device))
        if isinstance(self.dtype, str):
            object.__setattr__(self, "dtype", autocast_dtype(self.device, self.dtype))
        for name in _POSITIVE:
            v = getattr(self, name)
            if v is not None and not v >= 1:
                raise ValueError(f"--{name} {v}: must be a positive integer")
        for name in ("widths", "tokens", "concurrency"):
            if any(v < 1 for v in getattr(self, name) or ()):
                raise ValueError(f"--{name} {getattr(self, name)}: must be positive integers")
        for kind in self.kinds or ():
            if kind not in LINEARS:
                raise ValueError(f"--kinds {kind}: unknown kind; choose from {sorted(LINEARS)}")

    def reps_or(self, default: int) -> int:
        """--reps where given, else the benchmark's own default."""
        return default if self.reps is None else self.reps

    def widths_or(self, default: tuple[int, ...]) -> tuple[int, ...]:
        """--widths where given, else the benchmark's own default."""
        return default if self.widths is None else self.widths


@dataclass(frozen=True)
class Benchmark:
    run: Callable[[BenchOptions, ModelConfig], list[dict]]
    columns: tuple[str, ...]  # what the printed table shows
    plot: tuple[str, str, str] = ("batch", "tokens_per_s", "variant")  # x, y, one line per
    facet: str | None = None  # one panel per value of this column
    notes: Callable[[list[dict]], list[str]] | None = None  # lines printed after the table
    draw: Callable[[list[dict], str, str], None] | None = None  # its own plot instead of plot_rows


def quick_model(cfg: ModelConfig) -> ModelConfig:
    """A 2-layer d=128 model of the same kind, at the same share of the dense FFN parameters."""
    small = dataclasses.replace(
        cfg, n_layer=2, d_model=128, d_ff=512, n_head=4, n_kv_head=None, attn_dim=None,
        vocab_size=1024, dense_ffn_layers=(0,), ffn=LinearSpec(),
    )
    if cfg.ffn.kind == small.ffn.kind:
        return small
    share = ffn_params(dataclasses.replace(cfg, dense_ffn_layers=()), bias=False) / ffn_params(
        dataclasses.replace(cfg, dense_ffn_layers=(), ffn=LinearSpec()), bias=False)
    spec = choose_hparams(cfg.ffn.kind, [(n, m) for _, n, m in small.ffn_shapes()], share)
    return dataclasses.replace(small, ffn=spec)


def _coord(o: BenchOptions, m: ModelConfig) -> list[dict]:
    m = quick_model(m) if o.quick else m
    kinds = o.kinds or ("dense", *bench_kinds())
    seq = min(32 if o.quick else o.seq, m.block_size)
    rows = coord_check(m, o.optim, o.data, o.widths_or((64, 128, 256, 512)), kinds,
                       3 if o.quick else o.steps,
                       1 if o.quick else o.reps_or(5), o.batch or 8, seq, o.device, o.dtype)
    return [{**r, **context(o.device, o.dtype)} for r in rows]


BENCHMARKS: dict[str, Benchmark] = {
    "peak": Benchmark(
        lambda o, m: bench_peak(o.device, o.dtype, o.quick),
        ("n", "ms", "gflops"), plot=("n", "gflops", "dtype")),
    "kernel": Benchmark(
        lambda o, m: bench_kernel(o.device, o.dtype, o.tokens[-1], o.quick, o.backward,
                                  kinds=o.kinds, reps=o.reps_or(7)),
        ("kind", "d_in", "d_out", "rank", "nblocks", "tokens", "pass", "ms", "dense_ms",
         "speedup", "ideal", "efficiency"), plot=("tokens", "efficiency", "kind")),
    "ffn": Benchmark(
        lambda o, m: bench_ffn(o.device, o.dtype, o.widths_or((768, 1024, 1536, 2048)), o.tokens,
                               o.backward, o.quick,
                               compile=o.compile, kinds=o.kinds, reps=o.reps_or(5)),
        ("variant", "width", "tokens", "pass", "ms", "ms_min", "ms_max", "speedup", "ideal",
         "eager_ms", "eager_speedup", "vs_eager"),
        plot=("tokens", "speedup", "variant"), facet="width"),
    "train": Benchmark(
        lambda o, m: bench_train(quick_model(m) if o.quick else m, o.device, o.dtype,
                                 o.batch or 8, 32 if o.quick else o.seq,
                                 2 if o.quick else o.reps_or(5), _peak_of(o), compile=o.compile,
                                 against=o.against),
        ("variant", "params", "d_model", "batch", "seq", "ms", "tokens_per_s", "gflops", "mfu",
         "speedup")),
    "prefill": Benchmark(
        lambda o, m: bench_prefill(quick_model(m) if o.quick else m, o.device, o.dtype,
                                   o.batch or 4, 32 if o.quick else o.seq, o.reps_or(5)),
        ("variant", "batch", "seq", "ms", "tokens_per_s", "speedup")),
    "decode": Benchmark(
        lambda o, m: bench_decode(quick_model(m) if o.quick else m, o.device, o.dtype,
                                  o.batch or 1, o.prompt, 8 if o.quick else o.gen,
                                  2 if o.quick else o.reps_or(5), o.calibrate),
        ("variant", "batch", "ms_per_token", "ms_min", "ms_max", "tokens_per_s", "vs_dense")),
    "maxbatch": Benchmark(
        lambda o, m: bench_maxbatch(quick_model(m) if o.quick else m, o.device, o.dtype, o.gen,
                                    32 if o.quick else 256, 32 if o.quick else 256,
                                    64 if o.quick else o.max_batch),
        ("variant", "gen", "max_batch", "step_ms", "tokens_per_s", "hit_limit")),
    "memory": Benchmark(
        lambda o, m: bench_memory(quick_model(m) if o.quick else m, o.device, o.dtype,
                                  o.batch or 4, 32 if o.quick else o.seq,
                                  2 if o.quick else o.reps_or(5), o.procs),
        ("variant", "parallel", "activation_checkpointing", "params", "peak_mib",
         "tokens_per_s"), plot=("params", "peak_mib", "parallel")),
    "serve": Benchmark(
        lambda o, m: bench_serve(quick_model(m) if o.quick else m, o.device, o.dtype,
                                 (1, 4) if o.quick else o.concurrency, 16 if o.quick else o.prompt,
                                 8 if o.quick else o.gen, 1 if o.quick else o.reps_or(5)),
        ("variant", "clients", "requests", "errors", "req_per_s", "out_tok_per_s", "ttft_p50_ms",
         "ttft_p95_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p95_ms", "itl_p99_ms"),
        plot=("clients", "out_tok_per_s", "variant")),
    "coord": Benchmark(
        _coord, ("kind", "scaling", "layer", "width", "act_rms", "delta_rms", "slope"),
        draw=plot_coord),
    "crossover": Benchmark(
        _crossover, ("kind", "d_in", "d_out", "tokens", "structured_ms", "merged_ms", "speedup"),
        plot=("tokens", "speedup", "d_out"), facet="d_in", notes=_crossover_notes),
}
