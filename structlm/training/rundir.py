"""The run directory: is it this run, where does it resume from, and what a restart keeps.

All of it is checked before any work starts: a directory holding another run, checkpoints none of
which is intact, a budget the run has already passed or an SGT plan that changed are refused with
the fix named.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from structlm.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    load_run_config,
    save_json,
)
from structlm.data.tokenizer import copy_sidecars
from structlm.hf.reader import read_hf
from structlm.runs import checkpoint, dcp
from structlm.runs.convert import dense_guides_path
from structlm.runs.run import Run
from structlm.training import distributed, sharded
from structlm.training.distributed import World
from structlm.training.optim import apply_hparams
from structlm.training.sgt import SGTPlan
from structlm.utils.files import atomic_write_text
from structlm.utils.locks import Busy, exclusive, lock_path

# fields that define a run's trajectory: a run directory is resumed only under the same values (the
# budget, logging, evaluation and checkpoint cadence may change, e.g. to extend a finished run)
# the data fields that decide the tokens (not how many processes prepared them, or their files)
DATA_IDENTITY = tuple(f"data.{f.name}" for f in fields(DataConfig)
                      if f.name not in ("workers", "shard_tokens"))
RUN_IDENTITY = ("model", *DATA_IDENTITY, "optim", "train.seed", "train.batch_size",
                "train.seq_len", "train.dtype", "train.sgt", "train.init_from")
# what `--resume RUN --override` may change besides: the optimizer and schedule (after a loss spike)
# and the compute dtype; not optim.decay_all, which changes the optimizer's parameter groups
OVERRIDABLE = ("optim", "train.dtype")
FIXED_UNDER_OVERRIDE = ("model", *DATA_IDENTITY, "optim.decay_all", "train.seed",
                        "train.batch_size", "train.seq_len", "train.sgt", "train.init_from")


@contextlib.contextmanager
def hold_run_dir(out: Path, world: World) -> Iterator[None]:
    """The run directory's exclusive lock, held by rank 0 for the whole of train (taken before
    anything of the run is read or written). When another command holds it, every rank stops with
    the holder named: two trains into one directory silently lost one run before."""
    held = contextlib.ExitStack()
    error = None
    if world.master:
        fix = ("wait for it to finish, or give this run another --train.out_dir (to continue it "
               "afterwards: structlm train --resume " + str(out) + ")")
        try:
            held.enter_context(exclusive(lock_path(out), f"the run directory {out}", fix))
        except Busy as e:
            error = e
    if distributed.sum_([float(error is not None)], world)[0] > 0:  # every rank agrees
        raise error or Busy(f"the run directory {out} is in use by another command (see rank 0)")
    with held:
        yield


def refuse_checkpoint_dir(path: Path, flag: str) -> None:
    """A checkpoint (RUN/checkpoints/step_N, which holds a manifest) is not a run directory:
    training into it would write beside its files and break the manifest."""
    if (path / "manifest.json").is_file():
        run = path.parent.parent if path.parent.name == "checkpoints" else None
        fix = (f"resume its run with `structlm train --resume {run}`" if run is not None
               else "give the run directory that holds it")
        raise FileExistsError(f"{flag} {path}: this is a checkpoint, not a run directory; {fix}")


def check_run_dir(out: Path, cfg: RunConfig, override: bool = False) -> tuple[bool, list[str]]:
    """(holds this run, the overridden fields): True if `out` holds this same run (to resume);
    refuse a directory that holds something else. With `override`, optimizer, schedule and dtype
    fields may differ; they come back as "path: old vs new"."""
    if not out.exists() or not any(out.iterdir()):
        return False, []
    refuse_checkpoint_dir(out, "--train.out_dir")
    if not (out / "config.json").exists():
        raise FileExistsError(
            f"{out} exists and is not a structlm run directory; choose another --train.out_dir"
        )
    saved = load_run_config(str(out / "config.json"))
    diff = checkpoint.config_diff(saved, cfg, FIXED_UNDER_OVERRIDE if override else RUN_IDENTITY)
    if diff:
        hint = ("" if override or not all(d.split(":")[0].startswith(OVERRIDABLE) for d in diff)
                else " To change optimizer, schedule or dtype fields of a run on purpose (e.g. "
                     "after a loss spike), resume it with --override.")
        raise FileExistsError(
            f"{out} holds a different run (differs in {'; '.join(diff[:4])}). Use another "
            f"--train.out_dir, or continue that run with `structlm train --resume {out}`.{hint}"
        )
    return True, checkpoint.config_diff(saved, cfg, OVERRIDABLE) if override else []


@dataclass
class Resume:
    """Where a run starts: a fresh start (ckpt None, step 0) or a checkpoint and its state."""

    out: Path
    existing: bool  # the directory already held this run
    ckpt: Path | None = None
    state: dict = field(default_factory=lambda: {"step": 0})
    changes: list[str] = field(default_factory=list)  # fields changed by --override now

    @property
    def step(self) -> int:
        return self.state["step"]

    @property
    def overrides(self) -> list[dict]:
        """Every override of the run so far, this one included: [{"step", "changes"}]."""
        now = [{"step": self.step, "changes": self.changes}] if self.changes else []
        return [*self.state.get("overrides", []), *now]

    @property
    def summary(self) -> dict | None:
        """The run's summary.json, or None when it is missing or damaged (said on stderr)."""
        path = self.out / "summary.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            print(f"warning: {path} is damaged ({e}); the final phase runs again to rewrite it",
                  file=sys.stderr)
            return None

    def finished(self, steps: int) -> bool:
        return self.ckpt is not None and self.step >= steps and self.summary is not None


