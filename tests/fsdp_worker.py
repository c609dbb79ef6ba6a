"""Run under torchrun by tests/test_fsdp.py: trains the runs a job file lists, one after the other
in one process group, and measures what leaving the guided phase frees under FSDP2.

    torchrun --nproc_per_node 2 tests/fsdp_worker.py JOB.json
JOB.json: {"runs": [RunConfig dicts], "guide_memory": PATH or null}
"""

import dataclasses
import gc
import json
import sys
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

from structlm.config import PRESETS, LinearSpec, RunConfig, from_dict
from structlm.linear.guided import guide_parameters, wrap_guided
from structlm.model.gpt import GPT
from structlm.training import distributed, train
from structlm.training.loop import leave_guided
from structlm.training.optim import make_optimizer
from structlm.training.sgt import GuidePhase, make_plan


def local_numel(model, optimizer) -> int:
    """Elements this rank holds: its parameter shards and their AdamW moments."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    n = sum(local(p).numel() for p in model.parameters())
    return n + sum(local(v).numel() for s in optimizer.state.values() for v in s.values()
                   if torch.is_tensor(v) and v.dim() > 0)


def guide_memory(path: str) -> None:
    """Shard a guided tiny model, take one step, leave the guided phase: what each rank holds
    before and after, what the guides held, and whether the old guides were freed."""
    cfg = PRESETS["tiny"]()
    cfg.model = dataclasses.replace(cfg.model, ffn=LinearSpec("lowrank", rank=16))
    cfg.train.parallel = "fsdp"
    world = distributed.setup("cpu")
    model = GPT(cfg.model)
    wrap_guided(model, "exact")
    guides = sum(p.numel() for p in guide_parameters(model))
    model = distributed.wrap_model(model, world, cfg.train, None)
    opt = make_optimizer(model, cfg.optim)
    x = torch.randint(0, cfg.model.vocab_size, (2, 16))
    model(x, x)[1].backward()
    opt.step()
    refs = [weakref.ref(p) for p in guide_parameters(model)]
    before = local_numel(model, opt)
    phase = GuidePhase(make_plan(cfg.train.sgt, cfg.model, 10, 32, 16), cfg.train.sgt, 0)
    phase.active = True
    model, opt = leave_guided(model, opt, phase, cfg, world, None)
    gc.collect()
    after = local_numel(model, opt)
    totals = distributed.sum_([float(before), float(after)], world)
    if world.master:
        Path(path).write_text(json.dumps({
            "before": totals[0], "after": totals[1], "guides": guides,
            "alive": sum(r() is not None for r in refs),
            "guides_left": len(guide_parameters(model))}))


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    for run in job["runs"]:
        train(from_dict(RunConfig, run), progress=False)
    if job.get("guide_memory"):
        guide_memory(job["guide_memory"])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
