"""One variant of `structlm bench memory`, run by it under torchrun: a few training steps of a model
under a data-parallel engine and an activation-checkpointing mode; rank 0 prints one JSON row of
the peak memory per rank (over the steps, after setup) and the tokens/s.

    torchrun --nproc_per_node N -m structlm.bench.probe JOB_JSON

Peak memory: CUDA's allocator peak; on CPU the process's peak resident set (Linux VmHWM, reset
after setup) above the resident set before the model was built.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from structlm.config import ModelConfig, OptimConfig, TrainConfig, from_dict
from structlm.model.gpt import GPT
from structlm.training import distributed
from structlm.training.optim import make_optimizer
from structlm.utils.device import autocast, autocast_dtype, synchronize

STATUS = Path("/proc/self/status")


def resident_bytes(field: str = "VmRSS") -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{STATUS} has no {field}")


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current VmRSS


def peak_bytes(device: torch.device, base: int) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resident_bytes("VmHWM") - base


def run(job: dict) -> dict | None:
    t = TrainConfig(parallel=job["parallel"], activation_checkpointing=job["ac"])
    world = distributed.setup(job["device"])
    amp = autocast_dtype(world.device, job["dtype"])
    base = 0 if world.device.type == "cuda" else resident_bytes()
    torch.manual_seed(0)
    raw = distributed.wrap_model(GPT(from_dict(ModelConfig, job["model"])).to(world.device), world,
                              t, amp)
    model = distributed.wrap(raw, world, t.parallel, find_unused=False)
    optimizer = make_optimizer(raw, OptimConfig())
    b, s, vocab = job["batch"], job["seq"], raw.cfg.vocab_size
    x = torch.randint(0, vocab, (b, s + 1), device=world.device)
    reset_peak(world.device)
    times = []
    for i in range(job["steps"] + 1):  # the first step warms up (and allocates AdamW's state)
        synchronize(world.device)
        t0 = time.perf_counter()
        with autocast(world.device, amp):
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(world.device)
        if i:
            times.append(time.perf_counter() - t0)
    peak = torch.tensor([float(peak_bytes(world.device, base))], device=world.device)
    if world.ddp:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    row = {"peak_mib": peak.item() / 2**20,
           "tokens_per_s": world.size * b * s / statistics.median(times), "world": world.size}
    return row if world.master else None


if __name__ == "__main__":
    out = run(json.loads(sys.argv[1]))
    if out is not None:
        print("PROBE " + json.dumps(out), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
