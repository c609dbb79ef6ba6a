"""CPU kernels of our own: C files in structlm/csrc, compiled on first use and loaded with ctypes.

Each source is built once per machine with the system C compiler (`$CC`, else cc or gcc) at
-O3 -march=native into a cache folder (`$STRUCTLM_CACHE`, else ~/.cache/structlm), keyed by the
source and the shared headers beside it (csrc/*.h), the flags and the CPU's feature flags, so a
shared home across CPU models stays correct.
A build takes well under a second; a later process only loads the file. The kernels take plain
pointers (no PyTorch headers, no Python API) and share their work among OpenMP threads: built
with -fopenmp, they bind libgomp by its soname to the copy PyTorch has already loaded, so they
run on PyTorch's own threads and thread count (`torch.set_num_threads`) rather than beside
them. (Python threads started right after a PyTorch op competed with its OpenMP threads, which
spin for a while before they sleep: a kernel took up to 1.5x as long in a training step.)

Where no compiler is found or the build fails, `load` returns None and says why once; callers
fall back to PyTorch's own kernels. Where PyTorch runs on another OpenMP runtime (Intel's libiomp5
or LLVM's libomp, as in some conda builds), loading a kernel brings libgomp in beside it: `load`
notices the second runtime in the process and warns once, naming the switches that avoid it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from structlm.utils import cache_dir

CSRC = Path(__file__).parent / "csrc"
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fno-math-errno", "-shared",
         "-fPIC")
OPENMP = "-fopenmp"  # libgomp by soname: the copy PyTorch has loaded, so its threads are ours
_loaded: dict[str, ctypes.CDLL | None] = {}
_warned: list[str] = []  # the kernel whose load brought a second OpenMP runtime (warned once)
# the files of the three OpenMP runtimes (GNU, Intel, LLVM), as wheels and distributions name them
_OPENMP = re.compile(r"/(libgomp|libiomp5|libomp)(-[0-9a-f]+)?\.so[.\d]*$")
SWITCHES = ("STRUCTLM_GELU", "STRUCTLM_SHUFFLE", "STRUCTLM_CROSS_ENTROPY", "STRUCTLM_ROPE",
            "STRUCTLM_ATTENTION_KERNEL")  # =aten turns each kernel off


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")


def _compiler() -> str | None:
    cands = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc"]
    return next((c for c in cands if shutil.which(c)), None)


def _build(src: Path, cc: str) -> Path:
    """The shared library of `src`, compiled unless the cache has it; written atomically, so
    ranks of one job building at once each end with a complete file."""
    text = src.read_bytes() + b"".join(h.read_bytes() for h in sorted(src.parent.glob("*.h")))
    flags = " ".join((cc, *FLAGS, OPENMP, _cpu_flags()))
    key = hashlib.sha256(text + flags.encode()).hexdigest()[:16]
    out = cache_dir() / f"{src.stem}-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        try:
            subprocess.run([cc, *FLAGS, OPENMP, "-o", tmp, str(src)], check=True,
                           capture_output=True, text=True)
        except subprocess.CalledProcessError:  # no OpenMP (Apple clang): its loops run serially
            subprocess.run([cc, *FLAGS, "-o", tmp, str(src)], check=True, capture_output=True,
                           text=True)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def openmp_runtimes(maps: str | None = None) -> set[str]:
    """The OpenMP runtimes' files mapped into this process (from /proc/self/maps, or `maps`'s
    text; empty where it cannot be read, as off Linux)."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return set()
    paths = (ln.split(maxsplit=5)[-1] for ln in maps.splitlines() if ln.count(" ") >= 5)
    return {p for p in paths if _OPENMP.search(p)}


def warn_second_runtime(before: set[str], after: set[str], name: str) -> None:
    """One warning where loading `name` added an OpenMP runtime beside one already loaded."""
    added = sorted(after - before)
    if before and added and not _warned:
        _warned.append(name)
        warnings.warn(
            f"structlm's CPU kernels ({name}.c) loaded the OpenMP runtime {added[0]} beside "
            f"PyTorch's {sorted(before)[0]}: two thread pools now compete for the cores, and the "
            f"kernels and PyTorch's ops slow each other down. Set OMP_WAIT_POLICY=passive, or turn "
            f"the kernels off with {'=aten, '.join(SWITCHES)}=aten.", stacklevel=3)


def load(name: str) -> ctypes.CDLL | None:
    """csrc/<name>.c as a loaded library, or None (with one warning) where it cannot be built."""
    if name not in _loaded:
        cc = _compiler()
        try:
            if cc is None:
                raise RuntimeError("no C compiler (cc, gcc or $CC) on PATH")
            before = openmp_runtimes()
            _loaded[name] = ctypes.CDLL(str(_build(CSRC / f"{name}.c", cc)))
            warn_second_runtime(before, openmp_runtimes(), name)
        except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            warnings.warn(f"structlm's CPU kernels ({name}.c) could not be built: "
                          f"{detail.strip()[:300]}; using PyTorch's kernels instead.",
                          stacklevel=2)
            _loaded[name] = None
    return _loaded[name]


def enabled(env: str) -> bool:
    """Whether the switch `env` (native, the default, or aten) picks our kernels; a bad value is
    an error that names both."""
    choice = os.environ.get(env, "native")
    if choice not in ("native", "aten"):
        raise ValueError(f"{env}={choice!r}: choose native or aten")
    return choice == "native"


SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}  # kernels' names end in their dtype's


def kernel(source: str, symbol: str, env: str) -> Callable | None:
    """csrc/<source>.c's function `symbol`, or None where the switch `env` says aten or the
    source cannot be built (`load` warns once)."""
    if not enabled(env):
        return None
    lib = load(source)
    return None if lib is None else getattr(lib, symbol)


def call(fn: Callable, tensors: list[torch.Tensor], *extra: int, **floats: float) -> None:
    """fn(ptr_0, ..., ptr_k, *extra, *floats) once: a kernel that shares its work among OpenMP
    threads itself; `extra` go as int64, `floats` as double."""
    fn(*(ctypes.c_void_p(t.data_ptr()) for t in tensors), *(ctypes.c_int64(e) for e in extra),
       *(ctypes.c_double(f) for f in floats.values()))
