"""structlm plan on synthetic laws with known optima, on the shipped paper points, and on a sweep
directory of summaries (the same files `structlm scaling` reads)."""

import json
import math

import numpy as np
import pytest

from structlm.cli import main
from structlm.config import LinearSpec, ModelConfig, to_dict
from structlm.studies import plan

LAW = {"E": 1.7, "A": 406.0, "alpha": 0.34, "B": 411.0, "beta": 0.28}  # Chinchilla-like
K = 6.0  # FLOPs per parameter per token


def law_rows(law=LAW, family="dense", ratios=(5, 20, 80), sizes=(1e7, 3e7, 1e8, 3e8)):
    return [{"family": family, "params": n, "tokens": r * n, "train_flops": K * n * r * n,
             "val_loss": float(plan.chinchilla_loss(law, n, r * n))}
            for n in sizes for r in ratios]


def test_chinchilla_fit_recovers_the_law_and_its_optimum():
    fit = plan.fit_chinchilla(*zip(*[(r["params"], r["tokens"], r["val_loss"])
                                     for r in law_rows()], strict=True))
    assert fit["rmse"] < 1e-4
    for c in (1e18, 1e19):  # inside the fitted range (2e15 .. 4.3e19)
        n_true, d_true = plan.chinchilla_optimum(LAW, c, K)
        n_fit, _ = plan.chinchilla_optimum(fit, c, K)
        assert n_fit == pytest.approx(n_true, rel=0.02)
        assert float(plan.chinchilla_loss(fit, n_fit, c / (K * n_fit))) == pytest.approx(
            float(plan.chinchilla_loss(LAW, n_true, d_true)), abs=1e-4)


def test_chinchilla_optimum_is_the_minimum_along_the_budget():
    c = 1e21
    n_star, d_star = plan.chinchilla_optimum(LAW, c, K)
    assert K * n_star * d_star == pytest.approx(c)
    ns = np.geomspace(n_star / 30, n_star * 30, 2001)
    losses = plan.chinchilla_loss(LAW, ns, c / (K * ns))
    assert ns[int(np.argmin(losses))] == pytest.approx(n_star, rel=0.01)
    n_cap, d_cap = plan.chinchilla_optimum(LAW, c, K, max_params=n_star / 4)
    assert n_cap == n_star / 4 and K * n_cap * d_cap == pytest.approx(c)


def test_plan_picks_the_family_with_the_lower_law_and_reports_its_optimum():
    better = dict(LAW, E=1.6)
    rows = law_rows() + law_rows(better, family="lowrank-32%")
    result = plan.plan(rows, plan.PlanOptions(flops=1e19, n_boot=20))
    best = result["recommendation"]
    assert best["family"] == "lowrank-32%" and best["law"] == "L(N,D)"
    n_true, _ = plan.chinchilla_optimum(better, 1e19, K)
    assert best["params"] == pytest.approx(n_true, rel=0.02)
    assert best["loss_ci"][0] <= best["loss"] + 1e-6 and best["loss"] - 1e-6 <= best["loss_ci"][1]
    assert [r["family"] for r in result["runners_up"]] == ["dense"]


def test_fixed_ratio_runs_fall_back_to_loss_vs_compute_with_their_size_rule():
    """At one tokens-per-parameter ratio N and D cannot be separated: L(C) and the runs' rule."""
    rows = [{"family": "dense", "params": n, "tokens": 20 * n, "train_flops": K * 20 * n * n,
             "val_loss": 30.0 * (K * 20 * n * n) ** -0.05} for n in (1e7, 3e7, 1e8, 3e8)]
    p = plan.plan(rows, plan.PlanOptions(flops=1e18, n_boot=20))["recommendation"]
    assert p["law"] == "L(C) power"
    assert p["loss"] == pytest.approx(30.0 * 1e18 ** -0.05, rel=1e-9)
    assert p["params"] == pytest.approx(math.sqrt(1e18 / (K * 20)), rel=1e-6)
    assert p["tokens"] / p["params"] == pytest.approx(20)


