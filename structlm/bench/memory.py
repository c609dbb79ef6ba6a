"""Peak memory of a training step per variant, each in its own (torchrun) process."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import torch
from tqdm import tqdm

from structlm.config import ModelConfig, to_dict
from structlm.linear.registry import LinearSpec
from structlm.model.flops import param_groups
from structlm.utils.files import is_tty
from structlm.utils.timing import context


def bench_memory(
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None, batch: int = 4,
    seq: int = 256, steps: int = 3, procs: int = 2,
    parallels: tuple[str, ...] = ("ddp", "fsdp"),
    modes: tuple[str, ...] = ("none", "block", "selective"),
) -> list[dict]:
    """Peak memory per rank and tokens/s of training steps, dense and structured, under ddp and
    fsdp, without and with activation checkpointing: each variant its own `procs`-rank torchrun of
    structlm.bench.probe (`batch` sequences per rank), so peaks do not mix."""
    rows = []
    variants = [(k, p, ac) for k in ("dense", "structured") for p in parallels for ac in modes]
    for kind, parallel, ac in tqdm(variants, desc="bench memory", unit="run",
                                   disable=not is_tty()):
        c = dataclasses.replace(cfg, ffn=LinearSpec()) if kind == "dense" else cfg
        job = {"model": to_dict(c), "parallel": parallel, "ac": ac, "batch": batch, "seq": seq,
               "steps": steps, "device": device.type,
               "dtype": "fp32" if dtype is None else "bf16"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(procs), "-m", "structlm.bench.probe", json.dumps(job)]
        r = subprocess.run(cmd, capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1)
                                                                        // procs))})
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("PROBE ")), None)
        if r.returncode or line is None:
            raise RuntimeError(f"bench memory: {kind} {parallel} {ac} failed:\n{r.stderr[-2000:]}")
        rows.append({"bench": "memory", **context(device, dtype), "variant": kind,
                     "kind": c.ffn.kind, "parallel": parallel, "activation_checkpointing": ac,
                     "ranks": procs, "batch_per_rank": batch, "seq": seq,
                     "params": param_groups(c)["total"], **json.loads(line[6:])})
    return rows
