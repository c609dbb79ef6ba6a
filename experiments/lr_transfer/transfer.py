"""muP's lr transfer: does the best learning rate stay put as the width grows?

    python experiments/lr_transfer/transfer.py SUMMARIES... --md transfer.md --plot transfer.png

Groups the runs by (structure, parametrisation, width) and reads the final validation loss at each
lr. A curve's optimum is the minimum of a parabola in log2(lr) through the best grid point and its
two neighbours (the grid point itself at an edge of the grid, marked as such); its shift is the
ratio to the previous width's optimum, in factors of 2 (0 = the lr transfers).
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from structlm.studies.scaling import collect, read_summary


def curves(rows: list[dict]) -> dict[tuple[str, str], dict[int, dict[float, float]]]:
    """(structure, parametrisation) -> width -> lr -> final validation loss."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        optim = read_summary(Path(r["summary_file"]))["config"]["optim"]
        scaling = optim.get("param_scaling", "standard")
        family = r["family"].removesuffix("+mup")
        out[family, scaling][r["d_model"]][float(optim["lr"])] = r["val_loss"]
    return out


def optimum(losses: dict[float, float]) -> tuple[float, bool]:
    """(the lr of the fitted minimum, whether it lies inside the grid)."""
    lrs = sorted(losses)
    i = min(range(len(lrs)), key=lambda k: losses[lrs[k]])
    if i in (0, len(lrs) - 1):
        return lrs[i], False
    x = np.log2(lrs[i - 1:i + 2])
    a, b, _ = np.polyfit(x, [losses[v] for v in lrs[i - 1:i + 2]], 2)
    return (2.0 ** float(-b / (2 * a)) if a > 0 else lrs[i]), True


def table(data: dict) -> list[str]:
    """One row per (structure, parametrisation, width): the loss at every lr (the best in bold),
    the fitted optimum, and its shift from the previous width's in factors of 2."""
    lrs = sorted({lr for by_w in data.values() for c in by_w.values() for lr in c})
    lines = ["| structure | param_scaling | width | " + " | ".join(f"lr {v:g}" for v in lrs)
             + " | best lr | shift (x2) |", "|---|---|---|" + "---|" * (len(lrs) + 2)]
    for (fam, scaling), by_w in sorted(data.items()):
        prev = None
        for w in sorted(by_w):
            c = by_w[w]
            cells = [("**%.3f**" if c.get(v) == min(c.values()) else "%.3f") % c[v]
                     if v in c else "" for v in lrs]
            lr, inside = optimum(c)
            shift = "" if prev is None else f"{math.log2(lr / prev):+.2f}"
            lines.append(f"| {fam} | {scaling} | {w} | " + " | ".join(cells)
                         + f" | {lr:.3g}{'' if inside else ' (edge)'} | {shift} |")
            prev = lr
    return lines


def plot(data: dict, path: str) -> None:
    fams = sorted({f for f, _ in data})
    fig = Figure(figsize=(9, 3.3 * len(fams)))
    axes = fig.subplots(len(fams), 2, squeeze=False, sharey="row")
    for i, fam in enumerate(fams):
        for j, scaling in enumerate(("standard", "mup")):
            ax = axes[i][j]
            for w, c in sorted(data.get((fam, scaling), {}).items()):
                lrs = sorted(c)
                line, = ax.plot(lrs, [c[v] for v in lrs], "o-", label=f"d={w}")
                lr, _ = optimum(c)
                ax.axvline(lr, color=line.get_color(), ls=":", lw=1)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{fam}, {scaling}", fontsize=10)
            ax.set_xlabel("peak lr")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[i][0].set_ylabel("final validation loss")
    fig.suptitle("lr transfer across width (dotted: each curve's fitted optimum)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+")
    p.add_argument("--md", default=None, help="write the table to this Markdown file")
    p.add_argument("--plot", default=None, help="draw the curves to this PNG")
    a = p.parse_args()
    data = curves(collect(a.paths))
    lines = table(data)
    print("\n".join(lines))
    if a.md:
        Path(a.md).write_text("\n".join(lines) + "\n")
    if a.plot:
        plot(data, a.plot)
        print(f"plot: {a.plot}")


if __name__ == "__main__":
    main()
