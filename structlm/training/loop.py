"""Training: `train(cfg) -> Summary`, the paper's recipe (docs/method.md §6.3) as one loop.

    build:    process group, step plan, run directory + checkpoint, data      (all checked first)
    restore:  GPT(cfg.model), SGT guides if inside the guided phase, memory levers, FSDP2 sharding,
              AdamW, checkpoint state (single-file or sharded, any world size)
    for step in range(start, total_steps):
        lr; forward/backward over grad_accum micro-batches; clip; optimizer.step()
        leave the guided phase when alpha reaches 0
        every log_interval: one line + metrics.jsonl row
        every eval_interval: validation loss; every ckpt_interval (or eval): checkpoint
    finish:   full validation, final checkpoint, summary.json, loss.png

The loop's helpers (forward_backward, val_loss, save, finish, ...) take one RunState: the run's
fixed parts (config, world, dtype, plan, resume point, data, checkpointer, metrics log) and what
the loop changes (model, optimizer, guide phase, running numbers) plus the step they work on.

Data order is a pure function of (seed, step), so a resumed run, a DDP or FSDP rank and an
uninterrupted run read the same rows. Only rank 0 logs; under fsdp every rank writes its shards.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from structlm._version import __version__
from structlm.config import RunConfig, TrainConfig, to_dict
from structlm.data.batches import eval_batches
from structlm.model import mup
from structlm.model.flops import flops_per_token, param_groups
from structlm.model.gpt import GPT
from structlm.runs.convert import dense_guides
from structlm.runs.evaluate import evaluate_sums
from structlm.training import distributed, sharded
from structlm.training.distributed import World
from structlm.training.inputs import RunData, load_run_data
from structlm.training.metrics import MetricsLog, plot_losses, require_tensorboard
from structlm.training.optim import lr_at, make_optimizer, set_lr, total_steps
from structlm.training.rundir import (
    Resume,
    check_init,
    diverged,
    find_resume,
    hold_run_dir,
    load_init,
    restore,
    start_files,
)
from structlm.training.saving import Checkpointer
from structlm.training.sgt import GuidePhase, SGTPlan, make_plan
from structlm.utils.device import autocast, autocast_dtype, seed_all
from structlm.utils.files import atomic_write_text, is_tty, json_safe
from structlm.utils.units import amount


@dataclass
class Summary:
    """The result of a run, also written to run_dir/summary.json (the contract with
    scaling/report)."""

    out_dir: str
    steps: int
    tokens: int
    train_flops: float
    flops_per_token: int
    param_groups: dict
    final_val_loss: float
    final_val_ppl: float
    best_val_loss: float
    final_train_loss: float | None
    wall_time_s: float
    sgt: dict
    tokens_per_s: float
    device: str
    dtype: str
    torch_version: str
    world_size: int
    config: dict
    overrides: list = field(default_factory=list)  # resumes that changed optim/dtype fields
    structlm_version: str = ""  # the structlm that finished the run ("" in runs before 0.2.0)


@dataclass
class Tally:
    """The loop's running numbers; a checkpoint carries them (`state`), so a resumed run ends
    with the numbers of an uninterrupted one."""

    best_val: float = math.inf
    loss_sum: float = 0.0  # train loss summed over the steps since the last log line
    n: int = 0  # steps since the last log line
    train_loss: float = math.nan  # the last logged train loss
    elapsed: float = 0.0  # seconds of training loop before this process
    started: float | None = None  # time.time() this process's loop began (None: stopped)
    since: float = 0.0  # time.time() of the last log line

    @classmethod
    def from_state(cls, state: dict) -> Tally:
        loss_sum, n = state.get("log_acc", (0.0, 0))
        return cls(state.get("best_val", math.inf), loss_sum, n,
                   state.get("train_loss", math.nan), state.get("elapsed", 0.0))

    def state(self) -> dict:
        return {"best_val": self.best_val, "log_acc": (self.loss_sum, self.n),
                "train_loss": self.train_loss, "elapsed": self.wall()}

    def start(self) -> None:
        self.started = self.since = time.time()

    def stop(self) -> None:
        self.elapsed, self.started = self.wall(), None

    def wall(self) -> float:
        """Seconds of training loop so far, over every process the run has had."""
        return self.elapsed + (time.time() - self.started if self.started is not None else 0.0)

    def add(self, loss: float) -> None:
        self.loss_sum += loss
        self.n += 1

    def flush(self) -> tuple[float, float, int]:
        """(mean train loss, seconds, steps) since the last log line; starts the next one."""
        out = (self.loss_sum / self.n, time.time() - self.since, self.n)
        self.train_loss = out[0]
        self.loss_sum, self.n, self.since = 0.0, 0, time.time()
        return out


@dataclass
class RunState:
    """What the loop's helpers share, built once by `train`. Fixed for the run: cfg, world, amp,
    plan, resume, data, saver, log, accum. Changed by the loop: raw, model and optimizer (rebuilt
    when the guided phase ends), phase (its guides), tally (every step)."""

    cfg: RunConfig
    world: World
    amp: torch.dtype | None  # the autocast dtype (None: fp32)
    plan: SGTPlan
    resume: Resume
    data: RunData
    saver: Checkpointer
    log: MetricsLog
    accum: int  # micro-batches per optimizer step on each rank
    raw: nn.Module  # the model itself (sharded in place under fsdp)
    model: nn.Module  # raw as the forward runs it: DDP around it, or raw itself
    optimizer: torch.optim.Optimizer
    phase: GuidePhase
    tally: Tally

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.batch_size * self.cfg.seq_len


def train(cfg: RunConfig, *, progress: bool | None = None, override: bool = False) -> Summary:
    """Train (or resume) the run described by cfg; returns its Summary (also written to
    summary.json). `override`: resume even though optimizer/schedule fields or the dtype changed
    (recorded in metrics.jsonl and the summary)."""
    t = cfg.train
    world = distributed.setup(t.device)
    saver = Checkpointer(cfg, world)  # collective: its process group, on every rank
    amp = autocast_dtype(world.device, t.dtype)
    progress = (is_tty() if progress is None else progress) and world.master
    tokens_per_step = t.batch_size * cfg.seq_len
    plan = make_plan(t.sgt, cfg.model, total_steps(cfg), tokens_per_step, cfg.seq_len)
    steps = plan.total_steps  # S, or S + G for fixedflop self-guided training
    accum = grad_accum(t, world)

    # --- the run directory (locked: no other command writes into it while this one runs),
    # its checkpoint and the data: all checked before any work ---
    with hold_run_dir(Path(t.out_dir), world):
        resume = find_resume(Path(t.out_dir), cfg, plan, override=override)
        check_init(cfg, resume)
        if t.tensorboard and world.master:
            require_tensorboard()
        data = load_run_data(cfg, resume, world, progress)
        if resume.finished(steps):
            return finished_summary(resume, world)

        # --- model, guides, optimizer, restored state ---
        raw, optimizer, phase = build(cfg, plan, resume, world, amp)
        if world.master:
            start_files(resume, cfg, data.data_dir, steps)  # before metrics.jsonl is opened
            if resume.step == 0:
                announce(cfg, plan, world, amp)
        log = MetricsLog(resume.out, enabled=world.master, steps=steps, start=resume.step,
                         progress=progress, tensorboard=t.tensorboard)
        model = distributed.wrap(raw, world, t.parallel, find_unused=phase.active)
        run = RunState(cfg, world, amp, plan, resume, data, saver, log, accum, raw, model,
                       optimizer, phase, Tally.from_state(resume.state))
        tally = run.tally

        run.model.train()
        tally.start()
        for step in range(resume.step, steps):
            lr = lr_at(step, cfg.optim, steps)
            set_lr(run.optimizer, lr)
            loss = forward_backward(run, step)
            gnorm = distributed.full(torch.nn.utils.clip_grad_norm_(
                run.raw.parameters(), cfg.optim.grad_clip or math.inf))
            # the loss's mean over ranks, so every rank checks and logs the same numbers; one sync
            both = torch.stack([distributed.mean_(loss, world).double(), gnorm.double()])
            step_loss, gnorm = both.tolist()
            step_loss /= accum
            check_finite(run, step, step_loss, gnorm)  # before the update
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if phase.due(done):  # alpha is 0 from here: guides and their AdamW state removed
                run.raw, run.optimizer = leave_guided(run.raw, run.optimizer, phase, cfg, world,
                                                      amp)
                run.model = distributed.wrap(run.raw, world, t.parallel, find_unused=False)
            tally.add(step_loss)
            if done % t.log_interval == 0 or done == steps:
                train_loss, dt, n = tally.flush()
                log.train(done, train_loss, lr, gnorm, done * tokens_per_step,
                          n * tokens_per_step / dt, 1e3 * dt / n)
            log.advance()
            is_eval = t.eval_interval > 0 and done % t.eval_interval == 0 and done < steps
            if is_eval:
                val = val_loss(run, done, t.eval_tokens)
                tally.best_val = min(tally.best_val, val)
                log.val(done, val, done * tokens_per_step)
            due = done % t.ckpt_interval == 0 if t.ckpt_interval else is_eval
            if due and done < steps:  # the last step is saved once, after the final evaluation
                save(run, done)
        log.close_bar()
        tally.stop()
        return finish(run)


def build(
    cfg: RunConfig, plan: SGTPlan, resume: Resume, world: World, amp: torch.dtype | None,
) -> tuple[nn.Module, torch.optim.Optimizer, GuidePhase]:
    """GPT(cfg.model) with its starting weights, its SGT guides if inside the guided phase, the
    memory levers and sharding, AdamW, and the checkpoint's state restored."""
    t = cfg.train
    seed_all(t.seed)
    raw = GPT(cfg.model)
    if cfg.optim.param_scaling == "mup":
        mup.init_(raw, cfg.optim.base_width)  # each layer's init at its fan-in's scale
    raw = raw.to(world.device)
    if resume.ckpt is None and t.init_from:
        load_init(t.init_from, raw, cfg.model)  # weights only: a fresh optimizer and schedule
    phase = GuidePhase(plan, t.sgt, t.seed)
    fresh_dense = t.sgt.guide_init == "dense" and resume.ckpt is None
    phase.enter(raw, resume.step, dense_guides(t.init_from) if fresh_dense else None)
    raw = distributed.wrap_model(raw, world, t, amp)  # memory levers; FSDP2 shards it in place
    optimizer = make_optimizer(raw, cfg.optim)
    restore(resume, raw, optimizer, cfg.optim, world)
    return raw, optimizer, phase


