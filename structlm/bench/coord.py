"""The muP coordinate check (`structlm bench coord`): train the same architecture at several widths
for a few AdamW steps on one fixed batch, and measure, per layer and width, the size of its output
coordinates (RMS) and how far they moved from their values at init (the RMS of x_t - x_0).

Under muP (`--optim.param_scaling mup`) both stay about constant as width grows; under standard
parametrisation the moves grow with width (roughly like it, for Adam), which is why an lr tuned
at one width is wrong at another. `slope` = d log(delta_rms) / d log(width), fitted over the
widths at the last step: about 0 is flat, about 1 grows like the width.

    layers: embedding (token embedding output), attention / ffn (every block's branch output,
            RMS averaged over blocks), logits
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor
from tqdm import tqdm

from structlm.config import DataConfig, ModelConfig, OptimConfig, mup_model
from structlm.data.batches import load_tokens
from structlm.data.prepare import resolve_data_dir
from structlm.linear.registry import DENSE, LinearSpec, choose_hparams, linear_class
from structlm.model import mup
from structlm.model.gpt import GPT
from structlm.training.optim import make_optimizer
from structlm.utils.device import autocast
from structlm.utils.files import is_tty

LAYERS = ("embedding", "attention", "ffn", "logits")
SCALINGS = ("standard", "mup")


def coord_batch(data: DataConfig, vocab: int, batch: int, seq: int, seed: int) -> tuple[Tensor,
                                                                                        str]:
    """(batch, seq + 1) token ids: windows of the prepared training split when there is one,
    else uniform random ids; and which of the two it is."""
    gen = torch.Generator().manual_seed(seed)
    path = resolve_data_dir(data)
    if (path / "meta.json").exists():
        tokens = load_tokens(path, "train")
        starts = torch.randint(0, len(tokens) - seq - 1, (batch,), generator=gen).tolist()
        rows = [np.asarray(tokens[s:s + seq + 1], dtype=np.int64) for s in starts]
        ids = torch.from_numpy(np.stack(rows))
        if int(ids.max()) < vocab:
            return ids, str(path)
    return torch.randint(0, vocab, (batch, seq + 1), generator=gen), "random"


def kind_model(m: ModelConfig, kind: str, width: int) -> ModelConfig:
    """`m` with its FFNs of `kind` at the kind's first benchmark budget, at `width`."""
    spec = LinearSpec() if kind == DENSE else choose_hparams(
        kind, [(n, k) for _, n, k in m.ffn_shapes()], linear_class(kind).bench_fractions[0])
    return dataclasses.replace(m, ffn=spec).at_width(width)


def _hooks(model: GPT, acts: dict[str, list[Tensor]]) -> list:
    """Forward hooks that collect every layer group's output, detached, in fp32."""
    def keep(name):
        return lambda mod, args, out: acts.setdefault(name, []).append(out.detach().float())
    hooks = [model.wte.register_forward_hook(keep("embedding"))]
    for b in model.blocks:
        hooks.append(b.attn.register_forward_hook(keep("attention")))
        hooks.append(b.mlp.register_forward_hook(keep("ffn")))
    return hooks


def _rms(t: Tensor) -> float:
    return t.pow(2).mean().sqrt().item()


def train_probe(model: GPT, optim: OptimConfig, ids: Tensor, steps: int,
                amp: torch.dtype | None) -> list[dict[str, tuple[float, float]]]:
    """`steps` AdamW steps at the constant lr on the batch `ids`; per step 0..steps, per layer,
    (RMS of the outputs, RMS of their change since step 0), RMS averaged over blocks."""
    opt = make_optimizer(model, optim)
    x, y = ids[:, :-1], ids[:, 1:]
    first, out = {}, []
    for step in range(steps + 1):
        acts: dict[str, list[Tensor]] = {}
        hooks = _hooks(model, acts)
        with autocast(ids.device, amp):
            logits, loss = model(x, y)
        for h in hooks:
            h.remove()
        acts["logits"] = [logits.detach().float()]
        first = first or acts
        out.append({k: (statistics.fmean(_rms(a) for a in v),
                        statistics.fmean(_rms(a - a0) for a, a0 in zip(v, first[k], strict=True)))
                    for k, v in acts.items()})
        if step < steps:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return out


