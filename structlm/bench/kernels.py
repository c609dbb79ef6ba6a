"""One structured layer or FFN against dense: the matmul peak, each kernel, whole FFNs eager and
compiled.
"""

from __future__ import annotations

import contextlib
import statistics

import torch
from torch import nn

from structlm.config import ModelConfig
from structlm.linear.base import StructuredLinear
from structlm.linear.registry import LinearSpec, build_linear, choose_hparams, linear_class
from structlm.linear.registry import structured_kinds as registered_kinds
from structlm.model.gpt import MLP
from structlm.utils.device import autocast
from structlm.utils.timing import context, median_ms, time_interleaved


@torch.no_grad()
def bench_peak(device: torch.device, dtype: torch.dtype | None, quick: bool = False) -> list[dict]:
    """Measured square-matmul throughput: the roofline every other figure is compared with."""
    rows = []
    for n in (512, 1024) if quick else (1024, 2048, 4096):
        a = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
        b = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
        o = torch.empty(n, n, device=device, dtype=a.dtype)
        ts = time_interleaved({"mm": lambda: torch.mm(a, b, out=o)},  # noqa: B023
                              device, reps=3 if quick else 5)["mm"]
        ms, lo, hi = median_ms(ts)
        rows.append({"bench": "peak", **context(device, dtype), "n": n, "ms": ms, "ms_min": lo,
                     "ms_max": hi, "gflops": 2 * n**3 / (ms * 1e-3) / 1e9})
    return rows


def kernel_specs(width: int, kinds: list[str] | None = None) -> list[tuple[int, int, LinearSpec]]:
    """(d_in, d_out, spec) of the FFN layers (width -> 4 width -> width) of every structure at each
    of its `bench_fractions` (at width 1024: LowRank R=256, BlockDense R=384 B=4, BlockShuffle B=4
    and B=2)."""
    shapes = [(width, 4 * width), (4 * width, width)]
    out = []
    for kind in kinds or bench_kinds():
        for f in linear_class(kind).bench_fractions:
            spec = choose_hparams(kind, shapes, f)
            out += [(n, m, spec) for n, m in shapes]
    return out


def bench_kinds() -> list[str]:
    """The registered structures a budget rule can size (the ones benchmarks compare)."""
    return [k for k in registered_kinds()
            if linear_class(k).budget.__func__ is not StructuredLinear.budget.__func__]


def bench_kernel(
    device: torch.device, dtype: torch.dtype | None, tokens: int = 4096, quick: bool = False,
    backward: bool = False, kinds: list[str] | None = None, reps: int = 7,
) -> list[dict]:
    """Each structured op against its dense equivalent and against a dense matmul of the same FLOPs
    (the FFN shapes of width 1024, or 256 with `quick`; `kinds` limits the structures).

    `efficiency` = same-FLOP dense time / op time: the share of dense-matmul throughput the op
    reaches."""
    tokens = 256 if quick else tokens
    rows = []
    for d_in, d_out, spec in kernel_specs(256 if quick else 1024, kinds):
        layer = build_linear(spec, d_in, d_out, bias=False, device=device)
        # the dense weights take gradients as the structured factors do: fwd+bwd is three GEMM
        # passes (y, dx, dW) for every variant
        w_dense = layer.to_dense().requires_grad_(backward)
        flops = tokens * layer.flops_per_token()
        # (T, d_in) @ (d_in, k_same): same FLOPs
        k_same = max(1, round(flops / (2 * tokens * d_in)))
        w_same = torch.randn(k_same, d_in, device=device, requires_grad=backward)
        x = torch.randn(tokens, d_in, device=device, requires_grad=backward)

        def run(f):
            def go():
                with autocast(device, dtype):
                    y = f(x)  # noqa: B023
                if backward:
                    y.sum().backward()
            return go

        fns = {"structured": run(layer.matmul),
               "dense": run(lambda x: torch.nn.functional.linear(x, w_dense)),  # noqa: B023
               "same_flops": run(lambda x: torch.nn.functional.linear(x, w_same))}  # noqa: B023
        t = time_interleaved(fns, device, reps=3 if quick else reps)
        s, d, same = (statistics.median(t[k]) for k in ("structured", "dense", "same_flops"))
        mult = 3 if backward else 1
        rows.append({"bench": "kernel", **context(device, dtype), "kind": spec.kind,
                     "d_in": d_in, "d_out": d_out, **spec.hparams(), "tokens": tokens,
                     "pass": "fwd+bwd" if backward else "fwd",
                     "ms": 1e3 * s, "dense_ms": 1e3 * d, "same_flops_ms": 1e3 * same,
                     "gflops": mult * flops / s / 1e9, "speedup": d / s,
                     "ideal": 2 * d_in * d_out / layer.flops_per_token(),
                     "efficiency": same / s})
    return rows


