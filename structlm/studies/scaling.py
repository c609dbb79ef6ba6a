"""Scaling laws from finished runs: collect summaries, fit loss curves, bootstrap the exponents.

Every run directory holds `summary.json` (written by `train.train` when the run finishes). This
module reads them into flat rows, groups the rows by *family* (dense, lowrank-32%, ... with +sgt
and a gqa- prefix; see `family`), and fits validation loss L against a size axis x (training
FLOPs by default; also tokens, total params or non-embedding params) with two forms:

* power:       L = A * x^(-b)          least squares on log L = log A - b log x (closed form).
* saturating:  L = E + A * x^(-b)      with 0 <= E < min(L); E is the irreducible loss.
  For a fixed E, log(L - E) = log A - b log x is again linear, so we *profile* over E: the
  linear-space squared error of that log fit is evaluated on a dense grid of E in [0, min L),
  refined by golden-section search in the best bracket, and finished with a few projected
  Levenberg-Marquardt steps on (E, log A, b) that minimise the linear-space error directly.
Internally log x is centred on its mean (log x ~ 30 for FLOPs), which keeps the fits well
conditioned; A is reported for the uncentred form above.

Uncertainty comes from a nonparametric bootstrap: the (x, L) points of a family are resampled
with replacement, each resample is refitted (resamples with too few distinct x are skipped), and
percentile intervals of every parameter are reported. Two families are compared by pairing their
independent bootstrap samples of b by index: P(b_a > b_b) is the share of pairs where a's
exponent is larger (ties count half), so a steeper (faster improving) family has P near 1.

numpy only; matplotlib is imported inside `plot`.
"""

from __future__ import annotations

import glob
import json
import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

from structlm.config import LinearSpec, ModelConfig, from_dict
from structlm.model.flops import ffn_layer_params

X_KEYS = ("train_flops", "tokens", "params", "non_embedding", "ffn_params")  # valid x axes
FORMS = ("power", "saturating")
MIN_POINTS = {"power": 2, "saturating": 3}  # distinct x values each form needs
PARAMS = {"power": ("A", "b"), "saturating": ("E", "A", "b")}
NOMINAL = (63, 32)  # FFN parameter shares (%) the paper names its structured models by


# --- runs -> rows ---------------------------------------------------------------------------------


def family(summary: dict) -> str:
    """The run's family label: "dense", "lowrank-32%" (structured FFN matrix params of one
    structured block as a ceil'd percentage of the dense block's, snapped to the paper's 63% or
    32% when within 3 points), "+sgt" when self-guided, "+mup" under param_scaling=mup, and a
    "gqa-" prefix when n_kv_head < n_head."""
    config = summary["config"]
    cfg = from_dict(ModelConfig, config["model"])
    structured = [i for i in range(cfg.n_layer) if i not in cfg.dense_ffn_layers]
    if cfg.ffn.kind == "dense" or not structured:
        label = "dense"
    else:
        layer = structured[0]
        s = ffn_layer_params(cfg, layer, bias=False)
        d = ffn_layer_params(replace(cfg, ffn=LinearSpec()), layer, bias=False)
        pct = -(-100 * s // d)  # integer ceil: 31.25 -> 32, 62.5 -> 63
        # the paper's nominal levels: its rank/block rules land within a few points of them
        # (BlockDense 32% is 29-31% at B=2 or 4), and one size's rounding must not split a family
        pct = next((n for n in NOMINAL if abs(pct - n) <= 3), pct)
        label = f"{cfg.ffn.kind}-{pct}%"
    if config.get("train", {}).get("sgt", {}).get("mode", "off") != "off":
        label += "+sgt"
    if config.get("optim", {}).get("param_scaling", "standard") == "mup":
        label += "+mup"
    if cfg.n_kv_head is not None and cfg.n_kv_head < cfg.n_head:
        label = "gqa-" + label
    return label


def _summary_files(p: str) -> list[Path]:
    """The summary files one user path names: a file, a run dir, a parent dir, or a glob."""
    if any(c in p for c in "*?["):
        matches = sorted(glob.glob(p, recursive=True))
        return [f for m in matches for f in _summary_files(m)]
    path = Path(p)
    if path.is_file():
        return [path]
    if path.is_dir():
        # run_dir/summary.json, and <name>.summary.json copies kept side by side (docs/)
        return sorted({*path.rglob("summary.json"), *path.rglob("*.summary.json")})
    raise FileNotFoundError(f"scaling: {p} does not exist (give run directories or summary.json)")


def _run_name(f: Path) -> tuple[str, Path]:
    """(run name, dedup key): the directory for run_dir/summary.json, else the file itself
    (docs keep several `<name>.summary.json` side by side)."""
    if f.name == "summary.json":
        return f.parent.name, f.parent.resolve()
    return f.name.removesuffix(".json").removesuffix(".summary"), f.resolve()


def read_summary(f: Path) -> dict:
    """A run's summary.json; a damaged one is refused by name with the fix."""
    try:
        s = json.loads(Path(f).read_text())
        s["config"]["model"], s["param_groups"], s["final_val_loss"]  # noqa: B018 (must exist)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(
            f"{f} is damaged or not a structlm summary ({type(e).__name__}: {e}); rerun the run's "
            "training command to rewrite it (a finished run only redoes its final evaluation)"
        ) from None
    return s


