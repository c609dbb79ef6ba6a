"""Benchmarks: careful timing, pre-merge crossover calibration, decoding latency.

Methodology (PERF_NOTES): warm up, interleave the variants being compared, repeat, report medians (and
min/max) and ratios measured within one run; synchronise on accelerators. Every function returns rows (dicts
with their full context: device, dtype, torch version, shapes, kind, ms, tokens/s) for JSONL output.
"""

from __future__ import annotations

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

DEFAULT_MAX_DENSE_TOKENS = 16  # pre-merge below 16 tokens per call when uncalibrated (the paper's example)
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
    fns: dict[str, Callable[[], object]], device: torch.device, reps: int = 7, min_time: float = 0.02,
    warmup: int = 2,
) -> dict[str, list[float]]:
    """Seconds per call of each fn, interleaved: every repetition runs every variant once (in rotating
    order), each timed over enough inner calls to last `min_time`. Returns {name: [seconds per call]}."""
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
    return {"device": device_name(device), "dtype": str(dtype or torch.float32).replace("torch.", ""),
            "torch": torch.__version__}


# --- pre-merge crossover ---------------------------------------------------------------------------


def cache_path() -> Path:
    root = os.environ.get("STRUCTLM_CACHE") or Path.home() / ".cache" / "structlm"
    return Path(root) / "premerge.json"


def crossover_key(layer: StructuredLinear, device: torch.device, dtype: torch.dtype | None) -> str:
    """Cache key: a threshold is valid only for this device, dtype, torch version, kind, shape and hp."""
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

    Returns (threshold, rows): the merged path is used below `threshold` tokens. The threshold is the
    smallest measured count from which the structured path is faster at every larger count (1 if it is
    always faster, one past the grid if it never is)."""
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
        faster.append(s < m)
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
    """Pre-merge thresholds for every distinct structured layer of `model`: from the cache, measured when
    `calibrate` (and cached), else DEFAULT_MAX_DENSE_TOKENS. Returns ({layer_key: threshold}, rows)."""
    cache = load_cache()
    out, rows, changed = {}, [], False
    layers = {layer_key(m): m for m in model.modules() if isinstance(m, StructuredLinear) and m.kind != "dense"}
    for key, layer in layers.items():
        ck = crossover_key(layer, device, dtype)
        if ck in cache and not calibrate:
            out[key] = cache[ck]
        elif calibrate:
            if progress:
                print(f"calibrating {layer.kind} {layer.d_in}->{layer.d_out} {layer.hp} ...", flush=True)
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
    model: nn.Module, device: torch.device, dtype: torch.dtype | None, batch: int = 1, prompt: int = 32,
    gen: int = 32, reps: int = 5,
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
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None, batch: int = 1, prompt: int = 32,
    gen: int = 32, reps: int = 5, calibrate: bool = False,
) -> list[dict]:
    """Per-token decode latency of the dense model, the structured model, and the structured model with
    pre-merge, all with identical non-FFN layers; variants interleaved per repetition."""
    from structlm.model import GPT

    torch.manual_seed(0)
    structured = GPT(cfg).to(device).eval()
    dense_cfg = dataclasses.replace(cfg, ffn=LinearSpec())
    dense = GPT(dense_cfg).to(device).eval()
    thresholds, _ = thresholds_for(structured, device, dtype, calibrate)
    variants = {"dense": (dense, False), "structured": (structured, False), "premerged": (structured, True)}
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
        rows.append({"bench": "decode", **context(device, dtype), "variant": name, "kind": cfg.ffn.kind,
                     "d_model": cfg.d_model, "n_layer": cfg.n_layer, "batch": batch, "prompt": prompt,
                     "gen": gen, "ms_per_token": 1e3 * med, "ms_min": 1e3 * min(ts), "ms_max": 1e3 * max(ts),
                     "tokens_per_s": batch / med, "vs_dense": med / base})
    return rows


def ffn_layers(cfg: ModelConfig) -> list[StructuredLinear]:
    """One freshly built layer per distinct structured FFN shape of `cfg` (for calibration tables)."""
    layers = []
    for _, d_in, d_out in cfg.ffn_shapes():
        if cfg.ffn.kind != "dense":
            layers.append(build_linear(cfg.ffn, d_in, d_out, bias=cfg.bias))
    return layers
