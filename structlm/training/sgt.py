"""Self-guided training in a run (docs/method.md §4): the alpha schedule, the step plan, the
reduce_flop draws, and the guided phase itself (`GuidePhase`: enter, alpha per micro-step, leave).

The schedule, plan and draws are pure functions of the config and the step, so a resumed or
distributed run makes exactly the same choices.

    fixedstep:  steps [0, G) guided, [G, S) plain                                 total S
    fixedflop:  steps [0, G) guided, [G, S) plain, [S, S+G) replay batches 0..G-1  total S + G

G = int(ratio * S), or, with match_flops="dense", the largest G whose training FLOPs do not exceed
the dense model's at S steps (instead of the paper's hand-tuned max_step_ratio table).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from structlm.config import LinearSpec, ModelConfig, SGTConfig
from structlm.linear.guided import (
    guide_parameters,
    guided_layers,
    set_guide,
    unwrap_guided,
    wrap_guided,
)
from structlm.model.flops import flops_per_token, sgt_train_flops
from structlm.training.optim import drop_params

SCHEDULES = ("cosine", "linear")


def guide_alpha(step: int, guided_steps: int, schedule: str = "cosine") -> float:
    """alpha at optimizer step `step`: 1 at step 0, decaying to 0 at step G (docs/method.md §4.2); 0
    afterwards."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if step >= guided_steps:
        return 0.0
    t = step / guided_steps
    if schedule == "linear":
        return 1.0 - t
    return 0.5 * (1.0 + math.cos(math.pi * t))


def guide_forwards(guided_steps: int, schedule: str, reduce_flop: bool) -> float:
    """Expected number of step-equivalents the guides run: G, or sum(alpha) under reduce_flop."""
    if not reduce_flop:
        return float(guided_steps)
    return sum(guide_alpha(t, guided_steps, schedule) for t in range(guided_steps))


@dataclass(frozen=True)
class SGTPlan:
    mode: str
    base_steps: int  # S: the budget's steps
    guided_steps: int  # G
    total_steps: int  # S (fixedstep) or S + G (fixedflop)
    ratio: float  # G / S
    train_flops: float  # expected training FLOPs of the whole run
    dense_train_flops: float  # the dense model's at S steps (the budget match_flops aims at)

    def data_step(self, step: int) -> int:
        """Which step's batch optimizer step `step` reads: fixedflop replays batches 0..G-1 at the
        end."""
        return step - self.base_steps if step >= self.base_steps else step

    def guided(self, step: int) -> bool:
        return step < self.guided_steps


def make_plan(
    sgt: SGTConfig, model: ModelConfig, base_steps: int, tokens_per_step: int, seq_len: int
) -> SGTPlan:
    """The step plan and FLOP accounting of a run (mode "off" gives G = 0)."""
    dense = dataclasses.replace(model, ffn=LinearSpec())
    dense_flops = 3.0 * flops_per_token(dense, seq_len)["total"] * tokens_per_step * base_steps

    def flops(g: int) -> float:
        total = base_steps + (g if sgt.mode == "fixedflop" else 0)
        fwd = guide_forwards(g, sgt.schedule, sgt.reduce_flop)
        return sgt_train_flops(model, total, fwd, tokens_per_step, seq_len)

    if sgt.mode == "off":
        g = 0
    elif sgt.match_flops == "dense":
        # largest G in [0, S] with flops(G) <= dense budget (flops grows with G)
        lo, hi = 0, base_steps
        if flops(0) > dense_flops:
            raise ValueError(
                "the structured model alone already costs more than the dense one; no SGT budget"
            )
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if flops(mid) <= dense_flops else (lo, mid - 1)
        g = lo
    else:
        g = int(sgt.ratio * base_steps)
    if sgt.mode == "fixedstep":  # at least one plain step: the guides are removed before the end
        g = min(g, base_steps - 1)
    total = base_steps + (g if sgt.mode == "fixedflop" else 0)
    return SGTPlan(sgt.mode, base_steps, g, total, g / base_steps, flops(g), dense_flops)


def guide_draws(seed: int, step: int, micro: int, n_layers: int, alpha: float) -> list[bool]:
    """reduce_flop: which guides run in this forward, each with probability alpha (method §4.4).
    Seeded by (seed, step, micro) so every DDP rank and every resumed run draws the same."""
    u = np.random.default_rng([seed, step, micro, 7]).random(n_layers)
    return [bool(x < alpha) for x in u]


