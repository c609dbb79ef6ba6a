"""Scaling-law fits: parameter recovery, bootstrap CIs, steepness comparisons, family labels,
collecting summaries and the report files."""

import json
import math

import numpy as np
import pytest

from structlm.config import PRESETS, LinearSpec, SGTConfig, to_dict
from structlm.model.flops import param_groups
from structlm.studies.scaling import (
    bootstrap,
    collect,
    compare_steepness,
    family,
    fit_families,
    fit_power,
    fit_saturating,
    report_fits,
)

X = np.geomspace(1e12, 1e16, 8)  # training FLOPs of 8 runs


def noisy(y, sigma, seed):
    """y with multiplicative log-normal noise of relative size sigma."""
    return y * np.exp(np.random.default_rng(seed).normal(0.0, sigma, len(y)))


def rows_for(fam, x, y):
    return [{"family": fam, "train_flops": a, "val_loss": b} for a, b in zip(x, y, strict=True)]


# --- fits -----------------------------------------------------------------------------------------


def test_fit_power_recovers_parameters():
    y = noisy(30.0 * X**-0.05, 0.002, seed=1)
    f = fit_power(X, y)
    assert f["form"] == "power"
    assert f["b"] == pytest.approx(0.05, rel=0.05)
    assert f["A"] == pytest.approx(30.0, rel=0.2)
    assert 0 < f["rmse"] < 0.02


def test_fit_saturating_recovers_noise_free_law():
    y = 2.0 + 40.0 * X**-0.25
    f = fit_saturating(X, y)
    assert f["form"] == "saturating"
    assert f["E"] == pytest.approx(2.0, rel=0.01)
    assert f["A"] == pytest.approx(40.0, rel=0.01)
    assert f["b"] == pytest.approx(0.25, rel=0.01)
    assert f["rmse"] < 1e-8


def test_fit_saturating_keeps_E_below_the_smallest_loss():
    y = noisy(2.0 + 40.0 * X**-0.1, 0.01, seed=3)
    f = fit_saturating(X, y)
    assert 0.0 <= f["E"] < y.min()
    # never worse than the pure power law it contains (E = 0)
    assert f["rmse"] <= fit_power(X, y)["rmse"] * (1 + 1e-9)


@pytest.mark.parametrize("form", ["power", "saturating"])
def test_bootstrap_ci_contains_true_exponent(form):
    law = 40.0 * X**-0.1 + (2.0 if form == "saturating" else 0.0)
    out = bootstrap(X, noisy(law, 0.005, seed=2), form, n=300, seed=0)
    lo, hi = out["b_ci"]
    assert lo < 0.1 < hi
    assert lo <= out["b"] <= hi
    assert len(out["b_samples"]) == out["n_boot"] > 250
    for k in ("A_ci",) + (("E_ci",) if form == "saturating" else ()):
        assert out[k][0] <= out[k][1]


def test_too_few_points_raise_with_a_message():
    with pytest.raises(ValueError, match="at least 2 distinct x"):
        fit_power([1e12, 1e12], [3.0, 2.9])
    with pytest.raises(ValueError, match="at least 3 distinct x"):
        fit_saturating([1e12, 1e13], [3.0, 2.9])
    with pytest.raises(ValueError, match="unknown form"):
        bootstrap(X, 3.0 * X**-0.05, "exponential")


def test_fit_families_notes_skipped_forms():
    rows = rows_for("big", X, 30.0 * X**-0.05) + rows_for("pair", X[:2], 30.0 * X[:2] ** -0.05)
    rows += rows_for("single", X[:1], [3.0])
    fits = fit_families(rows, forms=("power", "saturating"), n_boot=20)
    by = {(f["family"], f["form"]): f for f in fits}
    assert "b" in by["big", "power"] and "b" in by["big", "saturating"]
    assert "b" in by["pair", "power"]
    assert "needs 3 distinct" in by["pair", "saturating"]["note"]
    assert "note" in by["single", "power"]
    assert by["big", "power"]["n_points"] == 8 and by["big", "power"]["x"] == "train_flops"


# --- comparisons ----------------------------------------------------------------------------------


def test_compare_steepness_finds_the_steeper_family():
    rows = rows_for("flat", X, noisy(30.0 * X**-0.1, 0.01, seed=4))
    rows += rows_for("steep", X, noisy(30.0 * X**-0.3, 0.01, seed=5))
    (c,) = compare_steepness(fit_families(rows, forms=("power",), n_boot=300))
    assert (c["family_a"], c["family_b"]) == ("flat", "steep")
    assert c["p_a_steeper"] < 0.1
    assert c["db"] == pytest.approx(-0.2, abs=0.02)
    assert c["verdict"].startswith("steep steeper than flat (P=")


def test_compare_steepness_identical_laws_are_no_clear_difference():
    y = noisy(30.0 * X**-0.1, 0.01, seed=6)
    fits = fit_families(rows_for("a", X, y) + rows_for("b", X, y), forms=("power",), n_boot=300)
    (c,) = compare_steepness(fits)
    assert c["db"] == 0.0
    assert 0.1 < c["p_a_steeper"] < 0.9
    assert c["verdict"].startswith("no clear difference (P=")


# --- families, collect, report --------------------------------------------------------------------


