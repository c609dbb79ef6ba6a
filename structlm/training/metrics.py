"""What a run reports as it goes: metrics.jsonl rows, optional TensorBoard scalars, a progress bar
on a terminal or one plain line per log interval elsewhere, and loss.png at the end.

    step    200/5000 | loss 3.4120 | lr 6.00e-04 | gnorm 0.87 | 142.1 ms | 115,320 tok/s

Only rank 0 reports; on other ranks a `MetricsLog` is built with enabled=False and does nothing.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from matplotlib.figure import Figure
from tqdm.auto import tqdm


class MetricsLog:
    """Appends rows to out/metrics.jsonl (and TensorBoard), prints progress; close() at the end."""

    def __init__(
        self, out: Path, *, enabled: bool, steps: int, start: int, progress: bool,
        tensorboard: bool,
    ) -> None:
        self.enabled, self.steps = enabled, steps
        path = out / "metrics.jsonl"
        self.rows = len(path.read_text().splitlines()) if enabled and path.exists() else 0
        # opened for the whole run, closed by close()
        self.file = open(path, "a") if enabled else None  # noqa: SIM115
        self.writer = _tensorboard(out) if enabled and tensorboard else None
        self.bar = tqdm(total=steps, initial=start, unit="step", dynamic_ncols=True) if (
            enabled and progress) else None

    def row(self, row: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.rows += 1
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("step", "split", "tokens"):
                    self.writer.add_scalar(f"{row['split']}/{k}", v, row["step"])

    def train(self, step: int, loss: float, lr: float, gnorm: float, tokens: int, tok_s: float,
              ms: float) -> None:
        """One train row and its line (or the bar's postfix)."""
        self.row({"step": step, "split": "train", "loss": loss, "lr": lr, "gnorm": gnorm,
                  "tokens": tokens, "tok_per_s": tok_s, "ms_per_step": ms})
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.1e}")
        else:
            print(f"step {step:>6}/{self.steps} | loss {loss:.4f} | lr {lr:.2e} | gnorm "
                  f"{gnorm:.2f} | {ms:.1f} ms | {tok_s:,.0f} tok/s", flush=True)

    def val(self, step: int, loss: float, tokens: int, echo: bool = True) -> None:
        """One validation row (and its line unless echo=False)."""
        self.row({"step": step, "split": "val", "loss": loss, "ppl": math.exp(loss),
                  "tokens": tokens})
        if self.enabled and echo:
            msg = f"step {step:>6}/{self.steps} | val loss {loss:.4f} | ppl {math.exp(loss):.2f}"
            (self.bar.write if self.bar is not None else print)(msg)

    def sync(self) -> None:
        """Make the rows written so far durable (before a checkpoint that counts them)."""
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_bar()
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def require_tensorboard() -> type:
    """TensorBoard's SummaryWriter, or an error naming the extra to install (checked before a run
    starts, so a missing extra costs no data preparation and leaves no run directory)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional extra
    except ImportError:
        raise ImportError(
            "--train.tensorboard needs TensorBoard: pip install 'structlm[tensorboard]'"
        ) from None
    return SummaryWriter


def _tensorboard(out: Path):
    return require_tensorboard()(str(out / "tb"))


def plot_losses(metrics_path: Path, png: Path, train_flops_per_token: float) -> None:
    """loss.png: train and validation loss against tokens (training FLOPs on the top axis)."""
    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    fig = Figure(figsize=(7, 4.5))  # no pyplot: no global backend state in the user's process
    ax = fig.subplots()
    for split, style in (("train", "-"), ("val", "o-")):
        pts = [(r["tokens"], r["loss"]) for r in rows if r["split"] == split]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=split, ms=4)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    top = ax.secondary_xaxis(
        "top", functions=(lambda x: x * train_flops_per_token, lambda f: f / train_flops_per_token)
    )
    top.set_xlabel("training FLOPs")
    ax.set_title(str(png.parent.name), fontsize=10, loc="left")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
