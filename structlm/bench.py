"""Benchmarks: careful timing, pre-merge crossover calibration, decoding latency.

Methodology (PERF_NOTES): warm up, interleave the variants being compared, repeat, report medians
(and min/max) and ratios measured within one run; synchronise on accelerators. Every function
returns rows (dicts with their full context: device, dtype, torch version, shapes, kind, ms,
tokens/s) for JSONL output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from structlm.config import LinearSpec, ModelConfig
from structlm.linear import build_linear
from structlm.linear.base import StructuredLinear
from structlm.linear.guided import layer_key, premerge, unmerge
from structlm.utils import autocast, synchronize

# pre-merge below 16 tokens per call when uncalibrated (the paper's example)
DEFAULT_MAX_DENSE_TOKENS = 16
TOKEN_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def device_name(device: torch.device) -> str:
    """A stable name for the hardware a timing belongs to."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} x{torch.get_num_threads()} threads"


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, reps: int = 7,
    min_time: float = 0.02, warmup: int = 2,
) -> dict[str, list[float]]:
    """Seconds per call of each fn, interleaved: every repetition runs every variant once (in
    rotating order), each timed over enough inner calls to last `min_time`. Returns
    {name: [seconds per call]}."""
    inner = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        synchronize(device)
        n, t = 1, 0.0
        while True:  # calibrate the inner loop count
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            synchronize(device)
            t = time.perf_counter() - t0
            if t >= min_time or n >= 1 << 16:
                break
            n *= 2
        inner[name] = n
    out: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn, n = fns[name], inner[name]
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            synchronize(device)
            out[name].append((time.perf_counter() - t0) / n)
    return out


def context(device: torch.device, dtype: torch.dtype | None) -> dict:
    return {"device": device_name(device),
            "dtype": str(dtype or torch.float32).replace("torch.", ""), "torch": torch.__version__}


# --- pre-merge crossover --------------------------------------------------------------------------


def cache_path() -> Path:
    root = os.environ.get("STRUCTLM_CACHE") or Path.home() / ".cache" / "structlm"
    return Path(root) / "premerge.json"


def crossover_key(layer: StructuredLinear, device: torch.device, dtype: torch.dtype | None) -> str:
    """Cache key: a threshold is valid only for this device, dtype, torch version, kind, shape and
    hp."""
    c = context(device, dtype)
    return json.dumps([c["device"], c["dtype"], c["torch"], *map(str, layer_key(layer))])


def load_cache() -> dict[str, int]:
    p = cache_path()
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def save_cache(cache: dict[str, int]) -> None:
    p = cache_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1))
    tmp.replace(p)


@torch.no_grad()
def calibrate_layer(
    layer: StructuredLinear, device: torch.device, dtype: torch.dtype | None,
    tokens: tuple[int, ...] = TOKEN_GRID, reps: int = 5,
) -> tuple[int, list[dict]]:
    """Time the structured path against the merged dense matrix at each token count.

    Returns (threshold, rows): the merged path is used below `threshold` tokens. The threshold is
    the smallest measured count from which the structured path is faster (or within 5%) at every
    larger count (1 if it always is, one past the grid if it never is)."""
    layer = layer.to(device).eval()
    merged = layer.to_dense()
    bias = layer.bias
    rows, faster = [], []
    for T in tokens:
        x = torch.randn(T, layer.d_in, device=device)
        with autocast(device, dtype):
            times = time_interleaved(
                {"structured": lambda x=x: layer(x),
                 "merged": lambda x=x: torch.nn.functional.linear(x, merged, bias)},
                device, reps=reps, min_time=0.01,
            )
        s, m = statistics.median(times["structured"]), statistics.median(times["merged"])
        faster.append(s <= 1.05 * m)  # a tie within timing noise goes to the path with fewer FLOPs
        rows.append({"bench": "crossover", **context(device, dtype), "kind": layer.kind,
                     "d_in": layer.d_in, "d_out": layer.d_out, **layer.hp, "tokens": T,
                     "structured_ms": 1e3 * s, "merged_ms": 1e3 * m, "speedup": m / s})
    threshold = tokens[-1] * 2
    for i in range(len(tokens) - 1, -1, -1):
        if not faster[i]:
            break
        threshold = tokens[i]
    return threshold, rows


def thresholds_for(
    model: nn.Module, device: torch.device, dtype: torch.dtype | None, calibrate: bool = False,
    progress: bool = False,
) -> tuple[dict[tuple, int], list[dict]]:
    """Pre-merge thresholds for every distinct structured layer of `model`: from the cache, measured
    when `calibrate` (and cached), else DEFAULT_MAX_DENSE_TOKENS. Returns
    ({layer_key: threshold}, rows)."""
    cache = load_cache()
    out, rows, changed = {}, [], False
    layers = {layer_key(m): m for m in model.modules()
              if isinstance(m, StructuredLinear) and m.kind != "dense"}
    for key, layer in layers.items():
        ck = crossover_key(layer, device, dtype)
        if ck in cache and not calibrate:
            out[key] = cache[ck]
        elif calibrate:
            if progress:
                print(f"calibrating {layer.kind} {layer.d_in}->{layer.d_out} {layer.hp} ...",
                      flush=True)
            out[key], r = calibrate_layer(layer, device, dtype)
            rows += r
            cache[ck] = out[key]
            changed = True
        else:
            out[key] = DEFAULT_MAX_DENSE_TOKENS
    if changed:
        save_cache(cache)
    return out, rows


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
            logits = model.lm_head(model.hidden(idx, cache)[:, -1])
            nxt = logits.argmax(-1, keepdim=True)
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(gen):
                logits = model.lm_head(model.hidden(nxt, cache)[:, -1])
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
    from structlm.model import GPT

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


