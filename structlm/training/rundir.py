"""The run directory: is it this run, where does it resume from, and what a restart keeps.

All of it is checked before any work starts: a directory holding another run, checkpoints none of
which is intact, a budget the run has already passed or an SGT plan that changed are refused with
the fix named.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from structlm import checkpoint
from structlm.config import RunConfig, load_run_config, save_json
from structlm.training.sgt import SGTPlan

# fields that define a run's trajectory: a run directory is resumed only under the same values (the
# budget, logging, evaluation and checkpoint cadence may change, e.g. to extend a finished run)
RUN_IDENTITY = ("model", "data", "optim", "train.seed", "train.batch_size", "train.seq_len",
                "train.dtype", "train.sgt")


def check_run_dir(out: Path, cfg: RunConfig) -> bool:
    """True if `out` holds this same run (to resume); refuse a directory that holds something
    else."""
    if not out.exists() or not any(out.iterdir()):
        return False
    if not (out / "config.json").exists():
        raise FileExistsError(
            f"{out} exists and is not a structlm run directory; choose another --train.out_dir"
        )
    diff = checkpoint.config_diff(load_run_config(str(out / "config.json")), cfg, RUN_IDENTITY)
    if diff:
        raise FileExistsError(
            f"{out} holds a different run (differs in {'; '.join(diff[:4])}). Use another "
            f"--train.out_dir, or continue that run with `structlm train --resume {out}`"
        )
    return True


@dataclass
class Resume:
    """Where a run starts: a fresh start (ckpt None, step 0) or a checkpoint and its state."""

    out: Path
    existing: bool  # the directory already held this run
    ckpt: Path | None = None
    state: dict = field(default_factory=lambda: {"step": 0})

    @property
    def step(self) -> int:
        return self.state["step"]

    def finished(self, steps: int) -> bool:
        return self.ckpt is not None and self.step >= steps and (self.out / "summary.json").exists()


def find_resume(out: Path, cfg: RunConfig, plan: SGTPlan) -> Resume:
    """The checkpoint `out` resumes from (None for a fresh start), with every check done."""
    existing = check_run_dir(out, cfg)
    ckpt = checkpoint.find_latest(out) if existing else None
    if existing and ckpt is None and any((out / "checkpoints").glob("step_*")):
        raise checkpoint.CheckpointError(
            f"{out} has checkpoints but none is complete and intact (see the warnings above); "
            "restore one or delete the checkpoints directory to start over"
        )
    if ckpt is None:
        return Resume(out, existing)
    state = checkpoint.load_state(ckpt, verified=True)
    if state["step"] > plan.total_steps:
        raise ValueError(
            f"{out} is at step {state['step']}, beyond the budget of {plan.total_steps} steps; "
            "raise it"
        )
    saved = state.get("sgt_plan")
    if plan.mode != "off" and saved and (saved["base_steps"], saved["guided_steps"]) != (
        plan.base_steps, plan.guided_steps
    ):
        raise ValueError(
            f"{out} was planned with S={saved['base_steps']}, G={saved['guided_steps']} "
            f"self-guided steps; this budget gives S={plan.base_steps}, G={plan.guided_steps}. "
            "Keep the budget"
        )
    return Resume(out, existing, ckpt, state)


def restore(resume: Resume, model: nn.Module, optimizer: torch.optim.Optimizer,
            device: torch.device) -> None:
    """Load the checkpoint's weights, optimizer state and RNG states (nothing on a fresh start)."""
    if resume.ckpt is None:
        return
    checkpoint.load_weights(model, resume.ckpt)
    optimizer.load_state_dict(resume.state["optimizer"])
    torch.set_rng_state(resume.state["rng"]["torch"])
    if device.type == "cuda" and "cuda" in resume.state["rng"]:
        torch.cuda.set_rng_state_all(resume.state["rng"]["cuda"])


def start_files(resume: Resume, cfg: RunConfig, data_dir: Path, steps: int) -> None:
    """Rank 0, before the first step: metrics.jsonl cut back to the checkpoint (or removed when a
    run that died before its first checkpoint starts over), config.json, tokenizer.json."""
    out, metrics = resume.out, resume.out / "metrics.jsonl"
    if resume.ckpt is not None:
        print(f"resuming {out} from {resume.ckpt.name} (step {resume.step}/{steps})", flush=True)
        truncate_metrics(metrics, resume.step)
    elif resume.existing and metrics.exists():
        metrics.unlink()
    out.mkdir(parents=True, exist_ok=True)
    save_json(cfg, str(out / "config.json"))
    shutil.copyfile(data_dir / "tokenizer.json", out / "tokenizer.json")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics rows logged after `step` by a run that died before its next checkpoint."""
    if not path.exists():
        return
    rows = [ln for ln in path.read_text().splitlines()
            if ln.strip() and json.loads(ln)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    tmp.replace(path)
