"""Benchmarks: the suite `structlm bench NAME` runs, and the table the CLI reads (`BENCHMARKS`).

    peak       square-matmul throughput (the roofline)
    kernel     each structured op vs its dense matrix and vs a dense matmul of the same FLOPs
    ffn        a whole FFN per structure at 63% / 32% vs dense, over widths and token counts
    train      a training step of the dense and the structured model (MFU against peak), and of
               nanoGPT's GPT at the same shapes with --against PATH/model.py
    prefill    whole-model forward throughput
    decode     per-token decode latency: dense, structured, pre-merged
    maxbatch   the largest decode batch that fits, and its throughput
    crossover  where pre-merge stops paying off, per layer shape (cached for generation)
    coord      muP's coordinate check: activation moves per layer vs width, standard vs mup

Methodology (structlm.timing): warm up, interleave the variants, repeat, report medians and ratios
from one run. Every function returns rows (dicts with their full context: device, dtype, torch
version, shapes, kind, ms, tokens/s) for JSONL output. Which structures are timed comes from the
registry: every registered kind with a budget rule, at its own `bench_fractions`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn
from tqdm import tqdm

from structlm import checkpoint
from structlm.config import DataConfig, ModelConfig, OptimConfig, RunConfig, save_json, to_dict
from structlm.coord import coord_check, plot_coord
from structlm.data import load_tokenizer, prepare
from structlm.flops import ffn_params, flops_per_token, param_groups
from structlm.linear.base import StructuredLinear
from structlm.linear.merge import cache_path, premerge, thresholds_for, unmerge
from structlm.linear.registry import LinearSpec, build_linear, choose_hparams, linear_class
from structlm.linear.registry import structured_kinds as registered_kinds
from structlm.model import GPT, MLP
from structlm.timing import context, median_ms, time_interleaved
from structlm.training.optim import make_optimizer
from structlm.utils import autocast, is_tty, synchronize

# --- decoding -------------------------------------------------------------------------------------


@torch.no_grad()
def decode_latency(
    model: nn.Module, device: torch.device, dtype: torch.dtype | None, batch: int = 1,
    prompt: int = 32, gen: int = 32, reps: int = 5,
) -> list[float]:
    """Seconds per generated token (after a prompt), with the KV cache, for each repetition."""
    vocab = model.cfg.vocab_size
    idx = torch.randint(0, vocab, (batch, prompt), device=device)
    out = []
    for r in range(reps + 1):
        cache = model.make_cache(prompt + gen)
        with autocast(device, dtype):
            logits = model.logits(model.hidden(idx, cache)[:, -1])
            nxt = logits.argmax(-1, keepdim=True)
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(gen):
                logits = model.logits(model.hidden(nxt, cache)[:, -1])
                nxt = logits.argmax(-1, keepdim=True)
            synchronize(device)
        if r:  # the first repetition is warm-up
            out.append((time.perf_counter() - t0) / gen)
    return out


def bench_decode(
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None, batch: int = 1,
    prompt: int = 32, gen: int = 32, reps: int = 5, calibrate: bool = False,
) -> list[dict]:
    """Per-token decode latency of the dense model, the structured model, and the structured model
    with pre-merge, all with identical non-FFN layers; variants interleaved per repetition."""
    torch.manual_seed(0)
    structured = GPT(cfg).to(device).eval()
    dense_cfg = dataclasses.replace(cfg, ffn=LinearSpec())
    dense = GPT(dense_cfg).to(device).eval()
    thresholds, _ = thresholds_for(structured, device, dtype, calibrate)
    variants = {"dense": (dense, False), "structured": (structured, False),
                "premerged": (structured, True)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):
        for name, (m, merged) in variants.items():
            if merged:
                premerge(m, thresholds)
            times[name] += decode_latency(m, device, dtype, batch, prompt, gen, reps=1)
            if merged:
                unmerge(m)
    base = statistics.median(times["dense"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"bench": "decode", **context(device, dtype), "variant": name,
                     "kind": cfg.ffn.kind, "d_model": cfg.d_model, "n_layer": cfg.n_layer,
                     "batch": batch, "prompt": prompt, "gen": gen, "ms_per_token": 1e3 * med,
                     "ms_min": 1e3 * min(ts), "ms_max": 1e3 * max(ts),
                     "tokens_per_s": batch / med, "vs_dense": med / base})
    return rows


# --- the suite: peak, kernel, ffn, train, prefill, maxbatch ---------------------------------------


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


def peak_gflops(rows: list[dict]) -> float:
    return max(r["gflops"] for r in rows if r["bench"] == "peak")


def kernel_specs(width: int, kinds: list[str] | None = None) -> list[tuple[int, int, LinearSpec]]:
    """(d_in, d_out, spec) of the FFN layers (width -> 4 width -> width) of every structure at each
    of its `bench_fractions` (at width 1024: LowRank R=256, BlockDense R=384 B=4, BlockShuffle B=4
    and B=2)."""
    shapes = [(width, 4 * width), (4 * width, width)]
    out = []
    for kind in kinds or structured_kinds():
        for f in linear_class(kind).bench_fractions:
            spec = choose_hparams(kind, shapes, f)
            out += [(n, m, spec) for n, m in shapes]
    return out


def structured_kinds() -> list[str]:
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
            for kind in kinds or structured_kinds():
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


def load_nanogpt(path: Path, cfg: ModelConfig, seq: int, device: torch.device) -> tuple:
    """(model, optimizer) of nanoGPT's GPT from the user's model.py, at cfg's shapes, with its own
    `configure_optimizers` (AdamW, fused on CUDA): what nanoGPT's train.py steps."""
    if not path.is_file():
        raise FileNotFoundError(f"--against {path}: no such file (nanoGPT's model.py)")
    if cfg.act != "gelu" or cfg.d_ff != 4 * cfg.d_model or cfg.n_kv_head not in (None, cfg.n_head):
        raise ValueError(f"--against: nanoGPT's block is a GELU MLP of 4*d_model with full "
                         f"attention; this model has act={cfg.act}, d_ff={cfg.d_ff}, "
                         f"n_kv_head={cfg.n_kv_head} (use --model.act gelu --model.d_ff "
                         f"{4 * cfg.d_model} and no --model.n_kv_head)")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not (hasattr(mod, "GPT") and hasattr(mod, "GPTConfig")):
        raise ValueError(f"--against {path}: defines no GPT and GPTConfig (is it nanoGPT's "
                         "model.py?)")
    conf = mod.GPTConfig(block_size=seq, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                         n_head=cfg.n_head, n_embd=cfg.d_model, dropout=0.0, bias=cfg.bias)
    with contextlib.redirect_stdout(sys.stderr):  # it prints its parameter count
        model = mod.GPT(conf).to(device)
        opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device.type)
    return model, opt