def _median_ms(ts: list[float]) -> tuple[float, float, float]:
    return 1e3 * statistics.median(ts), 1e3 * min(ts), 1e3 * max(ts)


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
        ms, lo, hi = _median_ms(ts)
        rows.append({"bench": "peak", **context(device, dtype), "n": n, "ms": ms, "ms_min": lo,
                     "ms_max": hi, "gflops": 2 * n**3 / (ms * 1e-3) / 1e9})
    return rows


def peak_gflops(rows: list[dict]) -> float:
    return max(r["gflops"] for r in rows if r["bench"] == "peak")


KERNEL_SHAPES = [  # (kind, d_in, d_out, hp): the FFN shapes of the paper's widths at 32% / 63%
    ("lowrank", 1024, 4096, {"rank": 256}), ("lowrank", 4096, 1024, {"rank": 256}),
    ("blockdense", 1024, 4096, {"rank": 384, "nblocks": 4}),
    ("blockdense", 4096, 1024, {"rank": 384, "nblocks": 4}),
    ("blockshuffle", 1024, 4096, {"nblocks": 4}), ("blockshuffle", 4096, 1024, {"nblocks": 4}),
    ("blockshuffle", 1024, 4096, {"nblocks": 2}), ("blockshuffle", 4096, 1024, {"nblocks": 2}),
]


