"""A run's data: prepared on rank 0 for a fresh run (a resumed run uses its data as it is), checked
against the model's vocabulary and the checkpoint's tokenizer, then opened as memmaps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from structlm.config import RunConfig
from structlm.data.batches import Batches, check_tokenizer, load_meta, load_tokens
from structlm.data.prepare import prepare, resolve_data_dir
from structlm.data.tokenizer import load_tokenizer
from structlm.training import distributed
from structlm.training.distributed import World
from structlm.training.rundir import Resume


@dataclass
class RunData:
    data_dir: Path
    meta: dict
    train: Batches  # the global batch of every step, by (seed, step)
    val: np.ndarray  # validation tokens


def load_run_data(cfg: RunConfig, resume: Resume, world: World, progress: bool) -> RunData:
    # the vocabulary checked before preparing (a tokenizer path that does not exist: prepare
    # names it)
    tok = cfg.data.tokenizer
    if tok is None:
        vocab, what = cfg.data.vocab_size, "data.vocab_size"
    else:
        vocab = load_tokenizer(tok).get_vocab_size() if Path(tok).exists() else 0
        what = f"the vocabulary of {tok}"
    if vocab > cfg.model.vocab_size:
        raise ValueError(f"{what} ({vocab}) exceeds model.vocab_size={cfg.model.vocab_size}; "
                         f"set --model.vocab_size {vocab}")
    data_dir = resolve_data_dir(cfg.data)
    if world.master and resume.ckpt is None:
        prepare(cfg.data, progress=progress)
    distributed.barrier(world)
    meta = load_meta(data_dir)
    if meta["vocab_size"] > cfg.model.vocab_size:
        raise ValueError(
            f"the data in {data_dir} has a vocabulary of {meta['vocab_size']} tokens, more than "
            f"model.vocab_size={cfg.model.vocab_size}; set --model.vocab_size {meta['vocab_size']}"
        )
    if resume.ckpt is not None:
        check_tokenizer(data_dir, meta, resume.state.get("tokenizer_sha256"),
                        f"checkpoint {resume.ckpt}", "point --data.data_dir at the run's own data")
    t = cfg.train
    train = Batches(load_tokens(data_dir, "train"), cfg.seq_len, t.batch_size, t.seed)
    return RunData(Path(data_dir), meta, train, load_tokens(data_dir, "val"))
