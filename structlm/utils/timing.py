"""Careful timing: interleaved repetitions, medians, the context a figure belongs to.

Warm up, interleave the variants being compared, repeat, and report medians (with min/max) and
ratios measured within one run; synchronise on accelerators. Used by the benchmarks and by
pre-merge calibration.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch

from structlm.utils.device import synchronize


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


def median_ms(ts: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of per-call seconds, in milliseconds."""
    return 1e3 * statistics.median(ts), 1e3 * min(ts), 1e3 * max(ts)