class GuidePhase:
    """The guided phase of one run: the guides exist from `enter` until the step after which alpha
    is 0, when `leave` removes them and their optimizer state. Outside the phase (or with
    SGT off) every method is a no-op."""

    def __init__(self, plan: SGTPlan, cfg: SGTConfig, seed: int) -> None:
        self.plan, self.cfg, self.seed = plan, cfg, seed
        self.active = False

    def enter(self, model: nn.Module, step: int, guides: dict | None = None) -> None:
        """Wrap the structured layers in guides if `step` is inside the guided phase (`guides`:
        starting matrices by layer name, for guide_init="dense")."""
        if self.plan.guided(step):
            init = "exact" if self.cfg.guide_init == "dense" else self.cfg.guide_init
            wrap_guided(model, init, guides=guides)
            self.active = True

    def before_forward(self, model: nn.Module, step: int, micro: int) -> None:
        """Set alpha (and under reduce_flop, which guides run) for this micro-step's forward."""
        if not self.active:
            return
        alpha = guide_alpha(step, self.plan.guided_steps, self.cfg.schedule)
        draws = None
        if self.cfg.reduce_flop:
            draws = guide_draws(self.seed, step, micro, len(guided_layers(model)), alpha)
        set_guide(model, alpha, draws)

    def before_eval(self, model: nn.Module, step: int) -> None:
        """Mid-phase evaluation: every guide on, at the alpha of the next step."""
        if self.active:
            set_guide(model, guide_alpha(step, self.plan.guided_steps, self.cfg.schedule))

    def due(self, done: int) -> bool:
        """Whether the guides should go after `done` steps (alpha is 0 from here)."""
        return self.active and not self.plan.guided(done)

    def leave(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Drop the guides and their AdamW state, in place (the caller re-wraps DDP around the
        changed model)."""
        guides = guide_parameters(model)
        unwrap_guided(model)
        drop_params(optimizer, guides)
        self.active = False


class SelfGuided:
    """Self-guided training as a component of your own loop, for any model with structured layers:

        sg = SelfGuided(model, guided_steps=1000)        # guides in (before the optimizer sees
        optimizer = torch.optim.AdamW(model.parameters())  # the parameters)
        for batch in data:
            sg.step()                                    # alpha for this step
            loss = model(batch); loss.backward(); optimizer.step(); optimizer.zero_grad()
            if sg.done:
                sg.finish(optimizer)                     # guides and their AdamW state out

    `guides` starts chosen layers' guides from given matrices (by layer name), e.g. the dense
    weights `structure()` replaced, so training starts at the pretrained function. To resume,
    save `sg.state_dict()` beside the model and optimizer and `sg.load_state_dict(...)` it into
    the new SelfGuided (the guides themselves are in the model's state_dict)."""

    def __init__(self, model: nn.Module, guided_steps: int, schedule: str = "cosine",
                 init: str = "exact", guides: dict | None = None) -> None:
        if guided_steps < 1:
            raise ValueError(f"guided_steps={guided_steps} must be >= 1")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}: choose one of {', '.join(SCHEDULES)}")
        self.model, self.guided_steps, self.schedule = model, guided_steps, schedule
        self.steps = 0
        wrap_guided(model, init, guides=guides)
        if not guided_layers(model):
            raise ValueError("the model has no structured layers to guide; structure it first")

    @property
    def done(self) -> bool:
        return self.steps >= self.guided_steps

    def step(self) -> float:
        """Set alpha for the coming forward/backward and count the step; returns alpha."""
        alpha = guide_alpha(self.steps, self.guided_steps, self.schedule)
        set_guide(self.model, alpha)
        self.steps += 1
        return alpha

    def state_dict(self) -> dict:
        """Where the schedule stands: what a resumed loop needs besides model and optimizer."""
        return {"steps": self.steps, "guided_steps": self.guided_steps,
                "schedule": self.schedule}

    def load_state_dict(self, state: dict) -> None:
        """Continue the schedule of a saved `state_dict()` (its G and schedule must match)."""
        mine = {"guided_steps": self.guided_steps, "schedule": self.schedule}
        theirs = {k: state[k] for k in mine}
        if theirs != mine:
            raise ValueError(f"this SelfGuided has {mine}, the saved state {theirs}: build it "
                             "with the saved run's guided_steps and schedule")
        self.steps = int(state["steps"])
        set_guide(self.model, guide_alpha(self.steps, self.guided_steps, self.schedule))

    def finish(self, optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
        """Remove the guides (and their optimizer state): the model is the structured one."""
        guides = guide_parameters(self.model)
        unwrap_guided(self.model)
        if optimizer is not None:
            drop_params(optimizer, guides)
        return self.model
