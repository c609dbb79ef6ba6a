"""The question of the Chinchilla-regime study: does the structured-minus-dense loss gap shrink as
the model grows, and by how much per doubling of the non-embedding parameters?

    python experiments/chinchilla_study/gap.py SUMMARIES... --md gap.md --plot gap.png

For every structured family and size: gap = its final validation loss minus the dense model's of
the same size (seeds averaged; a "+mup" family against dense+mup where that size has it). Per
family, gap = a + b * log2(N) by least squares over the sizes (N = the dense model's
non-embedding parameters); b is the change per doubling, with a 90%
t-interval (n - 2 degrees of freedom). The seed spread of the gap, where a size has two seeds, is
reported beside it: a slope smaller than that is not a finding.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from structlm.studies.scaling import collect

T90 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943}  # two-sided 90%, by dof


def gaps(rows: list[dict]) -> dict[str, list[tuple[float, float, list[float]]]]:
    """family -> [(N dense, mean gap, per-seed gaps)] over the sizes that have a dense run."""
    by = defaultdict(list)  # (size, family) -> losses of its seeds
    for r in rows:
        by[(r["n_layer"], r["d_model"]), r["family"]].append(r)
    out = defaultdict(list)
    for (size, fam), runs in sorted(by.items()):
        if fam.startswith("dense"):
            continue
        # the dense model of the same parametrisation (muP families: dense+mup) where it ran
        dense = by.get((size, "dense+mup")) if fam.endswith("+mup") else None
        dense = dense or by.get((size, "dense"))
        if not dense:
            continue
        dl = np.mean([r["val_loss"] for r in dense])
        per_seed = [r["val_loss"] - dl for r in runs]
        out[fam].append((float(dense[0]["non_embedding"]), float(np.mean(per_seed)), per_seed))
    return dict(out)


def slope(points: list[tuple[float, float, list[float]]]) -> dict:
    x = np.log2([p[0] for p in points])
    y = np.array([p[1] for p in points])
    n = len(x)
    if n < 2:
        return {"n": n}
    b, a = np.polyfit(x, y, 1)
    fit = {"n": n, "per_doubling": float(b), "intercept": float(a)}
    if n > 2:
        resid = y - (a + b * x)
        se = math.sqrt(float(resid @ resid) / (n - 2) / float(((x - x.mean()) ** 2).sum()))
        t = T90.get(n - 2, 1.645)
        fit["ci90"] = (float(b - t * se), float(b + t * se))
    spreads = [max(s) - min(s) for _, _, s in points if len(s) > 1]
    if spreads:
        fit["seed_spread"] = float(max(spreads))
    return fit


def verdict(fam: str, f: dict) -> str:
    if "ci90" not in f:
        return f"{fam}: {f['n']} size(s), no interval yet"
    lo, hi = f["ci90"]
    trend = ("shrinks" if hi < 0 else "grows" if lo > 0 else "shows no clear trend")
    return (f"{fam}: the gap {trend} ({f['per_doubling']:+.4f} nats per doubling, 90% CI "
            f"[{lo:+.4f}, {hi:+.4f}], {f['n']} sizes"
            + (f"; seed spread {f['seed_spread']:.4f}" if "seed_spread" in f else "") + ")")


def markdown(g: dict, fits: dict) -> str:
    lines = ["| family | non-embedding params (dense) | gap to dense (nats) | seeds |",
             "|---|---|---|---|"]
    for fam, pts in g.items():
        for n, gap, seeds in pts:
            lines.append(f"| {fam} | {n:,.0f} | {gap:+.4f} | {len(seeds)} |")
    return "\n".join(lines + [""] + [f"- {verdict(f, fits[f])}" for f in fits]) + "\n"


def plot(g: dict, fits: dict, png: str) -> None:
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for fam, pts in g.items():
        x = np.array([p[0] for p in pts])
        line = ax.plot(x, [p[1] for p in pts], "o", label=fam)[0]
        f = fits[fam]
        if "per_doubling" in f:
            xs = np.geomspace(x.min(), x.max(), 50)
            ax.plot(xs, f["intercept"] + f["per_doubling"] * np.log2(xs), "-",
                    color=line.get_color())
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters of the dense model")
    ax.set_ylabel("validation loss minus dense (nats)")
    ax.set_title("structured-minus-dense gap, ~20 tokens per parameter")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="summaries or run directories")
    p.add_argument("--md", default=None)
    p.add_argument("--plot", default=None)
    ns = p.parse_args()
    g = gaps(collect(ns.runs))
    fits = {fam: slope(pts) for fam, pts in g.items()}
    text = markdown(g, fits)
    print(text)
    if ns.md:
        Path(ns.md).write_text(text)
    if ns.plot:
        plot(g, fits, ns.plot)


if __name__ == "__main__":
    main()