def _one(m: ModelConfig, kind: str, width: int, scaling: str, optim: OptimConfig, seed: int,
         ids: Tensor, steps: int, device: torch.device, amp: torch.dtype | None) -> list[dict]:
    cfg = kind_model(m, kind, width)
    opt_cfg = dataclasses.replace(optim, param_scaling=scaling)
    if scaling == "mup":
        cfg = mup_model(cfg, optim.base_width, pretrained=False)
    torch.manual_seed(seed)
    model = GPT(cfg)
    if scaling == "mup":
        mup.init_(model, optim.base_width)
    stats = train_probe(model.to(device), opt_cfg, ids.to(device), steps, amp)
    return [{"kind": kind, "scaling": scaling, "width": width, "seed": seed, "step": t,
             "layer": layer, "act_rms": a, "delta_rms": d}
            for t, s in enumerate(stats) for layer, (a, d) in s.items()]


def coord_check(
    m: ModelConfig, optim: OptimConfig, data: DataConfig, widths: tuple[int, ...],
    kinds: tuple[str, ...], steps: int, seeds: int, batch: int, seq: int,
    device: torch.device, amp: torch.dtype | None,
) -> list[dict]:
    """Rows at the last step, the median over seeds, with each (kind, scaling, layer)'s slope."""
    raw, jobs = [], [(k, s, w, seed) for k in kinds for s in SCALINGS for w in widths
                     for seed in range(seeds)]
    ids, source = coord_batch(data, m.vocab_size, batch, seq, 0)
    for kind, scaling, width, seed in tqdm(jobs, desc="coord", disable=not is_tty()):
        raw += _one(m, kind, width, scaling, optim, seed, ids, steps, device, amp)
    return summarise(raw, steps, source, optim)


def summarise(raw: list[dict], steps: int, source: str, optim: OptimConfig) -> list[dict]:
    """Median over seeds of the last step, one row per (kind, scaling, layer, width), each with
    its group's slope of log(delta_rms) against log(width)."""
    groups: dict[tuple, dict[int, list[dict]]] = {}
    for r in raw:
        if r["step"] == steps:
            groups.setdefault((r["kind"], r["scaling"], r["layer"]), {}).setdefault(
                r["width"], []).append(r)
    rows = []
    for (kind, scaling, layer), by_width in groups.items():
        med = {w: (statistics.median(r["act_rms"] for r in rs),
                   statistics.median(r["delta_rms"] for r in rs)) for w, rs in by_width.items()}
        slope = log_slope(list(med), [d for _, d in med.values()])
        rows += [{"kind": kind, "scaling": scaling, "layer": layer, "width": w, "step": steps,
                  "act_rms": a, "delta_rms": d, "slope": slope, "lr": optim.lr,
                  "base_width": optim.base_width, "data": source}
                 for w, (a, d) in sorted(med.items())]
    return rows


def log_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) on log(x); nan with fewer than two points."""
    if len(xs) < 2 or min(ys) <= 0:
        return math.nan
    lx, ly = np.log(xs), np.log(ys)
    return float(np.polyfit(lx, ly, 1)[0])


def plot_coord(rows: list[dict], path: str | Path, title: str) -> None:
    """One panel per (kind, scaling): delta_rms against width, one line per layer, log-log."""
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    fig = Figure(figsize=(7.5, 2.4 * len(kinds)))
    axes = fig.subplots(len(kinds), 2, squeeze=False, sharey="row")
    for i, kind in enumerate(kinds):
        for j, scaling in enumerate(SCALINGS):
            ax = axes[i][j]
            for layer in LAYERS:
                pts = [r for r in rows if (r["kind"], r["scaling"], r["layer"]) ==
                       (kind, scaling, layer)]
                if pts:
                    ax.plot([r["width"] for r in pts], [r["delta_rms"] for r in pts], "o-",
                            label=f"{layer} ({pts[0]['slope']:+.2f})")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{kind}, {scaling}", fontsize=9)
            ax.legend(fontsize=6)
            ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("width (d_model)")
    for row in axes:
        row[0].set_ylabel("RMS of x_t - x_0")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)