def find_resume(out: Path, cfg: RunConfig, plan: SGTPlan, override: bool = False) -> Resume:
    """The checkpoint `out` resumes from (None for a fresh start), with every check done."""
    existing, changes = check_run_dir(out, cfg, override)
    ckpt = checkpoint.find_latest(out) if existing else None
    if existing and ckpt is None and any((out / "checkpoints").glob("step_*")):
        raise checkpoint.CheckpointError(
            f"{out} has checkpoints but none is complete and intact (see the warnings above); "
            "restore one or delete the checkpoints directory to start over"
        )
    if ckpt is None:
        if changes:
            raise ValueError(f"--override: {out} has no checkpoint to resume; nothing to override")
        return Resume(out, existing)
    state = checkpoint.load_state(ckpt, verified=True)
    if state.get("imported_from"):
        raise ValueError(
            f"{out} holds a model imported from {state['imported_from']}, not a training run to "
            f"resume; start a new run from it: structlm train --config {out}/config.json "
            f"--train.init_from {out} --train.out_dir runs/NEW"
        )
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
    return Resume(out, existing, ckpt, state, changes)


def restore(resume: Resume, model: nn.Module, optimizer: torch.optim.Optimizer,
            optim_cfg: OptimConfig, world: World) -> None:
    """Load the checkpoint's weights, optimizer state and RNG states (nothing on a fresh start),
    from a single-file or a sharded checkpoint into a sharded model or not, at any world size;
    under --override the optimizer takes the new config's hyper-parameters."""
    if resume.ckpt is None:
        return
    device = world.device
    if checkpoint.is_sharded(resume.ckpt):
        dcp.load_dcp(resume.ckpt / checkpoint.SHARDED, model, optimizer)
    elif distributed.is_fsdp(model):
        weights = load_file(str(resume.ckpt / "model.safetensors"))
        sharded.load_full_checkpoint(model, optimizer, weights, resume.state["optimizer"])
    else:
        checkpoint.load_weights(model, resume.ckpt)
        optimizer.load_state_dict(resume.state["optimizer"])
    if resume.changes:
        apply_hparams(optimizer, optim_cfg)
    torch.set_rng_state(resume.state["rng"]["torch"])
    if device.type == "cuda" and "cuda" in resume.state["rng"]:
        torch.cuda.set_rng_state_all(resume.state["rng"]["cuda"])


def _require_same_model(p: Path, src: ModelConfig, cfg: ModelConfig) -> None:
    diff = checkpoint.config_diff(RunConfig(model=src), RunConfig(model=cfg), ("model",))
    if diff:
        raise ValueError(
            f"--train.init_from {p}: its model differs from this run's ({'; '.join(diff[:4])}); "
            f"start from its configuration, e.g. structlm train --config {p}/config.json "
            f"--train.init_from {p} --train.out_dir runs/NEW"
        )


