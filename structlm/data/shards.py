"""Token shards: the parallel, resumable tokenizing half of `prepare`, and reading the result.

Tokenizing is split into tasks, one per input file (or one for a single-document corpus), each
the documents of that file in order; the tasks run in `workers` processes (one tokenizer thread
each) and each writes its own pieces (`<split>-<task>.bin`, published by rename when complete)
into the preparation's work directory. Concatenated in task order, the pieces are exactly the ids
one process writes, so the result does not depend on the number of workers. An interrupted
preparation resumes with the pieces it finished. The pieces are then grouped into shards of about
`shard_tokens` tokens: one shard is the classic `train.bin`, more are `train-00000.bin`, ...

`TokenShards` reads several shard files as one 1-D sequence (len() and slicing, as a memmap), so
`Batches` and `eval_batches` work unchanged and a window may straddle two shards.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Task:
    """One unit of tokenizing: the documents `docs()` of one file, whose splits are `splits`
    (per document in order: 0 empty, 1 train, 2 val)."""

    index: int
    docs: Callable[[], Iterator[Iterable[str]]]
    splits: np.ndarray


SPLIT_CODES = {1: "train", 2: "val"}


def piece(work: Path, split: str, index: int) -> Path:
    return work / f"{split}-{index:06d}.bin"


def run_tasks(
    tasks: list[Task], encode_task: Callable[[Task], dict], work: Path, workers: int,
    progress: Callable[[dict], None],
) -> None:
    """Run the tasks whose pieces are not in `work` yet (in `workers` processes; inline for 1),
    reporting each finished task's counts to `progress`. Where worker processes cannot start (a
    script read from standard input, a script that starts training on import) the remaining
    tasks run in this process, said once on stderr; a pool is never left respawning workers."""
    todo = [t for t in tasks if not piece(work, "train", t.index).exists()
            or not piece(work, "val", t.index).exists()]
    if workers > 1 and len(todo) > 1 and not can_spawn():
        _inline_note("this program's main module is not a file a worker can import "
                     f"({sys.modules['__main__'].__file__})")
        workers = 1
    if workers <= 1 or len(todo) <= 1:
        for t in todo:
            progress(encode_task(t))
        return
    try:
        _run_in_workers(todo, encode_task, workers, progress)
    except BrokenProcessPool:
        _inline_note("a worker process died while starting (a script that starts training at "
                     'import needs an `if __name__ == "__main__":` guard for workers)')
        discard_partial_pieces(work)
        run_tasks(tasks, encode_task, work, 1, progress)


def _run_in_workers(todo: list[Task], encode_task: Callable[[Task], dict], workers: int,
                    progress: Callable[[dict], None]) -> None:
    ctx = multiprocessing.get_context("spawn")  # no inherited threads or locks (torch, tokenizers)
    with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx,
                             initializer=_one_thread) as pool:
        for done in as_completed([pool.submit(encode_task, t) for t in todo]):
            progress(done.result())


def can_spawn() -> bool:
    """Whether a spawned worker can start: it imports this program's main module again, which
    needs a file on disk (not `python -` reading standard input)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return path is None or getattr(main, "__spec__", None) is not None or Path(path).is_file()


def _inline_note(why: str) -> None:
    print(f"prepare: tokenizing in this process instead of worker processes: {why}",
          file=sys.stderr, flush=True)


def _one_thread() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one tokenizer thread per worker process


def write_piece(work: Path, index: int, ids: dict[str, list[np.ndarray]]) -> None:
    """Append the ids of one flush to the task's (temporary) pieces."""
    for split, arrays in ids.items():
        if arrays:
            with open(work / f".{split}-{index:06d}.part", "ab") as f:
                np.concatenate(arrays).tofile(f)


def publish_pieces(work: Path, index: int, dtype: np.dtype) -> dict[str, int]:
    """Make a finished task's pieces final (fsync, rename); returns its token counts."""
    counts = {}
    for split in ("train", "val"):
        part = work / f".{split}-{index:06d}.part"
        part.touch()
        with open(part, "rb") as f:
            os.fsync(f.fileno())
        counts[split] = part.stat().st_size // dtype.itemsize
        os.replace(part, piece(work, split, index))
    return counts


def discard_partial_pieces(work: Path) -> None:
    """Remove the unfinished pieces an interrupted preparation left (its finished ones stay)."""
    for p in work.glob(".*.part"):
        p.unlink()


def assemble(
    work: Path, out: Path, n_tasks: int, dtype: np.dtype, shard_tokens: int
) -> dict[str, list[dict]]:
    """Group each split's pieces, in task order, into shards of about `shard_tokens` tokens in
    `out` (moved when a shard is one piece, concatenated otherwise); returns
    {split: [{"file", "tokens"}]}."""
    layout = {}
    for split in ("train", "val"):
        groups: list[list[Path]] = [[]]
        size = 0
        for i in range(n_tasks):
            p = piece(work, split, i)
            n = p.stat().st_size // dtype.itemsize
            if groups[-1] and size + n > shard_tokens:
                groups.append([])
                size = 0
            groups[-1].append(p)
            size += n
        names = ([f"{split}.bin"] if len(groups) == 1
                 else [f"{split}-{k:05d}.bin" for k in range(len(groups))])
        layout[split] = [{"file": name, "tokens": _join(g, out / name) // dtype.itemsize}
                         for name, g in zip(names, groups, strict=True)]
    return layout


def _join(pieces: list[Path], dest: Path) -> int:
    if len(pieces) == 1:
        os.replace(pieces[0], dest)
    else:
        with open(dest, "wb") as f:
            for p in pieces:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, f, 1 << 24)
            f.flush()
            os.fsync(f.fileno())
    return dest.stat().st_size


class TokenShards:
    """Several token files read as one sequence: len(), integer and slice (step 1) indexing."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])  # (n_shards + 1,)
        self.dtype = arrays[0].dtype

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("TokenShards supports contiguous slices only")
            return self._span(start, stop)
        i = int(key) + (len(self) if key < 0 else 0)
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.arrays[k][i - self.starts[k]]

    def _span(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        last = int(np.searchsorted(self.starts, stop - 1, side="right")) - 1
        parts = [self.arrays[k][max(start - self.starts[k], 0):
                                min(stop - self.starts[k], len(self.arrays[k]))]
                 for k in range(first, last + 1)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
