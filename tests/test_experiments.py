"""The experiment scripts' smoke versions run end to end (QUICK=1: tiny models, a small corpus)."""

import csv
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_corpus  # the tests directory is on sys.path under pytest

from structlm.config import LinearSpec, ModelConfig, to_dict
from structlm.model.flops import param_groups
from structlm.studies.sweep import load_sweep, plan_sweep

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_study_quick_runs_every_step(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_lines=60)
    env = {**os.environ, "QUICK": "1", "OUT": str(tmp_path / "out"), "CORPUS": str(corpus),
           "DECODE_BATCH": "4", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(ROOT / "experiments/cpu_study/run.sh")], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    docs = tmp_path / "out" / "docs"
    fits = json.loads((docs / "scaling_flops.json").read_text())
    assert {f["family"] for f in fits["fits"]} == {"dense", "lowrank-63%", "lowrank-32%"}
    assert len(fits["rows"]) == 9 and (docs / "scaling_flops.png").stat().st_size > 0
    sgt = {r["run"]: r for r in csv.DictReader((docs / "sgt_table.csv").open())}
    assert set(sgt) == {"3x32h2-dense", "3x32h2-lowrank32", "3x32h2-lowrank32-sgt"}
    dense_flops = float(sgt["3x32h2-dense"]["train_flops"])
    for name in ("3x32h2-lowrank32", "3x32h2-lowrank32-sgt"):  # equal FLOPs, up to one step
        assert float(sgt[name]["train_flops"]) <= dense_flops
    wide = {r["run"]: r for r in csv.DictReader((docs / "wide_table.csv").open())}
    assert set(wide) == {"3x32h2-dense", "gqa-dense", "gqa-lowrank-wide"}
    assert all(float(r["decode_tokens_per_s"]) > 0 for r in wide.values())
    seeds = list(csv.DictReader((docs / "seeds_table.csv").open()))
    assert sorted(r["run"] for r in seeds) == sorted(
        f"seed{s}/3x32h2-{k}" for s in (2, 3) for k in ("dense", "lowrank63", "lowrank32"))