def collect(paths: Iterable[str]) -> list[dict]:
    """Flat rows, one per run, sorted by (family, train_flops); duplicates (the same run reached
    through two paths) are kept once."""
    paths = [str(p) for p in paths]
    rows: dict[Path, dict] = {}
    for f in (f for p in paths for f in _summary_files(p)):
        run, key = _run_name(f)
        if key in rows:
            continue
        s = read_summary(f)
        m, g = s["config"]["model"], s["param_groups"]
        rows[key] = {
            "run": run,
            "run_dir": str(f.parent if f.name == "summary.json" else f),
            "summary_file": str(f),
            "family": family(s),
            "train_flops": float(s["train_flops"]),
            "tokens": float(s["tokens"]),
            "params": int(g["total"]),
            "non_embedding": int(g["non_embedding"]),
            "ffn_params": int(g["ffn"]),
            "val_loss": float(s["final_val_loss"]),
            "val_ppl": float(s["final_val_ppl"]),
            "d_model": int(m["d_model"]),
            "n_layer": int(m["n_layer"]),
        }
    if not rows:
        raise FileNotFoundError(
            f"scaling: no summary.json found under {paths}; each run writes "
            "<out_dir>/summary.json when it finishes, so point at finished run directories "
            "(or a directory/glob holding them)"
        )
    names = [r["run"] for r in rows.values()]
    for r in rows.values():  # runs of the same name from different sweeps: name them by parent
        if names.count(r["run"]) > 1:
            r["run"] = f"{Path(r['run_dir']).parent.name}/{r['run']}"
    return sorted(rows.values(), key=lambda r: (r["family"], r["train_flops"]))


# --- fits -----------------------------------------------------------------------------------------


def _check(x: Sequence[float], y: Sequence[float], form: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(
            f"{form} fit: x and y must be 1-D of equal length, got {x.shape} and {y.shape}"
        )
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0) and np.all(y > 0)):
        raise ValueError(f"{form} fit: x and y must be finite and positive")
    need, have = MIN_POINTS[form], len(np.unique(x))
    if have < need:
        raise ValueError(
            f"{form} fit needs at least {need} distinct x values, got {have}; "
            "run more sizes/budgets in this family"
        )
    return x, y


