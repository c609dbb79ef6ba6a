"""Where a serving engine step goes, without HTTP: the model's forward, sampling, `_take`
(detokenizing, stop strings, emitting) and the scheduling around them, at a given decode batch.

    python experiments/engine_profile.py --preset medium --batch 8 [--steps 48] [--reps 3]

A preset's model with random weights (fp32, pre-merge off), `batch` requests of a 32-token prompt
sampled at temperature 0.8, top-p 0.95, each with its own seed; after 10 warm-up steps, `steps`
decode steps are timed, `reps` times. Prints one line per repetition and the medians."""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from structlm.config import PRESETS
from structlm.model.gpt import GPT
from structlm.serving.engine import Engine, Request

PARTS = ("forward", "sample", "take")


def word_tokenizer(vocab: int) -> Tokenizer:
    """A tokenizer whose `vocab` ids are all words (the detokenizing cost of real text)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(), decoders.ByteLevel()
    tok.add_tokens([f" w{i}" for i in range(vocab)])
    return tok


def timed_engine(model: GPT, batch: int) -> tuple[Engine, dict[str, float]]:
    eng = Engine(model, word_tokenizer(model.cfg.vocab_size), eos=-1, max_batch=batch)
    spent: dict[str, float] = collections.defaultdict(float)
    for name in PARTS:
        inner = getattr(eng, f"_{name}")

        def wrapper(*a, _inner=inner, _name=name):
            t0 = time.perf_counter()
            out = _inner(*a)
            spent[_name] += time.perf_counter() - t0
            return out
        setattr(eng, f"_{name}", wrapper)
    return eng, spent


def one_rep(model: GPT, batch: int, steps: int) -> dict[str, float]:
    """ms per decode step of each part, and tokens/s."""
    eng, spent = timed_engine(model, batch)
    for i in range(batch):
        eng.submit(Request(prompt=list(range(1, 33)), max_tokens=steps + 20, emit=lambda e: None,
                           temperature=0.8, top_p=0.95, seed=i))
    for _ in range(10):
        eng.step()
    spent.clear()
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    total = time.perf_counter() - t0
    row = {k: spent[k] / steps * 1e3 for k in PARTS}
    row["scheduling"] = total / steps * 1e3 - sum(row.values())
    row["step"], row["tokens_per_s"] = total / steps * 1e3, batch * steps / total
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    model = GPT(PRESETS[a.preset]().model).eval()
    rows = [one_rep(model, a.batch, a.steps) for _ in range(a.reps)]
    for name, row in [*((f"rep {i}", r) for i, r in enumerate(rows)),
                      ("median", {k: statistics.median(r[k] for r in rows) for k in rows[0]})]:
        parts = " | ".join(f"{k} {row[k]:.2f} ms ({row[k] / row['step']:.0%})"
                           for k in (*PARTS, "scheduling"))
        print(f"{a.preset} batch {a.batch} {name}: {row['step']:.2f} ms/step, "
              f"{row['tokens_per_s']:.0f} tokens/s | {parts}")


if __name__ == "__main__":
    main()