def compile_variants(models: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """torch.compile each variant. Variants share their forward's code, so each one compiles as a
    recompilation of it: dynamo's recompile limit (8) is lifted above their number (x4 for token
    counts), or the variants past the limit would silently run eagerly."""
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 4 * len(models))
    return {name: torch.compile(m) for name, m in models.items()}


def bench_ffn(
    device: torch.device, dtype: torch.dtype | None,
    widths: tuple[int, ...] = (768, 1024, 1536, 2048),
    tokens: tuple[int, ...] = (1, 16, 256, 4096), backward: bool = False, quick: bool = False,
    fractions: tuple[float, ...] = (0.63, 0.32), compile: bool = False,
    kinds: list[str] | None = None, reps: int = 5,
) -> list[dict]:
    """A whole FFN (fc1, GELU, fc2; d -> 4d -> d) for dense and each structure at 63% and 32%,
    against dense. With compile=True every variant is torch.compile'd, and its eager self runs
    in the same interleaved loop: rows say eager_ms, eager_speedup and vs_eager (eager ms /
    compiled ms), so "is compiling worth it" is answered from one run, not from two spells.

    Variants are interleaved per (width, tokens); `ideal` is the parameter (= FLOP) ratio."""
    if quick:
        widths, tokens = (256,), (16, 256)
    rows = []
    for d in widths:
        specs = {"dense": LinearSpec()}
        for f in fractions:
            for kind in kinds or bench_kinds():
                specs[f"{kind}-{round(f * 100)}"] = choose_hparams(
                    kind, [(d, 4 * d), (4 * d, d)], f
                )
        mlps = {name: MLP(ModelConfig(d_model=d, d_ff=4 * d, n_head=1, ffn=spec), 1).to(device)
                for name, spec in specs.items()}
        params = {name: sum(p.numel() for p in m.parameters() if p.dim() > 1)
                  for name, m in mlps.items()}
        eager = mlps
        if compile:
            mlps = compile_variants(mlps)
        for T in tokens:
            x = torch.randn(T, d, device=device, requires_grad=backward)

            def run(m):
                def go():
                    with autocast(device, dtype):
                        y = m(x)  # noqa: B023
                    if backward:
                        y.float().sum().backward()
                return go

            fns = {n: run(m) for n, m in mlps.items()}
            if compile:
                fns |= {f"{n} eager": run(m) for n, m in eager.items()}
            grad = contextlib.nullcontext() if backward else torch.no_grad()
            with grad:
                t = time_interleaved(fns, device, reps=3 if quick else reps)
            for name in mlps:
                row = {"bench": "ffn", **context(device, dtype), "compiled": compile,
                       "variant": name, "kind": specs[name].kind, **specs[name].hparams(),
                       "width": d, "tokens": T, "pass": "fwd+bwd" if backward else "fwd",
                       "ideal": params["dense"] / params[name]}
                rows.append(row | _ffn_times(t, name, T, compile))
    return rows


def _ffn_times(t: dict[str, list[float]], name: str, tokens: int, compile: bool) -> dict:
    """One FFN row's timings from the interleaved run `t` (seconds per call, by variant)."""
    ms, lo, hi = median_ms(t[name])
    out = {"ms": ms, "ms_min": lo, "ms_max": hi, "tokens_per_s": tokens / (ms * 1e-3),
           "speedup": statistics.median(t["dense"]) / (ms * 1e-3)}
    if compile:
        eager_ms = median_ms(t[f"{name} eager"])[0]
        out |= {"eager_ms": eager_ms, "vs_eager": eager_ms / ms,
                "eager_speedup": median_ms(t["dense eager"])[0] / eager_ms}
    return out
