"""The training loop and its parts, one job per module:

    loop.py          train(cfg) -> Summary: build, restore, the step loop, finish
    rundir.py        is the run directory this run, where it resumes from, what a restart keeps
    inputs.py        the run's data: prepared, checked against model and checkpoint, opened
    optim.py         AdamW, the learning-rate schedule, steps from the budget
    sgt.py           self-guided training: alpha schedule, step plan, the guided phase
    metrics.py       metrics.jsonl, TensorBoard, progress, loss.png
    distributed.py   torchrun's process group, DDP, collectives
"""

from structlm.training.loop import Summary, train

__all__ = ["Summary", "train"]
