"""Decoding and prefill: latency per token at a batch size, the pre-merge crossover, the largest
batch that fits.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from structlm.config import ModelConfig
from structlm.linear.merge import premerge, thresholds_for, unmerge
from structlm.linear.registry import LinearSpec
from structlm.model.gpt import GPT
from structlm.utils.device import autocast, synchronize
from structlm.utils.timing import context, median_ms, time_interleaved


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
