"""Does pre-merge ever make decoding slower than dense? For each structured kind and FFN budget on a
preset: per-token decode latency of the dense model, the structured model on its factors, and the
structured model pre-merged by the uncalibrated default and by calibrated thresholds, all four
interleaved per repetition. One JSON row per (kind, budget, variant); a table on stdout.

    python experiments/premerge_decode.py --preset medium --batch 1 --json rows.jsonl
    python experiments/premerge_decode.py --preset runs/smollm2/config.json --kinds lowrank

Calibration writes to a throw-away cache (STRUCTLM_CACHE is pointed at a temporary folder), so the
"default" variant is what a user without a calibrated cache gets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile

import torch

from structlm.bench.decode import decode_latency
from structlm.config import PRESETS, load_run_config
from structlm.linear.merge import premerge, thresholds_for, unmerge
from structlm.linear.registry import LinearSpec, choose_hparams
from structlm.model.gpt import GPT
from structlm.utils.timing import context

KINDS = ("lowrank", "blockdense", "blockshuffle", "btt")


def configs(name: str, kinds: list[str], budgets: list[float]):
    """(kind, budget, ModelConfig) for every kind and FFN share of a preset or a run's
    config.json (its dense shapes, e.g. an imported SmolLM2-135M)."""
    base = (load_run_config(name).model if name.endswith(".json") else PRESETS[name]().model)
    base = dataclasses.replace(base, ffn_overrides={})
    shapes = [(n, m) for _, n, m in base.ffn_shapes()]
    for kind in kinds:
        for b in budgets:
            yield kind, b, dataclasses.replace(base, ffn=choose_hparams(kind, shapes, b))


def measure(cfg, batch: int, reps: int, gen: int) -> tuple[dict[str, float], dict]:
    """(median ms per token of each variant, interleaved per repetition; the calibrated
    thresholds)."""
    dev, dtype = torch.device("cpu"), None
    torch.manual_seed(0)
    dense = GPT(dataclasses.replace(cfg, ffn=LinearSpec())).eval()
    structured = GPT(cfg).eval()
    default, _ = thresholds_for(structured, dev, dtype, calibrate=False)
    calibrated, _ = thresholds_for(structured, dev, dtype, calibrate=True)
    variants = {"dense": (dense, None), "factors": (structured, None),
                "merged_default": (structured, default),
                "merged_calibrated": (structured, calibrated)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):
        for name, (m, th) in variants.items():
            if th is not None:
                premerge(m, th)
            times[name] += decode_latency(m, dev, dtype, batch, 32, gen, reps=1)
            if th is not None:
                unmerge(m)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}, calibrated


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="medium", help="a preset, or a run's config.json")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--budgets", default="0.63,0.32")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--gen", type=int, default=32)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    os.environ["STRUCTLM_CACHE"] = tempfile.mkdtemp(prefix="premerge-cache-")
    print(f"{'kind':>12} {'budget':>6} {'dense ms':>9} {'factors x':>9} {'default x':>9} "
          f"{'calibr. x':>9}  thresholds", flush=True)
    for kind, b, cfg in configs(a.preset, a.kinds.split(","),
                                  [float(x) for x in a.budgets.split(",")]):
        ms, th = measure(cfg, a.batch, a.reps, a.gen)
        x = {k: ms["dense"] / v for k, v in ms.items()}
        print(f"{kind:>12} {b:>6.2f} {ms['dense']:>9.2f} {x['factors']:>9.2f} "
              f"{x['merged_default']:>9.2f} {x['merged_calibrated']:>9.2f}  "
              f"{sorted(th.values())}", flush=True)
        if a.json:
            with open(a.json, "a") as f:
                for k, v in ms.items():
                    ctx = context(torch.device("cpu"), None)
                    f.write(json.dumps({"bench": "premerge_decode", **ctx,
                                        "preset": a.preset, "kind": kind, "budget": b,
                                        "batch": a.batch, "variant": k, "ms_per_token": v,
                                        "speedup_vs_dense": ms["dense"] / v}) + "\n")


if __name__ == "__main__":
    main()