def bench_kernel(
    device: torch.device, dtype: torch.dtype | None, tokens: int = 4096, quick: bool = False,
    backward: bool = False,
) -> list[dict]:
    """Each structured op against its dense equivalent and against a dense matmul of the same FLOPs.

    `efficiency` = same-FLOP dense time / op time: the share of dense-matmul throughput the op
    reaches."""
    shapes = [(k, n // 4, m // 4, {h: v // 4 if h == "rank" else v for h, v in hp.items()})
              for k, n, m, hp in KERNEL_SHAPES] if quick else KERNEL_SHAPES
    tokens = 256 if quick else tokens
    rows = []
    for kind, d_in, d_out, hp in shapes:
        layer = build_linear(LinearSpec(kind, **hp), d_in, d_out, bias=False, device=device)
        # the dense weights take gradients as the structured factors do: fwd+bwd is three GEMM
        # passes (y, dx, dW) for every variant
        w_dense = layer.to_dense().requires_grad_(backward)
        flops = 2 * tokens * layer.weight_params(d_in, d_out, **hp)
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
        t = time_interleaved(fns, device, reps=3 if quick else 7)
        s, d, same = (statistics.median(t[k]) for k in ("structured", "dense", "same_flops"))
        mult = 3 if backward else 1
        rows.append({"bench": "kernel", **context(device, dtype), "kind": kind, "d_in": d_in,
                     "d_out": d_out, **hp, "tokens": tokens,
                     "pass": "fwd+bwd" if backward else "fwd",
                     "ms": 1e3 * s, "dense_ms": 1e3 * d, "same_flops_ms": 1e3 * same,
                     "gflops": mult * flops / s / 1e9, "speedup": d / s,
                     "ideal": d_in * d_out / layer.weight_params(d_in, d_out, **hp),
                     "efficiency": same / s})
    return rows


def _mlp(cfg: ModelConfig, device):
    from structlm.model import MLP

    return MLP(cfg, layer=1).to(device)


def bench_ffn(
    device: torch.device, dtype: torch.dtype | None,
    widths: tuple[int, ...] = (768, 1024, 1536, 2048),
    tokens: tuple[int, ...] = (1, 16, 256, 4096), backward: bool = False, quick: bool = False,
    fractions: tuple[float, ...] = (0.63, 0.32), compile: bool = False,
) -> list[dict]:
    """A whole FFN (fc1, GELU, fc2; d -> 4d -> d) for dense and each structure at 63% and 32%,
    against dense (every variant torch.compile'd with compile=True).

    Variants are interleaved per (width, tokens); `ideal` is the parameter (= FLOP) ratio."""
    from structlm.linear import choose_hparams

    if quick:
        widths, tokens = (256,), (16, 256)
    rows = []
    for d in widths:
        specs = {"dense": LinearSpec()}
        for f in fractions:
            for kind in ("lowrank", "blockdense", "blockshuffle"):
                specs[f"{kind}-{round(f * 100)}"] = choose_hparams(
                    kind, [(d, 4 * d), (4 * d, d)], f
                )
        mlps = {name: _mlp(ModelConfig(d_model=d, d_ff=4 * d, n_head=1, ffn=spec), device)
                for name, spec in specs.items()}
        params = {name: sum(p.numel() for p in m.parameters() if p.dim() > 1)
                  for name, m in mlps.items()}
        if compile:
            mlps = {name: torch.compile(m) for name, m in mlps.items()}
        for T in tokens:
            x = torch.randn(T, d, device=device, requires_grad=backward)

            def run(m):
                def go():
                    with autocast(device, dtype):
                        y = m(x)  # noqa: B023
                    if backward:
                        y.float().sum().backward()
                return go

            grad = contextlib.nullcontext() if backward else torch.no_grad()
            with grad:
                t = time_interleaved({n: run(m) for n, m in mlps.items()}, device,
                                     reps=3 if quick else 5)
            base = statistics.median(t["dense"])
            for name, ts in t.items():
                ms, lo, hi = _median_ms(ts)
                rows.append({"bench": "ffn", **context(device, dtype), "compiled": compile,
                             "variant": name,
                             "kind": specs[name].kind, **specs[name].hparams(), "width": d,
                             "tokens": T, "pass": "fwd+bwd" if backward else "fwd", "ms": ms,
                             "ms_min": lo, "ms_max": hi,
                             "tokens_per_s": T / (ms * 1e-3), "speedup": base / (ms * 1e-3),
                             "ideal": params["dense"] / params[name]})
    return rows


def bench_train(
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None, batch: int = 8,
    seq: int = 256, steps: int = 5, peak: float | None = None,
    kinds: tuple[str, ...] = ("dense", "structured"), compile: bool = False,
) -> list[dict]:
    """Training-step throughput (forward + backward + AdamW) of the dense and the structured model,
    interleaved step by step; MFU against `peak` GFLOP/s (paper FLOP convention, flops.py).
    compile=True times torch.compile'd models (compiled during the warm-up step)."""
    from structlm.flops import flops_per_token
    from structlm.model import GPT

    cfgs = {"dense": dataclasses.replace(cfg, ffn=LinearSpec()), "structured": cfg}
    models = {k: GPT(cfgs[k]).to(device) for k in kinds}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    if compile:
        models = {k: torch.compile(m) for k, m in models.items()}
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)

    def step(k):
        def go():
            with autocast(device, dtype):
                _, loss = models[k](x[:, :-1], x[:, 1:])
            loss.backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
        return go

    t = time_interleaved({k: step(k) for k in kinds}, device, reps=steps, min_time=0.0, warmup=1)
    base = statistics.median(t[kinds[0]])
    rows = []
    for k, ts in t.items():
        ms, lo, hi = _median_ms(ts)
        fpt = 3 * flops_per_token(cfgs[k], seq)["total"]
        achieved = fpt * batch * seq / (ms * 1e-3) / 1e9
        rows.append({"bench": "train", **context(device, dtype), "compiled": compile,
                     "variant": k,
                     "kind": cfgs[k].ffn.kind, "d_model": cfg.d_model, "n_layer": cfg.n_layer,
                     "batch": batch, "seq": seq, "ms": ms,
                     "ms_min": lo, "ms_max": hi, "tokens_per_s": batch * seq / (ms * 1e-3),
                     "gflops": achieved, "mfu": achieved / peak if peak else None,
                     "speedup": base / (ms * 1e-3)})
    return rows


@torch.no_grad()
def bench_prefill(
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None, batch: int = 4,
    seq: int = 256, reps: int = 5,
) -> list[dict]:
    """Whole-model forward throughput on (batch, seq) inputs, dense vs structured, interleaved."""
    from structlm.model import GPT

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
             "ms": _median_ms(ts)[0], "tokens_per_s": batch * seq / statistics.median(ts),
             "speedup": base / statistics.median(ts)}
            for k, ts in t.items()]


@torch.no_grad()
def decode_step(
    model: nn.Module, batch: int, gen: int, device: torch.device, dtype: torch.dtype | None,
) -> Callable[[], None]:
    """A closure running one decode step of `batch` sequences at the last position of a full
    `gen`-token KV cache, as the paper measures throughput (SPEC §7.5). Allocates the cache now, so
    an out-of-memory error surfaces here."""
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
            model.lm_head(model.hidden(idx, cache)[:, -1])

    return step


def bench_maxbatch(
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None, gen: int = 256,
    start: int = 256, step: int = 256, max_batch: int = 4096,
) -> list[dict]:
    """The largest decode batch that fits (linear search from `start` in `step`s until out of memory
    or `max_batch`, as the paper's cac_batch.py), and the decode throughput at that batch
    (SPEC §7.5)."""
    from structlm.model import GPT

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


def plot_rows(
    rows: list[dict], png: str, x: str, y: str, group: str, title: str, logx: bool = True,
    facet: str | None = None,
) -> None:
    """One line per `group` value of y against x (matplotlib, Agg); one panel per `facet` value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(r[facet] for r in rows)) if facet else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 1, 4.5), squeeze=False)
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
    plt.close(fig)
