"""`structlm plan`: for a compute budget, which structure, model size and token count, from fitted
scaling laws (a user's sweep, or the paper's published points shipped in `paper_points.json`).

Per family (dense, lowrank-32%, ...; `scaling.family`), one of two laws, whichever the points
identify:

* Chinchilla form  L(N, D) = E + A N^-alpha + B D^-beta  (N total parameters, D training tokens),
  when the family has >= 5 runs whose tokens per parameter vary (log D/N spread >= 0.25). Fitted by
  profiling: on a grid of (alpha, beta) the loss is linear in (E, A, B) >= 0, solved exactly
  (non-negative least squares over the 7 supports), the best grid cell refined by zooming in.
  With C = k N D (k = the family's median C/(N D), ~6 plus attention), the best split of a budget is
  N* = G (C/k)^(beta/(alpha+beta)),  G = (alpha A / (beta B))^(1/(alpha+beta)),  D* = C/(k N*).
* Otherwise L(C) (`scaling.bootstrap`, power or saturating) with the family's own size rule read
  off its runs (log N and log D linear in log C): what a sweep with a fixed tokens-per-parameter
  ratio (the paper's ~20) can say. The model size and tokens are then that rule's, not optimised.

Every prediction carries a bootstrap interval (resampled runs, refitted). A budget more than
`max_extrapolation` times outside a family's fitted compute range is refused unless `extrapolate`.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import tyro

from structlm.studies.scaling import FITS, MIN_POINTS, bootstrap, predict

PAPER_POINTS = Path(__file__).with_name("paper_points.json")
MIN_CHINCHILLA = 5  # runs a 5-parameter law needs
MIN_SPREAD = 0.25  # std of log(D/N) below which N and D cannot be told apart
_GRID = np.geomspace(0.05, 2.0, 48)


@dataclass(frozen=True)
class PlanOptions:
    """What to plan for: a compute budget, a target loss or both, and how far a fit is trusted
    (`structlm plan`'s flags; a field's comment is its --help)."""

    flops: float | None = None  # compute budget (training FLOPs)
    # the validation loss to reach (with --flops: families that miss it are not recommended;
    # alone: the least compute per family)
    target_loss: float | None = None
    max_params: float | None = None  # a parameter limit (Chinchilla fits: the constrained optimum)
    # the L(C) form where a family's runs cannot separate N from D
    form: Literal["power", "saturating"] = "power"
    max_extrapolation: float = 10.0  # refuse budgets beyond this factor of a family's fitted range
    extrapolate: bool = False  # predict beyond it anyway
    # bootstrap resamples (0: no intervals)
    n_boot: Annotated[int, tyro.conf.arg(name="bootstrap")] = 300
    seed: int = 0  # the bootstrap's random seed

    def __post_init__(self) -> None:
        for name in ("flops", "target_loss", "max_params"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"--{name} {v:g} is not a positive number")
        if not self.max_extrapolation > 0:  # inf: never refuse
            raise ValueError(f"--max_extrapolation {self.max_extrapolation:g} is not a positive "
                             "number")
        if self.form not in FITS:
            raise ValueError(f"--form {self.form!r}: choose one of {sorted(FITS)}")
        if self.n_boot < 0:
            raise ValueError(f"--bootstrap {self.n_boot} must be >= 0")


def paper_rows() -> list[dict]:
    """The paper's published points (Table 1 and the LowRank scaling figure) as scaling rows."""
    data = json.loads(PAPER_POINTS.read_text())
    return [dict(r, source=data["source"]) for r in data["points"]]


# --- the Chinchilla form --------------------------------------------------------------------------


_SUPPORTS = [c for k in (1, 2, 3) for c in itertools.combinations(range(3), k)]


