"""Files: atomic writes, published directories, hashes, the cache folder, JSON-safe values."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """Where structlm keeps what it derives per machine (pre-merge thresholds, built kernels):
    $STRUCTLM_CACHE, else ~/.cache/structlm."""
    return Path(os.environ.get("STRUCTLM_CACHE") or Path.home() / ".cache" / "structlm")


def is_tty() -> bool:
    return sys.stderr.isatty()


def fsync_path(path) -> None:
    """fsync a file or a directory (so a rename inside it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path, text: str) -> None:
    """Write `path` so that a reader, or a process killed mid-write, sees the old file or the new
    one, never a part: a temporary file beside it, fsynced, renamed over it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def require_empty(out: Path) -> None:
    """Refuse to write into a directory that holds something: nothing a user made is overwritten."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is a file; choose a directory to write")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another directory")


def publish_dir(out: Path, write, what: str = "write") -> Path:
    """Run write(tmp) in a temporary directory beside `out` (empty or absent), then rename it to
    `out`: a failed or refused write leaves nothing behind, and what a killed one left (its
    process is gone) is removed by the next. The result has the user's umask, as a mkdir would."""
    tmp = scratch_beside(out, what)
    try:
        write(tmp)
        umask_modes(tmp)
        if out.exists():
            out.rmdir()  # empty: callers check with require_empty first
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def scratch_beside(out: Path, what: str) -> Path:
    """A new private directory `.<name>.<what>-<pid>-XXXX` beside `out`, after removing those that
    killed processes left (their pid is gone; a live process's own stay)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.{what}-"
    for stale in out.parent.glob(prefix + "*"):
        pid = stale.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=out.parent))


def umask_modes(root: Path) -> None:
    """Give `root` and everything in it the modes a plain mkdir / open would (0777 / 0666 less
    the umask): temporary directories and some writers (safetensors) make them private."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [Path(root), *Path(root).rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def alive(pid: int) -> bool:
    """Whether a process with this pid exists (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def json_safe(obj):
    """`obj` with every NaN or infinite float replaced by None, so that it is valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def file_sha256(path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
