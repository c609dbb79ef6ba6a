"""Training: `train(cfg) -> Summary`, the paper's recipe (docs/method.md §6.3) as one loop.

    build:    process group, step plan, run directory + checkpoint, data      (all checked first)
    restore:  GPT(cfg.model), SGT guides if inside the guided phase, AdamW, checkpoint state
    for step in range(start, total_steps):
        lr; forward/backward over grad_accum micro-batches; clip; optimizer.step()
        leave the guided phase when alpha reaches 0
        every log_interval: one line + metrics.jsonl row
        every eval_interval: validation loss; every ckpt_interval (or eval): checkpoint
    finish:   full validation, final checkpoint, summary.json, loss.png

Data order is a pure function of (seed, step), so a resumed run, a DDP rank and an uninterrupted run
read the same rows. Only rank 0 logs and writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from structlm import checkpoint
from structlm.config import RunConfig, TrainConfig, to_dict
from structlm.data import Batches, eval_batches
from structlm.evaluate import evaluate_sums
from structlm.flops import flops_per_token, param_groups
from structlm.model import GPT
from structlm.training import distributed
from structlm.training.distributed import World
from structlm.training.inputs import RunData, load_run_data
from structlm.training.metrics import MetricsLog, plot_losses
from structlm.training.optim import lr_at, make_optimizer, set_lr, total_steps
from structlm.training.rundir import Resume, find_resume, restore, start_files
from structlm.training.sgt import GuidePhase, SGTPlan, make_plan
from structlm.utils import autocast, autocast_dtype, is_tty, seed_all


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
    final_train_loss: float
    wall_time_s: float
    sgt: dict
    tokens_per_s: float
    device: str
    dtype: str
    torch_version: str
    world_size: int
    config: dict


@dataclass
class Tally:
    """The loop's running numbers (a checkpoint carries all but the clock)."""

    best_val: float = math.inf
    loss_sum: float = 0.0  # train loss summed over the steps since the last log line
    n: int = 0  # steps since the last log line
    since: float = 0.0  # time.time() of the last log line

    def add(self, loss: float, step: int, resume: Resume) -> None:
        self.loss_sum += loss
        self.n += 1
        if not math.isfinite(self.loss_sum):
            last = checkpoint.find_latest(resume.out)
            raise FloatingPointError(
                f"loss became {self.loss_sum / self.n} at step {step}; stopping. The last good "
                f"checkpoint is {last or 'none'}; lower --optim.lr or use --train.dtype fp32 and "
                "resume"
            )

    def flush(self) -> tuple[float, float, int]:
        """(mean train loss, seconds, steps) since the last log line; starts the next one."""
        out = (self.loss_sum / self.n, time.time() - self.since, self.n)
        self.loss_sum, self.n, self.since = 0.0, 0, time.time()
        return out


