"""CPU kernels of our own: C files in structlm/csrc, compiled on first use and loaded with ctypes.

Each source is built once per machine with the system C compiler (`$CC`, else cc or gcc) at -O3,
tuned to this CPU by its architecture (`arch_flags`: -march=native on x86, -mcpu=native on arm),
into a cache folder (`$STRUCTLM_CACHE`, else ~/.cache/structlm; where that cannot be written, a
temporary folder of the process's own), keyed by the source and the shared headers beside it
(csrc/*.h), the compiler and flags and the CPU's feature flags, so a shared home across CPU models
stays correct; a later process only loads the file. The kernels take plain pointers (no PyTorch
headers, no Python API) and share their work among OpenMP threads: built with -fopenmp, they bind
libgomp by its soname to the copy PyTorch has already loaded, so they run on PyTorch's own threads
and thread count (`torch.set_num_threads`) rather than beside them (threads of their own would
compete with PyTorch's OpenMP threads, which spin for a while before they sleep).

Where no compiler is found or a build fails, `load` returns None and callers fall back to PyTorch's
own ops; only the process's first such kernel warns. Where PyTorch runs on another OpenMP runtime
(Intel's libiomp5 or LLVM's libomp, as in some conda builds), loading a kernel would bring libgomp
in beside it: `load` returns None for every kernel instead, with one warning. Should a kernel
still add a second runtime (another copy of libgomp), `load` warns once, naming the switches that
avoid it.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
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

from structlm.utils.files import cache_dir

CSRC = Path(__file__).parent / "csrc"


def arch_flags(machine: str) -> tuple[str, ...]:
    """The flags that tune the kernels to this CPU, by its architecture (`platform.machine()`):
    x86's instruction set and 512-bit vectors, arm's CPU (gcc and clang both take -mcpu=native
    there), nothing elsewhere."""
    machine = machine.lower()
    if machine in ("x86_64", "amd64"):
        return ("-march=native", "-mprefer-vector-width=512")
    if machine in ("aarch64", "arm64"):
        return ("-mcpu=native",)
    return ()


def compile_flags(machine: str) -> tuple[str, ...]:
    """The flags that build a kernel into a shared library on the architecture `machine`."""
    return ("-O3", *arch_flags(machine), "-fno-math-errno", "-shared", "-fPIC")


FLAGS = compile_flags(platform.machine())
OPENMP = "-fopenmp"  # libgomp by soname: the copy PyTorch has loaded, so its threads are ours
_loaded: dict[str, ctypes.CDLL | None] = {}  # None: the kernel falls back to PyTorch's ops
_warned: list[str] = []  # the kernel whose load brought a second OpenMP runtime (warned once)
# the files of the three OpenMP runtimes (GNU, Intel, LLVM), as wheels and distributions name them
_OPENMP = re.compile(r"/(libgomp|libiomp5|libomp)(-[0-9a-f]+)?\.so[.\d]*$")
# the kernels' on/off switches, by C source: the one place their names are written (each module
# reads its own from here); NAME=aten turns that kernel off, NAME=native (the default) keeps it
SWITCHES = {"gelu": "STRUCTLM_GELU", "shuffle": "STRUCTLM_SHUFFLE",
            "xent": "STRUCTLM_CROSS_ENTROPY", "rope": "STRUCTLM_ROPE",
            "attention": "STRUCTLM_ATTENTION_KERNEL"}


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")


def _compiler() -> str | None:
    cands = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc"]
    return next((c for c in cands if shutil.which(c)), None)


@functools.cache
def _scratch() -> Path:
    """A temporary folder of this process's own, removed at exit."""
    folder = Path(tempfile.mkdtemp(prefix="structlm-kernels-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def _build_dir() -> Path:
    """The cache folder where a file can be written in it, else `_scratch()`: a read-only or
    unmakeable cache costs a build per process, not the kernels."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return folder
    except OSError:
        return _scratch()


def _build(src: Path, cc: str) -> Path:
    """The shared library of `src`, compiled unless the cache has it; written atomically, so
    ranks of one job building at once each end with a complete file."""
    text = src.read_bytes() + b"".join(h.read_bytes() for h in sorted(src.parent.glob("*.h")))
    flags = " ".join((cc, *FLAGS, OPENMP, _cpu_flags()))
    name = f"{src.stem}-{hashlib.sha256(text + flags.encode()).hexdigest()[:16]}.so"
    if (cache_dir() / name).is_file():
        return cache_dir() / name
    out = _build_dir() / name
    if out.is_file():
        return out
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


def other_runtime(runtimes: set[str]) -> str | None:
    """The first of `runtimes` that is not GNU's libgomp (Intel's libiomp5, LLVM's libomp): a
    runtime our kernels, built against libgomp, would run beside; None where there is none."""
    return next((p for p in sorted(runtimes) if not Path(p).name.startswith("libgomp")), None)


def warn_second_runtime(before: set[str], after: set[str], name: str) -> None:
    """One warning where loading `name` added an OpenMP runtime beside one already loaded."""
    added = sorted(after - before)
    if before and added and not _warned:
        _warned.append(name)
        warnings.warn(
            f"structlm's CPU kernels ({name}.c) loaded the OpenMP runtime {added[0]} beside "
            f"PyTorch's {sorted(before)[0]}: two thread pools now compete for the cores, and the "
            f"kernels and PyTorch's ops slow each other down. Set OMP_WAIT_POLICY=passive, or turn "
            f"the kernels off with {'=aten, '.join(SWITCHES.values())}=aten.", stacklevel=3)


def _fall_back(name: str, reason: str) -> None:
    """Mark csrc/<name>.c as unused (callers take PyTorch's ops); the process's first kernel so
    marked warns with `reason`, later ones are silent."""
    first = None not in _loaded.values()
    _loaded[name] = None
    if first:
        warnings.warn(reason, stacklevel=3)  # load's caller


def load(name: str) -> ctypes.CDLL | None:
    """csrc/<name>.c as a loaded library, or None where PyTorch runs another OpenMP runtime or
    the source cannot be built (the first such kernel in the process warns)."""
    if name in _loaded:
        return _loaded[name]
    before = openmp_runtimes()
    other = other_runtime(before)
    if other is not None:
        _fall_back(name, f"PyTorch runs on the OpenMP runtime {other}; structlm's CPU kernels "
                         f"would load libgomp beside it, two thread pools competing for the cores, "
                         f"so every structlm CPU kernel uses PyTorch's ops instead.")
        return None
    try:
        cc = _compiler()
        if cc is None:
            raise RuntimeError("no C compiler (cc, gcc or $CC) on PATH")
        _loaded[name] = ctypes.CDLL(str(_build(CSRC / f"{name}.c", cc)))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        detail = (getattr(e, "stderr", None) or str(e)).strip()[:300]
        _fall_back(name, f"structlm's CPU kernels ({name}.c) could not be built: {detail}; "
                         f"every structlm CPU kernel that cannot be built uses PyTorch's ops "
                         f"instead (only this first failure is reported).")
        return None
    warn_second_runtime(before, openmp_runtimes(), name)
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