def _train_variants(cfg: ModelConfig, device: torch.device, seq: int, kinds: tuple[str, ...],
                    against: Path | None) -> dict[str, tuple]:
    """name -> (model, optimizer, config for the FLOP count): structlm's dense and structured
    models with the trainer's own optimizer, and nanoGPT's model when `against` is given."""
    cfgs = {"dense": dataclasses.replace(cfg, ffn=LinearSpec()), "structured": cfg}
    out = {}
    if against is not None:
        out["nanogpt"] = (*load_nanogpt(against, cfg, seq, device), cfgs["dense"])
    for k in kinds:
        model = GPT(cfgs[k]).to(device)
        out[k] = (model, make_optimizer(model, OptimConfig(lr=1e-4)), cfgs[k])
    return out


def bench_train(
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None, batch: int = 8,
    seq: int = 256, steps: int = 5, peak: float | None = None,
    kinds: tuple[str, ...] = ("dense", "structured"), compile: bool = False,
    against: Path | None = None,
) -> list[dict]:
    """Training-step throughput (forward, backward, gradient clipping at 1.0, AdamW) of the dense
    and the structured model, and of nanoGPT's GPT at the same shapes when `against` names its
    model.py, interleaved step by step; speed-ups against the first (nanoGPT where given). MFU
    against `peak` GFLOP/s (paper FLOP convention, flops.py). compile=True times
    torch.compile'd models (compiled during the warm-up step)."""
    variants = _train_variants(cfg, device, seq, kinds, against)
    models = {k: v[0] for k, v in variants.items()}
    models = compile_variants(models) if compile else models
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    idx, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()  # nanoGPT .view()s the targets

    def step(k):
        opt = variants[k][1]

        def go():
            with autocast(device, dtype):
                _, loss = models[k](idx, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(variants[k][0].parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return go

    t = time_interleaved({k: step(k) for k in variants}, device, reps=steps, min_time=0.0,
                         warmup=1)
    base = statistics.median(next(iter(t.values())))
    rows = []
    for k, ts in t.items():
        ms, lo, hi = median_ms(ts)
        fpt = 3 * flops_per_token(variants[k][2], seq)["total"]
        achieved = fpt * batch * seq / (ms * 1e-3) / 1e9
        rows.append({"bench": "train", **context(device, dtype), "compiled": compile,
                     "variant": k, "kind": variants[k][2].ffn.kind, "d_model": cfg.d_model,
                     "n_layer": cfg.n_layer, "params": sum(p.numel() for p in
                                                           variants[k][0].parameters()),
                     "batch": batch, "seq": seq, "ms": ms, "ms_min": lo, "ms_max": hi,
                     "tokens_per_s": batch * seq / (ms * 1e-3), "gflops": achieved,
                     "mfu": achieved / peak if peak else None, "speedup": base / (ms * 1e-3)})
    return rows


@torch.no_grad()
def bench_prefill(
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None, batch: int = 4,
    seq: int = 256, reps: int = 5,
) -> list[dict]:
    """Whole-model forward throughput on (batch, seq) inputs, dense vs structured, interleaved."""
    models = {"dense": GPT(dataclasses.replace(cfg, ffn=LinearSpec())).to(device).eval(),
              "structured": GPT(cfg).to(device).eval()}
    x = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)

    def fwd(m):
        def go():
            with autocast(device, dtype):
                m(x)
        return go

    t = time_interleaved({k: fwd(m) for k, m in models.items()}, device, reps=reps, min_time=0.0,
                         warmup=1)
    base = statistics.median(t["dense"])
    return [{"bench": "prefill", **context(device, dtype), "variant": k,
             "kind": models[k].cfg.ffn.kind, "d_model": cfg.d_model, "batch": batch, "seq": seq,
             "ms": median_ms(ts)[0], "tokens_per_s": batch * seq / statistics.median(ts),
             "speedup": base / statistics.median(ts)}
            for k, ts in t.items()]


@torch.no_grad()
def decode_step(
    model: nn.Module, batch: int, gen: int, device: torch.device, dtype: torch.dtype | None,
) -> Callable[[], None]:
    """A closure running one decode step of `batch` sequences at the last position of a full
    `gen`-token KV cache, as the paper measures throughput (docs/method.md §7.5). Allocates the
    cache now, so an out-of-memory error surfaces here."""
    c = model.cfg
    cache = model.make_cache(gen)
    for layer in range(c.n_layer):
        shape = (batch, c.kv_heads, gen, c.head_dim)
        cache.k[layer] = torch.zeros(shape, device=device, dtype=dtype or torch.float32)
        cache.v[layer] = torch.zeros(shape, device=device, dtype=dtype or torch.float32)
    idx = torch.zeros(batch, 1, dtype=torch.long, device=device)

    @torch.no_grad()
    def step() -> None:
        cache.length = gen - 1
        with autocast(device, dtype):
            model.logits(model.hidden(idx, cache)[:, -1])

    return step


def bench_maxbatch(
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None, gen: int = 256,
    start: int = 256, step: int = 256, max_batch: int = 4096,
) -> list[dict]:
    """The largest decode batch that fits (linear search from `start` in `step`s until out of memory
    or `max_batch`, as the paper's cac_batch.py), and the decode throughput at that batch
    (docs/method.md §7.5)."""
    rows = []
    for variant, c in (("dense", dataclasses.replace(cfg, ffn=LinearSpec())), ("structured", cfg)):
        model = GPT(c).to(device).eval()
        best = None
        for b in range(start, max_batch + 1, step):
            try:
                run = decode_step(model, b, gen, device, dtype)
                t0 = time.perf_counter()
                run()
                synchronize(device)
                best = (b, time.perf_counter() - t0)
            except (RuntimeError, MemoryError):  # out of memory
                break
            finally:
                run = None
        if best:
            rows.append({"bench": "maxbatch", **context(device, dtype), "variant": variant,
                         "kind": c.ffn.kind, "gen": gen, "max_batch": best[0],
                         "step_ms": 1e3 * best[1], "tokens_per_s": best[0] / best[1],
                         "hit_limit": best[0] + step > max_batch})
    return rows


def bench_memory(
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None, batch: int = 4,
    seq: int = 256, steps: int = 3, procs: int = 2,
    parallels: tuple[str, ...] = ("ddp", "fsdp"),
    modes: tuple[str, ...] = ("none", "block", "selective"),
) -> list[dict]:
    """Peak memory per rank and tokens/s of training steps, dense and structured, under ddp and
    fsdp, without and with activation checkpointing: each variant its own `procs`-rank torchrun of
    structlm.training.probe (`batch` sequences per rank), so peaks do not mix."""
    rows = []
    variants = [(k, p, ac) for k in ("dense", "structured") for p in parallels for ac in modes]
    for kind, parallel, ac in tqdm(variants, desc="bench memory", unit="run",
                                   disable=not is_tty()):
        c = dataclasses.replace(cfg, ffn=LinearSpec()) if kind == "dense" else cfg
        job = {"model": to_dict(c), "parallel": parallel, "ac": ac, "batch": batch, "seq": seq,
               "steps": steps, "device": device.type,
               "dtype": "fp32" if dtype is None else "bf16"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(procs), "-m", "structlm.training.probe", json.dumps(job)]
        r = subprocess.run(cmd, capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1)
                                                                        // procs))})
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("PROBE ")), None)
        if r.returncode or line is None:
            raise RuntimeError(f"bench memory: {kind} {parallel} {ac} failed:\n{r.stderr[-2000:]}")
        rows.append({"bench": "memory", **context(device, dtype), "variant": kind,
                     "kind": c.ffn.kind, "parallel": parallel, "activation_checkpointing": ac,
                     "ranks": procs, "batch_per_rank": batch, "seq": seq,
                     "params": param_groups(c)["total"], **json.loads(line[6:])})
    return rows


