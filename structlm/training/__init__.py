"""The training loop and its parts, one job per module:

    loop.py          train(cfg) -> Summary: build, restore, the step loop, finish
    rundir.py        is the run directory this run, where it resumes from, what a restart keeps
    inputs.py        the run's data: prepared, checked against model and checkpoint, opened
    optim.py         AdamW, the learning-rate schedule, steps from the budget
    sgt.py           self-guided training: alpha schedule, step plan, the guided phase
    saving.py        the loop's checkpoints: single-file or sharded (DCP), in the background
    metrics.py       metrics.jsonl, TensorBoard, progress, loss.png
    distributed.py   torchrun's process group, DDP or FSDP2 sharding, collectives
    sharded.py       a full checkpoint into a sharded model; leaving SGT under FSDP2
    memory.py        activation checkpointing and per-block compile
"""

import importlib

__all__ = ["Summary", "train", "SelfGuided"]
_WHERE = {"Summary": "structlm.training.loop", "train": "structlm.training.loop",
          "SelfGuided": "structlm.training.sgt"}


def __getattr__(name: str):  # the loop (and matplotlib) load only when train is used
    if name not in _WHERE:
        raise AttributeError(f"module 'structlm.training' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