def _line(u: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares z = c - b*u along the last axis (u: (n,), z: (..., n)) -> (c, b)."""
    du = u - u.mean()
    b = -(z * du).sum(-1) / (du * du).sum()
    c = z.mean(-1) + b * u.mean()
    return c, b


def fit_power(x: Sequence[float], y: Sequence[float]) -> dict:
    """L = A * x^(-b) by least squares in log space; rmse is of L in linear space."""
    x, y = _check(x, y, "power")
    m = np.log(x).mean()
    u = np.log(x) - m  # centred log x, (n,)
    c, b = _line(u, np.log(y))
    pred = np.exp(c - b * u)
    return {
        "form": "power",
        "A": float(np.exp(c + b * m)),
        "b": float(b),
        "rmse": float(np.sqrt(np.mean((y - pred) ** 2))),
    }


def _profile(E: np.ndarray, u: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """For each E (shape (k,)): the log-space fit of y - E and its linear-space SSE."""
    z = np.log(y[None, :] - E[:, None])  # (k, n)
    c, b = _line(u, z)
    with np.errstate(over="ignore", invalid="ignore"):
        sse = ((y[None, :] - E[:, None] - np.exp(c[:, None] - b[:, None] * u)) ** 2).sum(-1)
    return np.where(np.isfinite(sse), sse, np.inf), c, b


def _golden(f, lo: float, hi: float, iters: int = 80) -> float:
    """Minimise a scalar function on [lo, hi] by golden-section search."""
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return c if fc <= fd else d


def _lm(theta: np.ndarray, u: np.ndarray, y: np.ndarray, e_max: float, iters: int = 50):
    """Projected Levenberg-Marquardt on theta = (E, c, b), L = E + exp(c - b*u), E in [0, e_max]."""

    def sse(t: np.ndarray) -> float:
        with np.errstate(over="ignore", invalid="ignore"):
            r = y - t[0] - np.exp(t[1] - t[2] * u)
        s = float(r @ r)
        return s if math.isfinite(s) else math.inf

    cur, lam = sse(theta), 1e-3
    for _ in range(iters):
        p = np.exp(theta[1] - theta[2] * u)
        r = y - theta[0] - p
        J = np.stack([-np.ones_like(u), -p, u * p], axis=1)  # dr/dtheta, (n, 3)
        JtJ = J.T @ J
        step = np.linalg.solve(JtJ + lam * np.diag(np.diag(JtJ) + 1e-30), -J.T @ r)
        new = theta + step
        new[0] = min(max(new[0], 0.0), e_max)
        s = sse(new)
        if s < cur:
            done = cur - s <= 1e-15 * max(cur, 1e-300)
            theta, cur, lam = new, s, lam / 3
            if done:
                break
        else:
            lam *= 4
            if lam > 1e12:
                break
    return theta, cur


def fit_saturating(x: Sequence[float], y: Sequence[float]) -> dict:
    """L = E + A * x^(-b), 0 <= E < min(L): profile over E (grid + golden section), then LM."""
    x, y = _check(x, y, "saturating")
    m = np.log(x).mean()
    u = np.log(x) - m  # centred log x, (n,)
    ymin = float(y.min())
    e_max = ymin * (1 - 1e-12)
    # grid: uniform in [0, ymin) plus geometric gaps ymin - E from ymin down to 1e-9 * ymin
    grid = np.unique(np.concatenate([
        np.linspace(0.0, ymin, 200, endpoint=False),
        ymin - ymin * np.geomspace(1e-9, 1.0, 200),
    ]))
    grid = grid[(grid >= 0) & (grid <= e_max)]
    sse, _, _ = _profile(grid, u, y)
    i = int(np.argmin(sse))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    E = _golden(lambda e: float(_profile(np.array([e]), u, y)[0][0]), lo, hi)
    cands = [(float(sse[i]), float(grid[i])), (float(_profile(np.array([E]), u, y)[0][0]), E)]
    E = min(cands)[1]
    _, c, b = _profile(np.array([E]), u, y)
    theta, cur = _lm(np.array([E, c[0], b[0]]), u, y, e_max)
    E, c, b = (float(t) for t in theta)
    return {
        "form": "saturating",
        "E": E,
        "A": float(np.exp(c + b * m)),
        "b": b,
        "rmse": float(np.sqrt(cur / len(y))),
    }


FITS = {"power": fit_power, "saturating": fit_saturating}


def bootstrap(
    x: Sequence[float], y: Sequence[float], form: str, n: int = 1000, seed: int | Sequence[int] = 0,
    level: float = 0.9,
) -> dict:
    """The point fit plus percentile CIs of every parameter from `n` resamples of the points.

    Keys: the fit's (form, A, b, [E], rmse), `<param>_ci` = (lo, hi) at `level`, `b_samples` (the
    kept bootstrap exponents, a list) and `n_boot` (how many resamples were kept)."""
    if form not in FITS:
        raise ValueError(f"unknown form {form!r}; choose from {list(FITS)}")
    fit = FITS[form]
    out = fit(x, y)
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in PARAMS[form]}
    for _ in range(n):
        idx = rng.integers(0, len(x), len(x))
        if len(np.unique(x[idx])) < MIN_POINTS[form]:
            continue
        try:
            f = fit(x[idx], y[idx])
        except (ValueError, np.linalg.LinAlgError):
            continue
        for k in samples:
            samples[k].append(f[k])
    q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    if len(np.unique(np.round(samples["b"], 12))) < 2:
        # every resample is the same point set (e.g. 3 points for 3 parameters: an exact fit), so
        # the bootstrap says nothing about uncertainty; report no interval rather than a zero-width
        # one
        samples = {k: [] for k in samples}
        out["note"] = (f"no interval: {len(np.unique(x))} points leave no freedom for the "
                       f"{len(PARAMS[form])}-parameter {form} form; add sizes")
    for k, v in samples.items():
        out[f"{k}_ci"] = tuple(float(p) for p in np.percentile(v, q)) if v else (math.nan,) * 2
    out["b_samples"] = samples["b"]
    out["n_boot"] = len(samples["b"])
    return out


def fit_families(
    rows: list[dict], x: str = "train_flops", forms: Sequence[str] = FORMS, n_boot: int = 1000,
    seed: int = 0,
) -> list[dict]:
    """One entry per (family, form): family, form, x, n_points and the `bootstrap` keys; a
    family/form with too few distinct x gets an entry with a `note` instead of parameters."""
    if x not in X_KEYS:
        raise ValueError(f"unknown x axis {x!r}; choose from {list(X_KEYS)}")
    fits = []
    for fam in sorted({r["family"] for r in rows}):
        pts = [(r[x], r["val_loss"]) for r in rows if r["family"] == fam]
        pts = [(a, b) for a, b in pts if math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0]
        xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
        distinct = len(np.unique(xs))
        for form in forms:
            head = {"family": fam, "form": form, "x": x, "n_points": len(pts)}
            if distinct < MIN_POINTS[form]:
                head["note"] = (
                    f"skipped: {form} needs {MIN_POINTS[form]} distinct {x} values, has {distinct}"
                )
                fits.append(head)
                continue
            fam_seed = [seed, zlib.crc32(f"{fam}/{form}".encode())]  # independent per family
            fits.append(head | bootstrap(xs, ys, form, n=n_boot, seed=fam_seed))
    return fits


def compare_steepness(fits: list[dict]) -> list[dict]:
    """For every pair of fitted families with the same form and x: P(b_a > b_b) from the bootstrap
    samples paired by index, the point difference b_a - b_b, and a verdict (clear at P >= 0.9 or
    P <= 0.1)."""
    ok = [f for f in fits if "b" in f]
    out = []
    for i, fa in enumerate(ok):
        for fb in ok[i + 1:]:
            if (fa["form"], fa["x"]) != (fb["form"], fb["x"]) or fa["family"] == fb["family"]:
                continue
            k = min(len(fa.get("b_samples", [])), len(fb.get("b_samples", [])))
            if k:
                sa, sb = np.asarray(fa["b_samples"][:k]), np.asarray(fb["b_samples"][:k])
                p = float(np.mean(sa > sb) + 0.5 * np.mean(sa == sb))
            else:
                p = math.nan
            a, b = fa["family"], fb["family"]
            if math.isnan(p):
                verdict = "undetermined (no bootstrap interval for one of them)"
            elif p >= 0.9:
                verdict = f"{a} steeper than {b} (P={p:.2f})"
            elif p <= 0.1:
                verdict = f"{b} steeper than {a} (P={1 - p:.2f})"
            else:
                verdict = f"no clear difference (P={p:.2f})"
            out.append({
                "family_a": a, "family_b": b, "form": fa["form"], "x": fa["x"],
                "b_a": fa["b"], "b_b": fb["b"], "db": fa["b"] - fb["b"], "p_a_steeper": p,
                "verdict": verdict,
            })
    return out


# --- output ---------------------------------------------------------------------------------------


def predict(fit: dict, x: np.ndarray) -> np.ndarray:
    """The fitted loss at x."""
    x = np.asarray(x, dtype=float)
    return fit.get("E", 0.0) + fit["A"] * x ** (-fit["b"])


def plot(rows: list[dict], fits: list[dict], png: str, x: str = "train_flops") -> None:
    """Loss vs x on log-log axes: points and fitted curves (power solid, saturating dashed) per
    family, the legend giving b and its CI."""
    fams = sorted({r["family"] for r in rows})
    colours = matplotlib.colormaps["tab10"]
    fig = Figure(figsize=(7, 4.5))  # no pyplot: no global backend state in the user's process
    ax = fig.subplots()
    for i, fam in enumerate(fams):
        col = colours(i % 10)
        xs = np.array([r[x] for r in rows if r["family"] == fam], dtype=float)
        ys = np.array([r["val_loss"] for r in rows if r["family"] == fam], dtype=float)
        ax.scatter(xs, ys, color=col, s=22, zorder=3, label=f"{fam} ({len(xs)} runs)")
        grid = np.geomspace(xs.min(), xs.max(), 100)
        for f in fits:
            if f["family"] != fam or f["x"] != x or "b" not in f:
                continue
            lo, hi = f.get("b_ci", (math.nan, math.nan))
            ax.plot(
                grid, predict(f, grid), color=col, ls="-" if f["form"] == "power" else "--",
                label=f"  {f['form']}: b={f['b']:.3f} "
                + ("(no CI)" if math.isnan(lo) else f"[{lo:.3f}, {hi:.3f}]"),
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis(FormatStrFormatter("%.3g"))  # losses span a narrow range: plain numbers, not 10^x
    ax.set_xlabel(x)
    ax.set_ylabel("final validation loss")
    ax.set_title(f"Validation loss vs {x} (power: solid, saturating: dashed)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def _g(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def format_table(fits: list[dict], comparisons: list[dict]) -> str:
    """The fits and comparisons as aligned text."""
    width = max([len(f["family"]) for f in fits] + [6])
    lines = [
        f"{'family':<{width}}  {'form':<10}  {'n':>3}  {'A':>10}  {'b [CI]':<26}  {'E':>7}  "
        f"{'rmse':>8}"
    ]
    for f in fits:
        head = f"{f['family']:<{width}}  {f['form']:<10}  {f['n_points']:>3}"
        if "b" not in f:
            lines.append(f"{head}  {f['note']}")
            continue
        lo, hi = f["b_ci"]
        b = f"{f['b']:.4f} [{_g(lo)}, {_g(hi)}]"
        lines.append(
            f"{head}  {_g(f['A']):>10}  {b:<26}  {_g(f.get('E')):>7}  {_g(f['rmse']):>8}"
            + (f"  ({f['note']})" if "note" in f else "")
        )
    if comparisons:
        lines.append("")
        lines.append("steepness (P = P(b_a > b_b) over paired bootstrap samples):")
        for c in comparisons:
            lines.append(
                f"  {c['form']:<10}  {c['family_a']} vs {c['family_b']}: "
                f"db={c['db']:+.4f}  {c['verdict']}"
            )
    return "\n".join(lines)


def _jsonable(v: Any) -> Any:
    """NaN -> None, tuples -> lists, numpy scalars -> floats (strict JSON)."""
    if isinstance(v, dict):
        return {k: _jsonable(w) for k, w in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(w) for w in v]
    if isinstance(v, float | np.floating):
        return float(v) if math.isfinite(v) else None
    return v


def report_fits(
    paths: Iterable[str], *, x: str = "train_flops", forms: Sequence[str] = FORMS,
    n_boot: int = 1000, seed: int = 0, json_path: str | None = None, png: str | None = None,
) -> dict:
    """collect + fit_families + compare_steepness; prints the table, optionally writes JSON
    (without the bootstrap samples) and a plot. Returns {"rows", "fits", "comparisons"}."""
    rows = collect(paths)
    fits = fit_families(rows, x=x, forms=forms, n_boot=n_boot, seed=seed)
    comparisons = compare_steepness(fits)
    print(f"{len(rows)} runs, {len({r['family'] for r in rows})} families, x = {x}")
    print(format_table(fits, comparisons))
    out = {"rows": rows, "fits": fits, "comparisons": comparisons}
    if json_path:
        slim = [{k: v for k, v in f.items() if k != "b_samples"} for f in fits]
        with open(json_path, "w") as fh:
            json.dump(_jsonable({**out, "fits": slim}), fh, indent=2)
        print(f"wrote {json_path}")
    if png:
        plot(rows, fits, png, x=x)
        print(f"wrote {png}")
    return out