def bench_serve(
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None,
    concurrency: tuple[int, ...] = (1, 8, 32), prompt: int = 64, gen: int = 64, reps: int = 1,
) -> list[dict]:
    """structlm serve under load: the dense model, the structured one without and with pre-merge
    (random weights of the config, the built-in corpus's tokenizer), each in its own server on
    loopback; for each concurrency, 2 x concurrency streaming requests (at least 8) per server,
    the servers interleaved `reps` times."""
    from structlm.serving.load import run_load
    from structlm.serving.server import BackgroundServer, build

    tok = prepare(DataConfig()) / "tokenizer.json"
    cfg = dataclasses.replace(cfg, vocab_size=load_tokenizer(tok).get_vocab_size())
    variants = {"dense": (dataclasses.replace(cfg, ffn=LinearSpec()), False),
                "structured": (cfg, False), "structured+premerge": (cfg, True)}
    with tempfile.TemporaryDirectory() as tmp:
        servers = {}
        for name, (c, merge) in variants.items():
            run = random_run(Path(tmp) / name.replace("+", "-"), c, tok)
            app, engine = build(str(run), device=device.type, max_batch=max(concurrency),
                                dtype="fp32" if dtype is None else "bf16", premerge=merge,
                                max_tokens=2 * gen)
            servers[name] = BackgroundServer(app, engine)
        rows = []
        try:
            for conc in concurrency:
                for _ in range(reps):
                    for name, srv in servers.items():
                        r = run_load(srv.url, conc, max(8, 2 * conc), prompt, gen)
                        rows.append({"bench": "serve", **context(device, dtype), "variant": name,
                                     "kind": variants[name][0].ffn.kind,
                                     "d_model": cfg.d_model, "n_layer": cfg.n_layer, **r})
        finally:
            for srv in servers.values():
                srv.close()
    return rows