def _nnls3(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """min ||X c - y|| over c >= 0 for a batch of 3-column designs X (G, n, 3): every support
    solved by its (column-scaled) normal equations, the best feasible one -> c (G, 3), sse (G,)."""
    scale = np.linalg.norm(X, axis=1, keepdims=True)  # (G, 1, 3)
    Xs = X / scale
    best_c, best_sse = np.zeros(X.shape[0::2]), np.full(X.shape[0], float(y @ y))
    for cols in _SUPPORTS:
        A = Xs[:, :, cols]  # (G, n, k)
        c = np.linalg.solve(A.transpose(0, 2, 1) @ A, (A.transpose(0, 2, 1) @ y)[..., None])
        sse = np.sum(((A @ c)[..., 0] - y) ** 2, 1)
        ok = np.all(c[..., 0] >= 0, 1) & (sse < best_sse)
        best_sse = np.where(ok, sse, best_sse)
        full = np.zeros(best_c.shape)
        full[:, cols] = c[..., 0] / scale[:, 0, cols]
        best_c = np.where(ok[:, None], full, best_c)
    return best_c, best_sse


def _profile_grid(n: np.ndarray, d: np.ndarray, y: np.ndarray, alphas, betas) -> tuple:
    """The best (sse, alpha, beta, (E, A, B)) over the grid alphas x betas."""
    a, b = (g.ravel() for g in np.meshgrid(alphas, betas, indexing="ij"))  # (G,)
    X = np.stack([np.ones((len(a), len(n))), n[None, :] ** -a[:, None],
                  d[None, :] ** -b[:, None]], 2)  # (G, runs, 3)
    c, sse = _nnls3(X, y)
    i = int(np.argmin(sse))
    return float(sse[i]), float(a[i]), float(b[i]), c[i]


def fit_chinchilla(n, d, y) -> dict:
    """L = E + A N^-alpha + B D^-beta by profiled least squares (module docstring). N and D are
    scaled by 1e9 inside, so A and B are per billion; the returned A, B are for raw N, D."""
    n, d, y = (np.asarray(v, dtype=float) for v in (n, d, y))
    ns, ds = n / 1e9, d / 1e9
    sse, a, b, (E, A, B) = _profile_grid(ns, ds, y, _GRID, _GRID)
    step = _GRID[1] / _GRID[0]
    for _ in range(3):  # zoom in on the best cell: 8x finer each time
        zoom = np.geomspace(1 / step, step, 17)
        sse, a, b, (E, A, B) = _profile_grid(ns, ds, y, a * zoom, b * zoom)
        step = step ** (1 / 8)
    return {"form": "chinchilla", "E": float(E), "A": float(A * 1e9 ** a), "alpha": float(a),
            "B": float(B * 1e9 ** b), "beta": float(b), "rmse": math.sqrt(sse / len(y))}


def chinchilla_loss(fit: dict, n, d):
    return fit["E"] + fit["A"] * np.asarray(n, float) ** -fit["alpha"] + fit["B"] * np.asarray(
        d, float) ** -fit["beta"]


def chinchilla_optimum(fit: dict, flops: float, k: float, max_params: float | None = None):
    """(N*, D*) minimising L at C = k N D, N* clipped to max_params (the loss is unimodal in
    log N, so the constrained optimum is the clip)."""
    a, b = fit["alpha"], fit["beta"]
    if fit["A"] == 0 or fit["B"] == 0:  # a term vanished: all compute to the other side's floor
        n = max_params or (flops / k) ** 0.5
    else:
        g = (a * fit["A"] / (b * fit["B"])) ** (1 / (a + b))
        n = g * (flops / k) ** (b / (a + b))
    if max_params is not None:
        n = min(n, max_params)
    return n, flops / (k * n)


# --- one family -----------------------------------------------------------------------------------


def _identifies_nd(rows: list[dict]) -> bool:
    ratio = np.log([r["tokens"] / r["params"] for r in rows])
    return len(rows) >= MIN_CHINCHILLA and float(np.std(ratio)) >= MIN_SPREAD


def _resamples(rows: list[dict], o: PlanOptions, need: int):
    rng = np.random.default_rng(o.seed)
    for _ in range(o.n_boot):
        pick = [rows[i] for i in rng.integers(0, len(rows), len(rows))]
        if len({r["train_flops"] for r in pick}) >= need:
            yield pick


def _interval(values: list[float]) -> tuple[float, float]:
    v = [x for x in values if math.isfinite(x)]
    return tuple(float(p) for p in np.percentile(v, [5, 95])) if len(v) > 1 else (math.nan,) * 2


def _plan_chinchilla(rows: list[dict], flops: float, o: PlanOptions) -> dict:
    k = float(np.median([r["train_flops"] / (r["params"] * r["tokens"]) for r in rows]))

    def at(pts):
        fit = fit_chinchilla(*zip(*[(r["params"], r["tokens"], r["val_loss"]) for r in pts],
                                 strict=True))
        n, d = chinchilla_optimum(fit, flops, k, o.max_params)
        return fit, n, d, float(chinchilla_loss(fit, n, d))

    fit, n, d, loss = at(rows)
    boot = [at(p)[3] for p in _resamples(rows, o, MIN_CHINCHILLA)]
    return {"law": "L(N,D)", "fit": fit, "params": n, "tokens": d, "loss": loss,
            "loss_ci": _interval(boot), "flops_per_param_token": k}


def _size_rule(rows: list[dict], flops: float) -> tuple[float, float]:
    """N and D at `flops` by the family's own rule: log N, log D linear in log C."""
    lc = np.log([r["train_flops"] for r in rows])
    out = []
    for key in ("params", "tokens"):
        slope, icpt = np.polyfit(lc, np.log([r[key] for r in rows]), 1)
        out.append(float(np.exp(icpt + slope * math.log(flops))))
    return out[0], out[1]


def _plan_lc(rows: list[dict], flops: float, o: PlanOptions) -> dict:
    fit = bootstrap([r["train_flops"] for r in rows], [r["val_loss"] for r in rows], o.form,
                    n=o.n_boot, seed=o.seed)
    n, d = _size_rule(rows, flops)
    plan = {"law": f"L(C) {o.form}", "fit": {k: v for k, v in fit.items() if k != "b_samples"},
            "params": n, "tokens": d, "loss": float(predict(fit, flops))}
    boot = []
    for pts in _resamples(rows, o, MIN_POINTS[o.form]):
        try:
            refit = FITS[o.form]([r["train_flops"] for r in pts], [r["val_loss"] for r in pts])
        except (ValueError, np.linalg.LinAlgError):
            continue
        boot.append(float(predict(refit, flops)))
    exact = len({r["train_flops"] for r in rows}) <= MIN_POINTS[o.form]
    # as many points as the law has parameters: the fit passes through every one, and every
    # resample refits the same curve; an interval of zero width would be false certainty
    plan["loss_ci"] = (math.nan, math.nan) if exact else _interval(boot)
    if o.max_params is not None and n > o.max_params:
        plan["infeasible"] = f"its size rule gives {n:.3g} params > --max_params {o.max_params:.3g}"
    return plan


def _loss_at(rows: list[dict], flops: float, o: PlanOptions) -> float:
    quick = PlanOptions(**{**vars(o), "n_boot": 0})
    law = _plan_chinchilla if _identifies_nd(rows) else _plan_lc
    return law(rows, flops, quick)["loss"]


def min_flops(rows: list[dict], target: float, o: PlanOptions) -> float:
    """The least compute at which the family's law reaches `target` (bisection in log C over
    1e-3..1e3 times its fitted range; the optimal loss falls with C); nan if it never does."""
    fl = [r["train_flops"] for r in rows]
    lo, hi = math.log(min(fl) / 1e3), math.log(max(fl) * 1e3)
    if _loss_at(rows, math.exp(hi), o) > target:
        return math.nan
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _loss_at(rows, math.exp(mid), o) > target else (lo, mid)
    return math.exp(hi)


def plan_family(name: str, rows: list[dict], flops: float, o: PlanOptions) -> dict:
    """The family's prediction at `flops` (or why there is none)."""
    fl = [r["train_flops"] for r in rows]
    head = {"family": name, "runs": len(rows), "flops": flops, "fitted_flops": (min(fl), max(fl))}
    if len(set(fl)) < MIN_POINTS[o.form]:
        return head | {"skipped": f"{len(set(fl))} distinct budget(s); a fit needs "
                                  f"{MIN_POINTS[o.form]}"}
    outside = max(flops / max(fl), min(fl) / flops)
    if outside > o.max_extrapolation and not o.extrapolate:
        return head | {"refused": f"{flops:.3g} FLOPs is {outside:.3g}x outside the fitted "
                                  f"{min(fl):.3g}..{max(fl):.3g} (limit "
                                  f"{o.max_extrapolation:g}x); pass --extrapolate to predict"}
    law = _plan_chinchilla if _identifies_nd(rows) else _plan_lc
    return head | law(rows, flops, o)


def plan(rows: list[dict], o: PlanOptions) -> dict:
    """Every family's plan, best first; with only a target loss, each family at the least compute
    that reaches it, cheapest first. Keys: plans, recommendation, runners_up."""
    if o.flops is None and o.target_loss is None:
        raise ValueError("plan needs a budget (--flops 1e20) or a target (--target_loss 3.0)")
    fams: dict[str, list[dict]] = {}
    for r in rows:
        fams.setdefault(r["family"], []).append(r)
    plans = []
    for name, rs in sorted(fams.items()):
        flops, distinct = o.flops, len({r["train_flops"] for r in rs})
        if flops is None and distinct >= MIN_POINTS[o.form]:
            flops = min_flops(rs, o.target_loss, o)
            if not math.isfinite(flops):
                plans.append({"family": name, "runs": len(rs), "skipped":
                              f"never reaches loss {o.target_loss} within 1000x its range"})
                continue
        p = plan_family(name, rs, flops or 1.0, o)
        if "loss" in p and o.target_loss is not None:
            p["meets_target"] = p["loss"] <= o.target_loss + 1e-9
        plans.append(p)
    ok = [p for p in plans if "loss" in p and "infeasible" not in p
          and p.get("meets_target", True)]
    ok.sort(key=lambda p: p["flops"] if o.flops is None else p["loss"])
    rest = [p for p in plans if p not in ok]
    return {"plans": ok + rest, "recommendation": ok[0] if ok else None, "runners_up": ok[1:3]}


def format_budget_plan(result: dict) -> str:
    lines = [f"{'family':>14} {'law':>16} {'FLOPs':>9} {'params':>9} {'tokens':>9} "
             f"{'tok/param':>9} {'loss':>7} {'90% interval':>17} {'ppl':>8}"]
    for p in result["plans"]:
        if "loss" not in p:
            lines.append(f"{p['family']:>14}  {p.get('skipped') or p.get('refused')}")
            continue
        lo, hi = p["loss_ci"]
        ci = f"[{lo:.4f}, {hi:.4f}]" if math.isfinite(lo) else "none (too few runs)"
        lines.append(
            f"{p['family']:>14} {p['law']:>16} {p['flops']:>9.3g} {p['params']:>9.3g} "
            f"{p['tokens']:>9.3g} {p['tokens'] / p['params']:>9.1f} {p['loss']:>7.4f} "
            f"{ci:>17} {math.exp(p['loss']):>8.2f}"
            + (f"  ({p['infeasible']})" if "infeasible" in p else "")
            + ("  (misses the target)" if p.get("meets_target") is False else ""))
    best = result["recommendation"]
    if best is None:
        lines.append("no family can be recommended under these constraints")
    else:
        lines.append(f"recommended: {best['family']}, {best['params']:.3g} params on "
                     f"{best['tokens']:.3g} tokens ({best['flops']:.3g} FLOPs): predicted loss "
                     f"{best['loss']:.4f} (ppl {math.exp(best['loss']):.2f})")
        for r in result["runners_up"]:
            lines.append(f"runner-up:   {r['family']}, {r['params']:.3g} params on "
                         f"{r['tokens']:.3g} tokens: loss {r['loss']:.4f}")
    return "\n".join(lines)
