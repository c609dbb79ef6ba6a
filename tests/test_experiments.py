"""The experiment scripts' smoke versions run end to end (QUICK=1: tiny models, a small corpus)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_corpus  # the tests directory is on sys.path under pytest

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