def leave_guided(
    raw: nn.Module, optimizer: torch.optim.Optimizer, phase: GuidePhase, cfg: RunConfig,
    world: World, amp: torch.dtype | None,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model and optimizer without guides: unwrapped in place, or (FSDP2, whose parameter
    groups are fixed at sharding) rebuilt and re-sharded with the factors' state carried over."""
    if not distributed.is_fsdp(raw):
        phase.leave(raw, optimizer)
        return raw, optimizer
    phase.active = False
    return sharded.leave_guided(raw, optimizer, cfg,
                                lambda m: distributed.wrap_model(m, world, cfg.train, amp))


def finish(run: RunState) -> Summary:
    """Full validation, the final checkpoint, summary.json and loss.png. Killed anywhere in here, a
    rerun redoes it from the final checkpoint (or the last step) to the same summary."""
    steps, out = run.plan.total_steps, run.resume.out
    final_val = val_loss(run, steps, run.cfg.train.final_eval_tokens)
    run.tally.best_val = min(run.tally.best_val, final_val)
    run.saver.wait()
    if run.resume.step < steps:  # a resumed final phase already has its final checkpoint
        save(run, steps, final=True)
    run.log.val(steps, final_val, steps * run.tokens_per_step, echo=False)
    run.log.close()
    summary = make_summary(run, final_val)
    if run.world.master:
        atomic_write_text(out / "summary.json",
                          json.dumps(json_safe(asdict(summary)), indent=2, allow_nan=False))
        plot_losses(out / "metrics.jsonl", out / "loss.png", 3 * summary.flops_per_token)
    distributed.barrier(run.world)
    return summary


def finished_summary(resume: Resume, world: World) -> Summary:
    if world.master:
        print(f"{resume.out} already finished ({resume.step} steps); "
              "use another --train.out_dir for a new run")
    names = {f.name for f in fields(Summary)}
    return Summary(**{k: v for k, v in resume.summary.items() if k in names})


def check_finite(run: RunState, step: int, loss: float, gnorm: float) -> None:
    """Stop before an update from a non-finite loss or gradient norm, so the weights stay as they
    were; the checkpoint whose weights gave that loss is set aside, and the message names the last
    good one and how to resume from it."""
    if math.isfinite(loss) and math.isfinite(gnorm):
        return
    bad, good = diverged(run.resume.out, step, run.world)
    aside = f"The checkpoint whose weights gave it was moved to {bad}. " if bad else ""
    fix = f"structlm train --resume {run.resume.out} --override --optim.lr LOWER_LR"
    if run.amp:
        fix += " (or add --train.dtype fp32: this run computes in bf16)"
    raise FloatingPointError(
        f"the loss became {loss} (gradient norm {gnorm}) at step {step}; stopped before that "
        f"update. {aside}The last good checkpoint is {good or 'none'}; resume from it with a "
        f"lower learning rate: {fix}"
    )


def grad_accum(t: TrainConfig, world: World) -> int:
    """Micro-batches per optimizer step on each rank."""
    if t.batch_size % (world.size * t.micro_batch_size):
        raise ValueError(
            f"train.batch_size={t.batch_size} must be a multiple of world_size*micro_batch_size="
            f"{world.size}*{t.micro_batch_size}; adjust --train.micro_batch_size"
        )
    return t.batch_size // (world.size * t.micro_batch_size)


def forward_backward(run: RunState, step: int) -> torch.Tensor:
    """Gradients of one optimizer step: `run.accum` micro-batches of this rank's contiguous slice
    of the global batch. Returns the sum of the micro-batch losses (detached)."""
    t, world, accum = run.cfg.train, run.world, run.accum
    data_step, per_rank = run.plan.data_step(step), t.batch_size // world.size
    loss_sum = torch.zeros((), device=world.device)
    try:
        for micro in range(accum):
            run.phase.before_forward(run.raw, step, micro)
            row = world.rank * per_rank + micro * t.micro_batch_size
            x, y = run.data.train.rows(data_step, row, t.micro_batch_size)
            x, y = x.to(world.device), y.to(world.device)
            sync = micro == accum - 1  # reduce gradients across ranks on the last micro-step
            with distributed.grad_sync(run.model, world, sync), autocast(world.device, run.amp):
                _, loss = run.model(x, y)
            # the micro-batch losses are averaged: each contributes 1/accum of the step's gradient
            (loss / accum).backward()
            loss_sum += loss.detach()
    except RuntimeError as e:  # torch.OutOfMemoryError is one too
        if not out_of_memory(e):
            raise
        raise oom_error(run, step, e) from None
    return loss_sum


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` is an allocator's out-of-memory error (CPU or CUDA)."""
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)


class OutOfMemory(ValueError):
    """A training step that did not fit in memory (a ValueError: the CLI exits 2)."""


def oom_error(run: RunState, step: int, e: BaseException) -> OutOfMemory:
    """The out-of-memory error with what to change; a fresh run that never reached a checkpoint
    is removed (rank 0), so no half-made run directory is left behind."""
    t = run.cfg.train
    if run.world.master and run.resume.ckpt is None and not run.resume.existing:
        shutil.rmtree(run.resume.out, ignore_errors=True)
    return OutOfMemory(
        f"step {step + 1} ran out of memory ({str(e).splitlines()[0][:160]}) with "
        f"{t.micro_batch_size} sequences of {run.cfg.seq_len} tokens per micro-batch. Lower "
        f"--train.micro_batch_size (the batch of {t.batch_size} stays the same: more micro-steps "
        "accumulate it), or add --train.activation_checkpointing block")


def val_loss(run: RunState, step: int, max_tokens: int | None) -> float:
    """Mean validation loss over `max_tokens` tokens (all when None), each rank a share of the
    batches. The raw model: no DDP collectives in eval, so ranks with fewer batches cannot hang;
    a sharded model gathers its weights in every forward, so there every rank runs as many
    forwards (the short ranks' last ones on a batch they do not count)."""
    raw, world, amp = run.raw, run.world, run.amp
    run.phase.before_eval(raw, step)
    batches = eval_batches(run.data.val, run.cfg.seq_len, run.cfg.train.micro_batch_size,
                           max_tokens)
    if distributed.is_fsdp(raw):
        s, n = sharded_eval_sums(raw, batches, world, amp)
    else:
        s, n = evaluate_sums(raw, islice(batches, world.rank, None, world.size), world.device, amp)
    s, n = distributed.sum_([s, n], world)
    return s / max(n, 1)


@torch.no_grad()
def sharded_eval_sums(
    model: nn.Module, batches, world: World, amp: torch.dtype | None
) -> tuple[float, int]:
    """evaluate_sums for a sharded model: batches dealt round-robin, every rank one forward per
    round."""
    model.eval()
    s, n, it = 0.0, 0, iter(batches)
    while group := list(islice(it, world.size)):
        x, y = group[min(world.rank, len(group) - 1)]
        with autocast(world.device, amp):
            _, loss = model(x.to(world.device), y.to(world.device))
        if world.rank < len(group):
            s, n = s + loss.item() * y.numel(), n + y.numel()
    model.train()
    return s, n


def save(run: RunState, step: int, final: bool = False) -> None:
    """The checkpoint of `step` (single-file from rank 0, or every rank's shards)."""
    if run.world.master:
        run.log.sync()  # the rows this checkpoint covers are on disk before it is
    state = {**run.tally.state(), "tokenizer_sha256": run.data.meta["tokenizer_sha256"],
             "sgt_plan": asdict(run.plan), "metrics_rows": run.log.rows,
             "overrides": run.resume.overrides}
    run.saver.save(run.raw, run.optimizer, run.cfg, step, state, final)


def announce(cfg: RunConfig, plan: SGTPlan, world: World, amp: torch.dtype | None) -> None:
    """The line a fresh run starts with: size, budget, FLOPs, device."""
    groups = param_groups(cfg.model)
    tokens_per_step = cfg.train.batch_size * cfg.seq_len
    sgt_note = ""
    if plan.guided_steps:
        sgt_note = (f" | SGT {plan.mode}: {plan.guided_steps} guided steps (ratio "
                    f"{plan.ratio:.3f}), dense model: {plan.dense_train_flops:.2e} FLOPs")
    print(
        f"model: {groups['total']:,} params ({groups['ffn']:,} FFN, {cfg.model.ffn.kind}) | "
        f"{plan.total_steps} steps x {tokens_per_step:,} tokens = "
        f"{amount(plan.total_steps * tokens_per_step, 'tokens')} | "
        f"{plan.train_flops:.2e} FLOPs{sgt_note} | {world.device}, {amp or 'fp32'}, "
        f"world {world.size}",
        flush=True,
    )


def make_summary(run: RunState, final_val: float) -> Summary:
    cfg, plan, tally = run.cfg, run.plan, run.tally
    steps, tokens_per_step = plan.total_steps, run.tokens_per_step
    wall = tally.wall()
    return Summary(
        out_dir=str(Path(cfg.train.out_dir)), steps=steps, tokens=steps * tokens_per_step,
        train_flops=plan.train_flops,
        flops_per_token=flops_per_token(cfg.model, cfg.seq_len)["total"],
        param_groups=param_groups(cfg.model), final_val_loss=final_val,
        final_val_ppl=math.exp(final_val), best_val_loss=tally.best_val,
        final_train_loss=tally.train_loss, wall_time_s=wall, sgt=asdict(plan),
        tokens_per_s=steps * tokens_per_step / max(wall, 1e-9), device=str(run.world.device),
        dtype=str(run.amp or "fp32").replace("torch.", ""), torch_version=torch.__version__,
        world_size=run.world.size, config=to_dict(cfg), overrides=run.resume.overrides,
        structlm_version=__version__,
    )