def check_init(cfg: RunConfig, resume: Resume) -> None:
    """A fresh run's --train.init_from (and the dense weights guide_init=dense takes from it),
    checked before the data is prepared: the source exists and holds this run's model. (A GGUF
    file's config comes with its weights: it is checked when they load.)"""
    t = cfg.train
    if resume.ckpt is not None or not t.init_from:
        return
    run = _open_init(t.init_from)
    if run.kind != "gguf":
        _require_same_model(run.path, run.config.model, cfg.model)
    if t.sgt.guide_init == "dense":
        dense_guides_path(run.root)


def load_init(path: str, model: nn.Module, cfg: ModelConfig) -> None:
    """--train.init_from: the weights of a structlm run or checkpoint, or of a Hugging Face model
    directory or GGUF file, into a fresh run's model, whose config must match the source's."""
    run = _open_init(path)
    if run.is_structlm:
        _require_same_model(run.path, run.config.model, cfg)
        checkpoint.load_weights(model, run.ckpt)
    else:
        src, sd = read_hf(run.path)
        _require_same_model(run.path, src, cfg)
        model.load_state_dict(sd, strict=True)


def _open_init(path: str) -> Run:
    """--train.init_from's source, with the flag named in what is wrong with it."""
    try:
        return Run.open(path)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"--train.init_from: {e}") from None


def start_files(resume: Resume, cfg: RunConfig, data_dir: Path, steps: int) -> None:
    """Rank 0, before the first step: leftovers of killed saves removed, metrics.jsonl cut back to
    what the checkpoint covers (or set aside, said aloud, when a run that died before its first
    checkpoint starts over), an override recorded, config.json and the tokenizer's files written."""
    out, metrics = resume.out, resume.out / "metrics.jsonl"
    checkpoint.clean_leftovers(out)
    if resume.ckpt is not None:
        print(f"resuming {out} from {resume.ckpt.name} (step {resume.step}/{steps})", flush=True)
        truncate_metrics(metrics, resume.step, resume.state.get("metrics_rows"))
    elif resume.existing and metrics.exists() and metrics.stat().st_size:
        kept = _set_aside(metrics)
        print(f"warning: {out} holds a run that stopped before its first checkpoint; starting it "
              f"over from step 0 (its metrics are kept in {kept})", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    if resume.changes:
        print(f"--override: resuming with {'; '.join(resume.changes)}", flush=True)
        with open(metrics, "a") as f:
            f.write(json.dumps({"step": resume.step, "split": "override",
                                "changes": resume.changes}) + "\n")
    save_json(cfg, str(out / "config.json"))
    shutil.copyfile(data_dir / "tokenizer.json", out / "tokenizer.json")
    copy_sidecars(data_dir, out)  # an imported model's chat template and end of turn stay with it


def _set_aside(path: Path) -> Path:
    n = 1
    while (dest := path.with_name(f"{path.stem}.discarded-{n}{path.suffix}")).exists():
        n += 1
    path.rename(dest)
    return dest


def truncate_metrics(path: Path, step: int, rows: int | None = None) -> None:
    """Keep the metrics rows a checkpoint covers: its first `rows` rows when it recorded them,
    else the rows up to `step`; a partial last line (a kill mid-write) always goes."""
    if not path.exists():
        return
    kept = []
    for ln in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:
            break  # a partial line: only the last can be, and nothing after it was written
        if rows is None and row.get("step", 0) > step:
            break
        kept.append(ln)
    kept = kept if rows is None else kept[:rows]
    atomic_write_text(path, "".join(r + "\n" for r in kept))


def diverged(out: Path, step: int, world: World) -> tuple[Path | None, Path | None]:
    """After a non-finite loss at `step`: set aside the checkpoint of that step (its weights gave
    the loss) so no resume picks it up; returns (where it went, the last good checkpoint)."""
    bad = Path(out) / "checkpoints" / f"step_{step:07d}"
    moved = None
    if world.master and bad.is_dir():
        moved = bad.with_name(f"diverged_{bad.name}")
        shutil.rmtree(moved, ignore_errors=True)
        bad.rename(moved)
        latest = bad.parent / "latest"
        if latest.exists() and latest.read_text().strip() == bad.name:
            latest.unlink()
    distributed.barrier(world)
    return moved, checkpoint.find_latest(out)
