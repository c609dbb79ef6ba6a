"""Devices, precision, seeding and the process's allocator: nothing model-specific."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import random

import numpy as np
import torch


def autodetect_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit name must be a device this machine has
    (ValueError naming the fix otherwise)."""
    if name != "auto":
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise ValueError(
                f"device {name!r} is not a device name; use auto, cpu, cuda, cuda:N or mps"
            ) from None
        _check_available(dev)
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _check_available(dev: torch.device) -> None:
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            build = "a CPU-only build" if torch.version.cuda is None else "no visible GPU"
            raise ValueError(f"device {dev} asked for, but this machine has no CUDA device (torch "
                             f"{torch.__version__}: {build}); use device cpu or auto")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {dev} asked for, but there are {n} CUDA device(s): "
                             f"0..{n - 1}")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                    and torch.backends.mps.is_available()):
        raise ValueError(f"device {dev} asked for, but MPS is not available here; use cpu or auto")


def cpu_has_fast_bf16() -> bool:
    """True if this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX): there bf16 is several
    times faster than fp32; without them (e.g. AVX2-only CPUs) oneDNN emulates bf16 and it is
    orders of magnitude slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `dtype` on `device` (None = plain fp32).

    `auto` = bf16 where the hardware computes it fast (CUDA with bf16 support, CPUs with
    AVX512-BF16/AMX), fp32 elsewhere. `bf16` forces bf16 autocast wherever PyTorch supports it, fast
    or not.
    """
    if dtype == "fp32":
        return None
    if device.type == "cuda":
        supported = fast = torch.cuda.is_bf16_supported()
    else:
        supported = device.type == "cpu"  # CPU autocast supports bf16; mps stays fp32
        fast = supported and cpu_has_fast_bf16()
    if dtype == "bf16":
        if not supported:
            raise ValueError(f"bf16 autocast is not supported on {device}; use --train.dtype fp32")
        return torch.bfloat16
    return torch.bfloat16 if fast else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """A context manager: bf16 autocast on `device`, or nothing when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) for a plain process."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
    )


MALLOC_ENV = "STRUCTLM_MALLOC"  # reuse (default) | system

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>


def reuse_freed_memory() -> bool:
    """Make glibc malloc keep freed blocks of up to 1 GiB for reuse instead of handing them back
    to the OS; returns whether it applied.

    By default glibc serves every block over 32 MiB with a fresh mmap and unmaps it on free, so
    each large activation a training step allocates is page-faulted in again, zero-filled by the
    kernel, every step, which made GELU several times slower than its arithmetic (measured in
    BENCHMARKS.md). The cost is that the process keeps its high-water heap.
    The CLI calls this at start-up; STRUCTLM_MALLOC=system leaves malloc as it is. A no-op where
    the C library is not glibc."""
    choice = os.environ.get(MALLOC_ENV, "reuse")
    if choice not in ("reuse", "system"):
        raise ValueError(f"{MALLOC_ENV}={choice!r}: choose reuse or system")
    if choice == "system" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    # older glibc caps the mmap threshold at HEAP_MAX_SIZE/2 (32 MiB on 64-bit): fall back to that
    mmap_ok = any(libc.mallopt(_M_MMAP_THRESHOLD, v) == 1 for v in (1 << 30, 1 << 25))
    trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
    return mmap_ok and trim_ok
