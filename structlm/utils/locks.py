"""Exclusive locks on what a command makes (a run directory, a prepared data directory), so two
commands never write into one thing at once.

    with exclusive(lock_path(out), f"the run directory {out}", fix="..."):
        ...  # nothing of `out` is read, deleted or written before this line

The lock is the kernel's (`flock` on a small file beside the directory, `.<name>.lock`, removed
when the command ends), so it dies with its process: a lock left by a SIGKILL or a crash is taken
over by the next command, never waited for. Nor is a live holder waited for: the second command
stops at once with `Busy`, naming the holder (pid, host, start, command) read from the file, and
what to do. On NFS, Linux maps flock onto the server's byte-range locks, so processes on several
hosts exclude each other too (a holder's host that dies releases it when its lease expires).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path


class Busy(ValueError):
    """Another live process holds the lock (a ValueError: the CLI exits 2 with the message)."""


def lock_path(target: Path) -> Path:
    """The lock file of a directory: `.<name>.lock` beside it (it may not exist yet)."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


def holder_info() -> dict:
    """What identifies this process to a command that finds the lock taken."""
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(["structlm", *sys.argv[1:]])[:200]}


def describe(info: dict) -> str:
    if not info:
        return "another process (it has just started)"
    return (f"process {info.get('pid')} on {info.get('host')} (since {info.get('started')}: "
            f"{info.get('command')})")


@contextlib.contextmanager
def exclusive(path: Path, what: str, fix: str) -> Iterator[None]:
    """Hold the lock at `path` for the block, or raise Busy: "<what> is in use by <holder>;
    <fix>". The lock file is removed when the block ends (a SIGKILL leaves it: the next holder
    takes it over)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, what, fix)
    except Busy:
        raise
    except OSError as e:  # the folder is a file, or not writable: said with what was locked
        raise type(e)(e.errno, f"{what} cannot be locked ({e.strerror}: "
                               f"{e.filename or path})") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_info()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still held: a waiter that opened this file sees it is gone
        os.close(fd)


def _acquire(path: Path, what: str, fix: str) -> int:
    """An open, locked descriptor of the file now at `path` (retried when the file was removed
    or replaced between opening and locking it)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read(fd)
            os.close(fd)
            raise Busy(f"{what} is in use by {describe(info)}; {fix}") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder before us removed it after we opened it: open the new one


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