def random_run(out: Path, cfg: ModelConfig, tokenizer: Path) -> Path:
    """A run directory of a randomly initialised model (for speed measurements)."""
    torch.manual_seed(0)
    run_cfg = RunConfig(model=cfg)
    checkpoint.save(out, GPT(cfg), None, run_cfg, 0, {})
    save_json(run_cfg, str(out / "config.json"))
    shutil.copyfile(tokenizer, out / "tokenizer.json")
    return out


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


# --- the table `structlm bench` reads ----------------------------------------------------------


@dataclass(frozen=True)
class BenchOptions:
    """The options every benchmark draws from (the CLI's flags)."""

    device: torch.device
    dtype: torch.dtype | None
    quick: bool = False  # small shapes, few repetitions
    backward: bool = False  # kernel/ffn: forward + backward
    compile: bool = False  # ffn/train: torch.compile every variant
    widths: tuple[int, ...] = (768, 1024, 1536, 2048)  # ffn
    tokens: tuple[int, ...] = (1, 16, 256, 4096)  # ffn; kernel: the last one
    batch: int | None = None  # decode/train/prefill
    seq: int = 256  # train/prefill
    prompt: int = 32  # decode
    gen: int = 32  # decode/maxbatch
    reps: int | None = None  # None: each benchmark's own default
    max_batch: int = 4096  # maxbatch
    calibrate: bool = False  # decode: calibrate pre-merge first
    procs: int = 2  # memory: ranks of each torchrun
    concurrency: tuple[int, ...] = (1, 8, 32)  # serve: concurrent clients
    kinds: tuple[str, ...] | None = None  # kernel/ffn: only these structures
    against: Path | None = None  # train: nanoGPT's model.py, timed beside structlm's models
    steps: int = 5  # coord: AdamW steps per width
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)  # coord: lr, base_width
    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # coord: its batch's source

    def reps_or(self, default: int) -> int:
        """--reps where given, else the benchmark's own default."""
        return default if self.reps is None else self.reps