def tiny(kind="lowrank", rank=16, sgt="off", n_kv_head=None):
    cfg = PRESETS["tiny"]()  # d_model 64, d_ff 256, 4 heads
    cfg.model.ffn = LinearSpec(kind, rank=rank) if kind != "dense" else LinearSpec()
    cfg.model.n_kv_head = n_kv_head
    cfg.train.sgt = SGTConfig(mode=sgt)
    return cfg


def fake_summary(cfg, flops, loss):
    return {
        "out_dir": cfg.train.out_dir, "steps": 10, "tokens": flops / 1e6, "train_flops": flops,
        "flops_per_token": 1, "param_groups": param_groups(cfg.model), "final_val_loss": loss,
        "final_val_ppl": float(np.exp(loss)), "best_val_loss": loss, "final_train_loss": loss,
        "wall_time_s": 1.0, "sgt": {"mode": cfg.train.sgt.mode}, "tokens_per_s": 1.0,
        "device": "cpu", "dtype": "fp32", "torch_version": "x", "world_size": 1,
        "config": to_dict(cfg),
    }


@pytest.mark.parametrize(
    "kw, label",
    [
        ({"kind": "dense"}, "dense"),
        ({}, "lowrank-32%"),  # rank d/4 at d_ff = 4d: 0.3125
        ({"rank": 32}, "lowrank-63%"),  # rank d/2: 0.625
        ({"sgt": "fixedflop"}, "lowrank-32%+sgt"),
        ({"n_kv_head": 2}, "gqa-lowrank-32%"),
        ({"rank": 8}, "lowrank-16%"),  # far from 32% and 63%: the exact share, ceil'd
        ({"kind": "dense", "n_kv_head": 2}, "gqa-dense"),
    ],
)
def test_family_labels(kw, label):
    assert family({"config": to_dict(tiny(**kw))}) == label


def write_sweep(root, n=4):
    """n dense and n lowrank fake runs under root/<name>/summary.json."""
    for kind, scale in (("dense", 1.0), ("lowrank", 1.03)):
        cfg = tiny(kind=kind)
        for i, flops in enumerate(np.geomspace(1e12, 1e15, n)):
            run = root / f"{kind}-{i}"
            run.mkdir(parents=True)
            loss = scale * (2.0 + 40.0 * flops**-0.12) * (1 + 0.002 * (-1) ** i)
            (run / "summary.json").write_text(json.dumps(fake_summary(cfg, float(flops), loss)))


def test_collect_finds_dedups_and_sorts(tmp_path):
    write_sweep(tmp_path / "sweep")
    rows = collect([str(tmp_path / "sweep"), str(tmp_path / "sweep" / "dense-0"),
                    str(tmp_path / "sweep" / "lowrank-*")])
    assert len(rows) == 8
    assert [r["family"] for r in rows] == ["dense"] * 4 + ["lowrank-32%"] * 4
    flops = [r["train_flops"] for r in rows[:4]]
    assert flops == sorted(flops)
    r = rows[0]
    assert r["run"] == "dense-0" and r["d_model"] == 64 and r["n_layer"] == 2
    assert r["params"] == param_groups(tiny(kind="dense").model)["total"]
    with pytest.raises(FileNotFoundError, match="summary.json"):
        collect([str(tmp_path / "sweep" / "nothing-*")])


def test_report_writes_json_and_png(tmp_path, capsys):
    write_sweep(tmp_path / "sweep")
    out = report_fits([str(tmp_path / "sweep")], n_boot=50, json_path=str(tmp_path / "fit.json"),
                 png=str(tmp_path / "fit.png"))
    assert (tmp_path / "fit.png").stat().st_size > 0
    data = json.loads((tmp_path / "fit.json").read_text())
    assert len(data["rows"]) == 8 and len(data["fits"]) == 4 and len(data["comparisons"]) == 2
    assert all("b_samples" not in f for f in data["fits"])
    assert "b_samples" in out["fits"][0]
    printed = capsys.readouterr().out
    assert "lowrank-32%" in printed and "saturating" in printed and "P=" in printed
    out = report_fits([str(tmp_path / "sweep")], x="params", forms=("power",), n_boot=20)
    assert all("note" in f for f in out["fits"])  # one model size per family: nothing to fit


def test_an_exact_fit_gets_no_interval_and_no_verdict():
    """3 points for the 3-parameter saturating form: every resample is the same set, so the
    bootstrap cannot measure uncertainty; say so instead of a zero-width interval and P=1."""
    from structlm.studies.scaling import bootstrap, compare_steepness

    x = np.array([1e12, 1e13, 1e14])
    fits = []
    for fam, b in (("a", 0.2), ("b", 0.1)):
        f = bootstrap(x, 2.0 + 40.0 * x ** -b, "saturating", n=100)
        assert "no interval" in f["note"] and all(math.isnan(v) for v in f["b_ci"])
        fits.append({"family": fam, "x": "train_flops", **f})
    (c,) = compare_steepness(fits)
    assert math.isnan(c["p_a_steeper"]) and c["verdict"].startswith("undetermined")


def test_blockdense_32_is_one_family_across_widths():
    """The paper's BlockDense-32% rule lands at 29-31% depending on the block count: one family."""
    from structlm.linear import choose_hparams

    labels = set()
    for d in (128, 160):
        cfg = PRESETS["tiny"]()
        cfg.model.d_model, cfg.model.d_ff = d, 4 * d
        cfg.model.ffn = choose_hparams("blockdense", [(d, 4 * d), (4 * d, d)], 0.32)
        labels.add(family({"config": to_dict(cfg)}))
    assert labels == {"blockdense-32%"}
