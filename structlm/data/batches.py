"""Reading prepared data: meta.json and tokenizer checks, memory-mapped tokens, training and
evaluation batches.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from structlm.data import shards
from structlm.data.prepare import META_VERSION

PREPARE_HINT = (
    "run `structlm prepare --data.source ...` first (or point --data.data_dir at prepared data)"
)


def check_tokenizer(data_dir: str | Path, meta: dict, sha256: str | None, whose: str,
                    fix: str) -> None:
    """Refuse prepared data whose tokenizer is not the one `whose` (a run or a checkpoint) was
    trained with; `fix` says what to do instead."""
    if meta["tokenizer_sha256"] != sha256:
        raise ValueError(
            f"the data in {data_dir} was tokenized with a different tokenizer than {whose} was "
            f"trained with; {fix}"
        )


def load_meta(data_dir: str | Path) -> dict:
    """meta.json of a prepared dir; a missing or bad one raises naming the path and the fix."""
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"no prepared data directory at {d}; {PREPARE_HINT}")
    path = d / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{d} holds no meta.json (not prepared data); {PREPARE_HINT}")
    again = "prepare the data again into a new --data.data_dir"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({e}); {again}") from None
    need = ("version", "vocab_size", "dtype", "train_tokens", "val_tokens", "tokenizer_sha256")
    if not isinstance(meta, dict) or any(k not in meta for k in need):
        raise ValueError(f"{path} lacks some of {list(need)}; {again}")
    if meta["version"] != META_VERSION:
        raise ValueError(
            f"{path} has format version {meta['version']}, this structlm reads {META_VERSION}; "
            + again
        )
    return meta


def load_tokens(data_dir: str | Path, split: str) -> np.memmap | shards.TokenShards:
    """The 1-D read-only memmap of a split's token ids ("train" or "val"); several shard files
    read as one sequence."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    meta = load_meta(data_dir)
    dtype = np.dtype(meta["dtype"])
    n = meta[f"{split}_tokens"]
    if n == 0:
        raise ValueError(f"the {split} split of {data_dir} is empty; prepare with more documents")
    layout = meta.get("shards", {}).get(split) or [{"file": f"{split}.bin", "tokens": n}]
    arrays = []
    for sh in layout:
        path = Path(data_dir) / sh["file"]
        if not path.is_file() or path.stat().st_size != sh["tokens"] * dtype.itemsize:
            raise ValueError(
                f"{path} is missing or does not hold the {sh['tokens']:,} {dtype.name} tokens "
                "meta.json records; prepare the data again into a new --data.data_dir"
            )
        arrays.append(np.memmap(path, dtype=dtype, mode="r"))
    return arrays[0] if len(arrays) == 1 else shards.TokenShards(arrays)


class Batches:
    """Training windows as a pure function of (seed, step, row).

    The split is cut into n = (len(tokens) - 1) // seq_len non-overlapping windows of seq_len + 1
    tokens (x and y share seq_len of them). Global row g = step * batch_size + r belongs to epoch
    e = g // n, which visits the windows in the order default_rng([seed, e]).permutation(n).
    A resumed run, a DDP rank reading its contiguous slice of the batch and a replay of an earlier
    step therefore all see the same rows; `batch_size` is the global batch per optimizer step.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
        if seq_len <= 0 or batch_size <= 0:
            raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be positive")
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"the split has {len(tokens):,} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                "use a shorter --train.seq_len or prepare more text"
            )
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.n = (len(tokens) - 1) // seq_len
        self._perms: dict[int, np.ndarray] = {}  # the last two epochs' orders

    def __len__(self) -> int:
        return self.n

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                del self._perms[min(self._perms)]
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def rows(self, step: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 (count, seq_len), rows start..start+count-1 of step `step`; y = x shifted."""
        if step < 0 or start < 0 or count < 0 or start + count > self.batch_size:
            raise ValueError(
                f"rows(step={step}, start={start}, count={count}) is outside a batch of "
                f"{self.batch_size} rows"
            )
        g = step * self.batch_size + start + np.arange(count, dtype=np.int64)  # global row indices
        epoch, pos = np.divmod(g, self.n)
        window = np.empty(count, dtype=np.int64)
        for e in np.unique(epoch):  # at most two epochs per call
            m = epoch == e
            window[m] = self._perm(int(e))[pos[m]]
        L = self.seq_len
        buf = np.empty((count, L + 1), dtype=np.int64)  # (count, seq_len + 1)
        for r, w in enumerate(window):
            buf[r] = self.tokens[w * L : w * L + L + 1]
        return torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())


def eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential non-overlapping windows (x, y) from the start of a split, batch_size at a time.

    Covers at most max_tokens target tokens (None: the whole split) but always at least one window;
    the last batch may be short. A split shorter than seq_len + 1 tokens is one shorter window.
    """
    if len(tokens) < 2:
        raise ValueError(f"the split has {len(tokens)} token(s); evaluation needs at least 2")
    if seq_len <= 0 or batch_size <= 0:
        raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be positive")
    seq_len = min(seq_len, len(tokens) - 1)
    n = (len(tokens) - 1) // seq_len
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in range(0, n, batch_size):
            k = min(batch_size, n - b)
            span = np.asarray(tokens[b * seq_len : (b + k) * seq_len + 1], dtype=np.int64)
            x = span[:-1].reshape(k, seq_len)  # (k, seq_len)
            y = span[1:].reshape(k, seq_len)
            yield torch.from_numpy(x.copy()), torch.from_numpy(y.copy())

    return batches()