def train(cfg: RunConfig, *, progress: bool | None = None) -> Summary:
    """Train (or resume) the run described by cfg; returns its Summary (also written to
    summary.json)."""
    t = cfg.train
    world = distributed.setup(t.device)
    amp = autocast_dtype(world.device, t.dtype)
    progress = (is_tty() if progress is None else progress) and world.master
    tokens_per_step = t.batch_size * cfg.seq_len
    plan = make_plan(t.sgt, cfg.model, total_steps(cfg), tokens_per_step, cfg.seq_len)
    steps = plan.total_steps  # S, or S + G for fixedflop self-guided training
    accum = grad_accum(t, world)

    # --- the run directory, its checkpoint and the data: all checked before any work ---
    resume = find_resume(Path(t.out_dir), cfg, plan)
    data = load_run_data(cfg, resume, world, progress)
    if resume.finished(steps):
        return finished_summary(resume, world)

    # --- model, guides, optimizer, restored state ---
    seed_all(t.seed)
    raw = GPT(cfg.model).to(world.device)
    phase = GuidePhase(plan, t.sgt, t.seed)
    phase.enter(raw, resume.step)  # the guides exist only during the guided phase
    optimizer = make_optimizer(raw, cfg.optim)
    restore(resume, raw, optimizer, world.device)
    tally = Tally(resume.state.get("best_val", math.inf), *resume.state.get("log_acc", (0.0, 0)))
    if world.master:
        start_files(resume, cfg, data.data_dir, steps)
        if resume.step == 0:
            announce(cfg, plan, world, amp)
    model = distributed.wrap(raw, world, find_unused=phase.active, compile=t.compile)
    log = MetricsLog(resume.out, enabled=world.master, steps=steps, start=resume.step,
                     progress=progress, tensorboard=t.tensorboard)

    model.train()
    t0 = tally.since = time.time()
    train_loss = float("nan")
    for step in range(resume.step, steps):
        lr = lr_at(step, cfg.optim, steps)
        set_lr(optimizer, lr)
        loss = forward_backward(model, raw, data.train, plan.data_step(step), step, phase, t,
                                world, accum, amp)
        gnorm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.optim.grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if phase.leave_if_done(raw, optimizer, done):  # alpha is 0 from here: guides removed
            model = distributed.wrap(raw, world, find_unused=False, compile=t.compile)
        # the mean over ranks, so every rank logs and NaN-checks the same number
        tally.add(distributed.mean_(loss, world).item() / accum, step, resume)  # one device sync
        if done % t.log_interval == 0 or done == steps:
            train_loss, dt, n = tally.flush()
            log.train(done, train_loss, lr, gnorm.item(), done * tokens_per_step,
                      n * tokens_per_step / dt, 1e3 * dt / n)
        log.advance()
        is_eval = t.eval_interval > 0 and done % t.eval_interval == 0 and done < steps
        if is_eval:
            val = val_loss(raw, data, phase, done, cfg, world, amp, t.eval_tokens)
            tally.best_val = min(tally.best_val, val)
            log.val(done, val, done * tokens_per_step)
        if (t.ckpt_interval and done % t.ckpt_interval == 0) or (not t.ckpt_interval and is_eval):
            save(raw, optimizer, cfg, done, tally, data, plan, world)
    log.close_bar()
    wall = time.time() - t0

    # --- the end: full validation, final checkpoint, summary, plot ---
    final_val = val_loss(raw, data, phase, steps, cfg, world, amp, None)
    tally.best_val = min(tally.best_val, final_val)
    log.val(steps, final_val, steps * tokens_per_step, echo=False)
    log.close()
    save(raw, optimizer, cfg, steps, tally, data, plan, world)
    summary = make_summary(cfg, plan, world, amp, final_val, tally.best_val, train_loss, wall,
                           steps - resume.step)
    if world.master:
        (resume.out / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
        plot_losses(resume.out / "metrics.jsonl", resume.out / "loss.png",
                    3 * summary.flops_per_token)
    distributed.barrier(world)
    return summary


def finished_summary(resume: Resume, world: World) -> Summary:
    if world.master:
        print(f"{resume.out} already finished ({resume.step} steps); "
              "use another --train.out_dir for a new run")
    return Summary(**json.loads((resume.out / "summary.json").read_text()))


def grad_accum(t: TrainConfig, world: World) -> int:
    """Micro-batches per optimizer step on each rank."""
    if t.batch_size % (world.size * t.micro_batch_size):
        raise ValueError(
            f"train.batch_size={t.batch_size} must be a multiple of world_size*micro_batch_size="
            f"{world.size}*{t.micro_batch_size}; adjust --train.micro_batch_size"
        )
    return t.batch_size // (world.size * t.micro_batch_size)


def forward_backward(
    model: nn.Module, raw: nn.Module, batches: Batches, data_step: int, step: int,
    phase: GuidePhase, t: TrainConfig, world: World, accum: int, amp: torch.dtype | None,
) -> torch.Tensor:
    """Gradients of one optimizer step: `accum` micro-batches of this rank's contiguous slice of
    the global batch. Returns the sum of the micro-batch losses (detached)."""
    per_rank = t.batch_size // world.size
    loss_sum = torch.zeros((), device=world.device)
    for micro in range(accum):
        phase.before_forward(raw, step, micro)
        row = world.rank * per_rank + micro * t.micro_batch_size
        x, y = batches.rows(data_step, row, t.micro_batch_size)
        x, y = x.to(world.device), y.to(world.device)
        sync = not world.ddp or micro == accum - 1  # all-reduce gradients on the last micro-step
        with (contextlib.nullcontext() if sync else model.no_sync()), autocast(world.device, amp):
            _, loss = model(x, y)
        # the micro-batch losses are averaged: each contributes 1/accum of the step's gradient
        (loss / accum).backward()
        loss_sum += loss.detach()
    return loss_sum


def val_loss(
    raw: nn.Module, data: RunData, phase: GuidePhase, step: int, cfg: RunConfig, world: World,
    amp: torch.dtype | None, max_tokens: int | None,
) -> float:
    """Mean validation loss over `max_tokens` tokens (all when None), each rank a share of the
    batches. The raw model: no DDP collectives in eval, so ranks with fewer batches cannot hang."""
    phase.before_eval(raw, step)
    batches = eval_batches(data.val, cfg.seq_len, cfg.train.micro_batch_size, max_tokens)
    s, n = evaluate_sums(raw, islice(batches, world.rank, None, world.size), world.device, amp)
    s, n = distributed.sum_([s, n], world)
    return s / max(n, 1)


def save(
    raw: nn.Module, optimizer: torch.optim.Optimizer, cfg: RunConfig, step: int, tally: Tally,
    data: RunData, plan: SGTPlan, world: World,
) -> None:
    if world.master:
        state = {"best_val": tally.best_val, "tokenizer_sha256": data.meta["tokenizer_sha256"],
                 "sgt_plan": asdict(plan), "log_acc": (tally.loss_sum, tally.n)}
        checkpoint.save(cfg.train.out_dir, raw, optimizer, cfg, step, state, cfg.train.keep_last)


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
        f"{plan.total_steps * tokens_per_step / 1e6:.1f}M tokens | "
        f"{plan.train_flops:.2e} FLOPs{sgt_note} | {world.device}, {amp or 'fp32'}, "
        f"world {world.size}",
        flush=True,
    )


def make_summary(
    cfg: RunConfig, plan: SGTPlan, world: World, amp: torch.dtype | None, final_val: float,
    best_val: float, train_loss: float, wall: float, steps_run: int,
) -> Summary:
    steps, tokens_per_step = plan.total_steps, cfg.train.batch_size * cfg.seq_len
    return Summary(
        out_dir=str(Path(cfg.train.out_dir)), steps=steps, tokens=steps * tokens_per_step,
        train_flops=plan.train_flops,
        flops_per_token=flops_per_token(cfg.model, cfg.seq_len)["total"],
        param_groups=param_groups(cfg.model), final_val_loss=final_val,
        final_val_ppl=math.exp(final_val), best_val_loss=best_val, final_train_loss=train_loss,
        wall_time_s=wall, sgt=asdict(plan),
        tokens_per_s=steps_run * tokens_per_step / max(wall, 1e-9), device=str(world.device),
        dtype=str(amp or "fp32").replace("torch.", ""), torch_version=torch.__version__,
        world_size=world.size, config=to_dict(cfg),
    )