@dataclass(frozen=True)
class Benchmark:
    run: Callable[[BenchOptions, ModelConfig], list[dict]]
    columns: tuple[str, ...]  # what the printed table shows
    plot: tuple[str, str, str] = ("batch", "tokens_per_s", "variant")  # x, y, one line per
    facet: str | None = None  # one panel per value of this column
    notes: Callable[[list[dict]], list[str]] | None = None  # lines printed after the table
    widths: tuple[int, ...] = (768, 1024, 1536, 2048)  # --widths when not given
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


def _peak_of(o: BenchOptions) -> float:
    return max(r["gflops"] for r in bench_peak(o.device, o.dtype, quick=True))


def _coord(o: BenchOptions, m: ModelConfig) -> list[dict]:
    m = quick_model(m) if o.quick else m
    kinds = o.kinds or ("dense", *structured_kinds())
    seq = min(32 if o.quick else o.seq, m.block_size)
    rows = coord_check(m, o.optim, o.data, o.widths, kinds, 3 if o.quick else o.steps,
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
        lambda o, m: bench_ffn(o.device, o.dtype, o.widths, o.tokens, o.backward, o.quick,
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
        widths=(64, 128, 256, 512), draw=plot_coord),
    "crossover": Benchmark(
        _crossover, ("kind", "d_in", "d_out", "tokens", "structured_ms", "merged_ms", "speedup"),
        plot=("tokens", "speedup", "d_out"), facet="d_in", notes=_crossover_notes),
}