def test_target_loss_gives_the_least_compute_that_reaches_it():
    rows = law_rows()
    result = plan.plan(rows, plan.PlanOptions(target_loss=3.0, n_boot=0))
    best = result["recommendation"]
    assert best["loss"] == pytest.approx(3.0, abs=1e-6)
    at_less = plan.plan(rows, plan.PlanOptions(flops=best["flops"] * 0.9, n_boot=0))
    assert at_less["recommendation"]["loss"] > 3.0


def test_extrapolation_is_refused_unless_asked():
    rows = law_rows()  # fitted 2e15 .. 4.3e19 FLOPs
    refused = plan.plan(rows, plan.PlanOptions(flops=1e22, n_boot=0))
    assert refused["recommendation"] is None
    assert "outside the fitted" in refused["plans"][0]["refused"]
    assert "--extrapolate" in refused["plans"][0]["refused"]
    allowed = plan.plan(rows, plan.PlanOptions(flops=1e22, n_boot=0, extrapolate=True))
    assert allowed["recommendation"]["family"] == "dense"


def test_plan_needs_a_budget_or_a_target():
    with pytest.raises(ValueError, match="--flops 1e20"):
        plan.plan(law_rows(), plan.PlanOptions())


def test_cli_plans_from_the_paper_points(capsys, tmp_path):
    main(["plan", "--flops", "1e20", "--json", str(tmp_path / "plan.json")])
    out = capsys.readouterr().out
    assert "arXiv 2406.16450" in out and "recommended:" in out and "runner-up:" in out
    saved = json.loads((tmp_path / "plan.json").read_text())
    best = saved["recommendation"]
    assert best["family"] in {"dense", "lowrank-63%", "lowrank-32%"}
    # the paper's xl models (1.3e20 - 2.1e20 FLOPs) near this budget: 0.7-1.3B params, ~2.6 nats
    assert 5e8 < best["params"] < 1.5e9 and 2.5 < best["loss"] < 2.7
    assert any("1 distinct budget" in p.get("skipped", "") for p in saved["plans"])


def _write_summary(run_dir, cfg: ModelConfig, params: float, tokens: float, loss: float):
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({
        "config": {"model": to_dict(cfg)}, "train_flops": K * params * tokens, "tokens": tokens,
        "param_groups": {"total": int(params), "non_embedding": int(params), "ffn": 0},
        "final_val_loss": loss, "final_val_ppl": math.exp(loss)}))


def test_cli_plans_from_a_sweep_directory(tmp_path, capsys):
    dense = ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, d_ff=128)
    lowrank = ModelConfig(**{**vars(dense), "ffn": LinearSpec("lowrank", rank=4)})
    better = dict(LAW, E=1.6)
    for cfg, law, name in ((dense, LAW, "dense"), (lowrank, better, "lr")):
        for i, r in enumerate(law_rows(law)):
            _write_summary(tmp_path / "sweep" / f"{name}-{i}", cfg, r["params"], r["tokens"],
                           r["val_loss"])
    main(["plan", "--from", str(tmp_path / "sweep"), "--flops", "1e19", "--bootstrap", "20",
          "--json", str(tmp_path / "plan.json")])
    best = json.loads((tmp_path / "plan.json").read_text())["recommendation"]
    assert best["family"].startswith("lowrank") and best["law"] == "L(N,D)"
    assert "recommended: lowrank" in capsys.readouterr().out


def test_a_fit_through_as_many_runs_as_parameters_claims_no_interval(tmp_path, capsys):
    """Two runs and the two-parameter power law: the fit passes through both and every resample
    gives the same curve. A zero-width 90% interval would be false certainty; none is printed."""
    dense = ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, d_ff=128)
    for i, r in enumerate(law_rows(LAW)[:2]):
        _write_summary(tmp_path / "sweep" / f"dense-{i}", dense, r["params"], r["tokens"],
                       r["val_loss"])
    main(["plan", "--from", str(tmp_path / "sweep"), "--flops", "1e16", "--bootstrap", "50",
          "--json", str(tmp_path / "plan.json")])
    out = capsys.readouterr().out
    assert "none (too few runs)" in out
    lo, hi = json.loads((tmp_path / "plan.json").read_text())["plans"][0]["loss_ci"]
    assert lo is None and hi is None  # NaN written as null