def _load_gap():
    spec = importlib.util.spec_from_file_location(
        "gap", ROOT / "experiments/chinchilla_study/gap.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_chinchilla_sweep_plans_twenty_tokens_per_parameter():
    runs = plan_sweep(load_sweep(str(ROOT / "experiments/chinchilla_study/sweep.toml")))
    assert len(runs) == 21 and len({r.name for r in runs}) == 21
    for r in runs:
        if r.name.endswith("-dense"):
            ratio = r.tokens / param_groups(r.cfg.model)["non_embedding"]
            assert 19.5 < ratio <= 20.0
    mup = [r for r in runs if r.name.endswith("-mup")]
    assert len(mup) == 4 and all(r.cfg.optim.param_scaling == "mup" for r in mup)
    assert {r.cfg.model.logit_scale for r in mup} == {64 / 96, 64 / 112}


def test_lr_transfer_sweep_plans_one_lr_grid_per_parametrisation():
    runs = plan_sweep(load_sweep(str(ROOT / "experiments/lr_transfer/sweep.toml")))
    assert len(runs) == 36 and len({r.tokens for r in runs}) == 1
    for scaling in ("standard", "mup"):
        lrs = {r.cfg.optim.lr for r in runs if r.cfg.optim.param_scaling == scaling}
        assert len(lrs) == 6


def test_gap_trend_finds_a_shrinking_gap(tmp_path):
    """Synthetic summaries: the LowRank gap halves per doubling of N, with two seeds at one size."""
    gap = _load_gap()
    for i, d in enumerate((32, 64, 128, 256)):
        dense = ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=d, d_ff=4 * d)
        lr = ModelConfig(**{**vars(dense), "ffn": LinearSpec("lowrank", rank=d // 8)})
        n = 4 ** i * 1e5
        for name, cfg, loss in (("dense", dense, 3.0), ("lr", lr, 3.0 + 0.2 / 2 ** i),
                                ("lr-seed2", lr, 3.0 + 0.2 / 2 ** i + 0.004 * (i == 1))):
            run = tmp_path / f"{d}-{name}"
            run.mkdir()
            (run / "summary.json").write_text(json.dumps({
                "config": {"model": to_dict(cfg)}, "train_flops": 1e12 * (i + 1), "tokens": 1e6,
                "param_groups": {"total": int(n), "non_embedding": int(n), "ffn": 0},
                "final_val_loss": loss, "final_val_ppl": 2.0 ** loss}))
    g = gap.gaps(gap.collect([str(tmp_path)]))
    fit = gap.slope(g["lowrank-32%"] if "lowrank-32%" in g else next(iter(g.values())))
    assert fit["n"] == 4 and fit["per_doubling"] < 0 and fit["ci90"][1] < 0
    assert fit["seed_spread"] == pytest.approx(0.004, abs=1e-9)
    assert "shrinks" in gap.verdict("lowrank", fit)
    gap.plot(g, {k: gap.slope(v) for k, v in g.items()}, str(tmp_path / "gap.png"))
    assert (tmp_path / "gap.png").stat().st_size > 0


def test_lr_transfer_finds_a_moving_and_a_fixed_optimum(tmp_path):
    """Synthetic summaries: under standard the best lr halves per width doubling, under mup it
    stays at 8e-3; the table's shifts say so, and the plot is drawn."""
    spec = importlib.util.spec_from_file_location(
        "transfer", ROOT / "experiments/lr_transfer/transfer.py")
    tr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tr)
    for scaling in ("standard", "mup"):
        for k, d in enumerate((32, 64, 128)):
            best = 8e-3 / 2 ** k if scaling == "standard" else 8e-3
            for lr in (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2):
                m = ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=d, d_ff=4 * d)
                run = tmp_path / f"{scaling}-{d}-{lr}"
                run.mkdir()
                (run / "summary.json").write_text(json.dumps({
                    "config": {"model": to_dict(m), "optim": {"lr": lr, "param_scaling": scaling}},
                    "train_flops": 1e12, "tokens": 1e6,
                    "param_groups": {"total": d * 100, "non_embedding": d * 10, "ffn": 0},
                    "final_val_loss": 3.0 + 0.1 * math.log2(lr / best) ** 2,
                    "final_val_ppl": 20.0}))
    data = tr.curves(tr.collect([str(tmp_path)]))
    assert tr.optimum(data["dense", "mup"][128]) == (pytest.approx(8e-3), True)
    assert tr.optimum(data["dense", "standard"][128]) == (pytest.approx(2e-3), False)  # an edge
    lines = tr.table(data)
    shifts = {ln.split("|")[2].strip(): ln.split("|")[-2].strip() for ln in lines
              if "| 128 |" in ln}
    assert shifts == {"mup": "+0.00", "standard": "-1.00"}  # from the previous width
    tr.plot(data, str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").stat().st_size > 10_000


@pytest.mark.parametrize(("script", "existing"), [("bench_cpu.sh", "ffn.jsonl"),
                                                  ("bench_targets.sh", None),
                                                  ("gpu_check.sh", "ffn.jsonl")])
def test_bench_scripts_keep_an_earlier_runs_rows(tmp_path, script, existing):
    """A benchmark script pointed at a folder that holds an earlier run stops before any
    benchmark runs, deletes nothing, and names another folder."""
    out = tmp_path / "rows"
    out.mkdir()
    kept = out / (existing or "ffn.jsonl")
    kept.write_text('{"bench": "ffn"}\n')
    r = subprocess.run(["bash", str(ROOT / "experiments" / script)], capture_output=True,
                       text=True, env={**os.environ, "OUT": str(out)}, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "OUT=" in r.stderr and str(out) in r.stderr
    assert kept.read_text() == '{"bench": "ffn"}\n' and list(out.iterdir()) == [kept]


def test_engine_profile_accounts_for_every_step():
    """experiments/engine_profile.py on the tiny preset: every line's parts add up to its step."""
    r = subprocess.run([sys.executable, str(ROOT / "experiments/engine_profile.py"), "--preset",
                        "tiny", "--batch", "3", "--steps", "4", "--reps", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines] == [f"tiny batch 3 {n}" for n in
                                                 ("rep 0", "rep 1", "median")]
    for ln in lines[:2]:
        step = float(ln.split(": ")[1].split(" ms/step")[0])
        parts = [float(x) for x in
                 re.findall(r"(?:forward|sample|take|scheduling) ([\d.]+) ms", ln)]
        assert len(parts) == 4 and sum(parts) == pytest.approx(step, abs=0.03)  # 2-decimal rounding


def test_premerge_decode_measures_every_variant_without_touching_the_users_cache(tmp_path):
    """experiments/premerge_decode.py on the tiny preset: four variants per kind and budget, dense
    the reference, and its calibration kept out of the user's pre-merge cache."""
    rows = tmp_path / "rows.jsonl"
    env = {**os.environ, "STRUCTLM_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, str(ROOT / "experiments/premerge_decode.py"), "--preset",
                        "tiny", "--kinds", "lowrank", "--budgets", "0.32", "--reps", "1", "--gen",
                        "2", "--json", str(rows)], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    got = [json.loads(ln) for ln in rows.read_text().splitlines()]
    assert [g["variant"] for g in got] == ["dense", "factors", "merged_default",
                                          "merged_calibrated"]
    assert got[0]["speedup_vs_dense"] == 1.0 and all(g["ms_per_token"] > 0 for g in got)
    assert not (tmp_path / "cache").exists()
