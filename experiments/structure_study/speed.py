"""Speed of each converted SmolLM2 model against the dense one (random weights of the same shapes:
speed does not depend on the values): one converted block's FFN and the whole model, at prefill
(1 x 512 tokens) and at decode (1 token per step): the FFN structured and merged, the model with
pre-merge dispatched by calibrated thresholds (`bench crossover`'s), variants interleaved.
    python experiments/structure_study/speed.py OUT RUN...   (appends to OUT/speed.jsonl)"""

import dataclasses
import json
import statistics
import sys
from pathlib import Path

import torch

from structlm.bench.decode import bench_decode, bench_prefill
from structlm.config import load_run_config
from structlm.linear import LinearSpec, premerge, unmerge
from structlm.model.gpt import MLP
from structlm.utils.device import autocast, autocast_dtype
from structlm.utils.timing import context, time_interleaved

DEVICE = torch.device("cpu")
DTYPE = autocast_dtype(DEVICE, "auto")


@torch.no_grad()
def ffn_speedups(cfg, tokens: int) -> dict[str, float]:
    """Dense FFN time / converted FFN time for block 1, at `tokens` tokens per call (and of its
    merged dense matrix when it is one token)."""
    torch.manual_seed(0)
    dense = MLP(dataclasses.replace(cfg, ffn=LinearSpec()), 1).eval()
    structured = MLP(cfg, 1).eval()
    merged = premerge(MLP(cfg, 1).eval(), tokens + 1)  # merged for calls of `tokens` tokens
    x = torch.randn(1, tokens, cfg.d_model)

    def call(m):
        def go():
            with autocast(DEVICE, DTYPE):
                m(x)
        return go
    fns = {"dense": call(dense), "structured": call(structured)}
    if tokens == 1:
        fns["merged"] = call(merged)
    t = {k: statistics.median(v) for k, v in time_interleaved(fns, DEVICE, reps=9).items()}
    unmerge(merged)
    return {k: t["dense"] / v for k, v in t.items() if k != "dense"}


def main(out: Path, runs: list[str]) -> None:
    with open(out / "speed.jsonl", "a") as f:
        for run in runs:
            cfg = load_run_config(f"{run}/config.json").model
            pre = {r["variant"]: r for r in bench_prefill(cfg, DEVICE, DTYPE, 1, 512, reps=5)}
            dec = {r["variant"]: r for r in bench_decode(cfg, DEVICE, DTYPE, 1, 32, 32, reps=5,
                                                                  calibrate=True)}
            row = {"run": Path(run).name, **context(DEVICE, DTYPE),
                   "ffn_prefill": ffn_speedups(cfg, 512)["structured"],
                   **{f"ffn_decode_{k}": v for k, v in ffn_speedups(cfg, 1).items()},
                   "model_prefill": pre["structured"]["speedup"],
                   "model_decode_structured": 1 / dec["structured"]["vs_dense"],
                   "model_decode_premerged": 1 / dec["premerged"]["vs_dense"],
                   "dense_prefill_tok_s": pre["dense"]["tokens_per_s"],
                   "dense_decode_ms": dec["dense"]["ms_per_token"]}
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
