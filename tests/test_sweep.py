"""Sweeps: budgets by rule, FLOP matching, naming, skip/resume/refuse, the CLI; report tables."""

import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from structlm.cli import main
from structlm.model.flops import param_groups, train_flops
from structlm.studies.report import report_rows, report_runs, to_csv, to_markdown
from structlm.studies.sweep import (
    SweepConfig,
    load_sweep,
    parse_size,
    plan_sweep,
    run_sweep,
    status,
)


def tiny_sweep(corpus: Path, out: Path, **kw) -> SweepConfig:
    """The `tiny` preset on the test corpus: seconds per run."""
    sets = (
        f"data.source={corpus}", f"data.data_dir={corpus}-prepared", "data.vocab_size=300",
        "data.val_fraction=0.2", "model.vocab_size=300", "model.block_size=32",
        "train.dtype=fp32", "train.eval_tokens=512", "train.log_interval=5",
    )
    args = dict(out_dir=str(out), preset="tiny", set=sets, sizes=("2x32h2",),
                structures=("dense", "lowrank:0.32"), tokens=4096.0)
    args.update(kw)
    return SweepConfig(**args)


# --- planning ---------------------------------------------------------------------------------


def test_tokens_per_param_gives_every_structure_the_dense_models_tokens(tmp_path):
    sweep = SweepConfig(out_dir=str(tmp_path), sizes=("2x128", "3x192"),
                        structures=("dense", "lowrank:0.63", "lowrank:0.32", "blockdense:0.32"),
                        tokens_per_param=0.2, param_group="non_embedding")
    runs = plan_sweep(sweep)
    assert [r.name for r in runs][:4] == [
        "2x128-dense", "2x128-lowrank63", "2x128-lowrank32", "2x128-blockdense32"]
    per_step = 32 * 128  # the small preset's batch x sequence
    for size in ("2x128", "3x192"):
        group = [r for r in runs if r.size == size]
        dense = group[0]
        want = int(0.2 * param_groups(dense.cfg.model)["non_embedding"] // per_step) * per_step
        assert {r.tokens for r in group} == {want}
        assert all(r.train_flops < dense.train_flops for r in group[1:])
        for r in group:  # FLOPs are the accounting of flops.py for the run's own model
            assert r.train_flops == pytest.approx(train_flops(r.cfg.model, r.tokens, 128))
    lr32 = runs[2].cfg.model
    assert (lr32.n_layer, lr32.d_model, lr32.n_head, lr32.d_ff) == (2, 128, 2, 512)
    assert lr32.ffn.kind == "lowrank" and lr32.ffn.rank == 32
    assert runs[2].cfg.train.out_dir == str(tmp_path / "2x128-lowrank32")


def test_budget_from_self_uses_each_models_own_parameters(tmp_path):
    runs = plan_sweep(SweepConfig(out_dir=str(tmp_path), structures=("dense", "lowrank:0.32"),
                                  tokens_per_param=0.3, budget_from="self"))
    dense, lr = runs
    assert lr.tokens < dense.tokens
    per_step = 32 * 128
    assert lr.tokens == int(0.3 * lr.params // per_step) * per_step


def test_iso_flop_budget_gives_structured_runs_more_tokens_at_equal_flops(tmp_path):
    budget = 3e12
    runs = plan_sweep(SweepConfig(out_dir=str(tmp_path), sizes=("2x128",), flops=budget,
                                  structures=("dense", "lowrank:0.32", "blockshuffle:0.32")))
    dense, *structured = runs
    one_step = train_flops(dense.cfg.model, 32 * 128, 128)
    for r in runs:
        assert budget - one_step < r.train_flops <= budget
    assert all(r.tokens > dense.tokens for r in structured)


def test_sgt_runs_match_the_dense_flops_on_the_dense_tokens(tmp_path):
    runs = plan_sweep(SweepConfig(out_dir=str(tmp_path), sizes=("2x128",), flops=3e12,
                                  structures=("dense", "lowrank:0.32"), sgt=(False, True)))
    assert [r.name for r in runs] == ["2x128-dense", "2x128-lowrank32", "2x128-lowrank32-sgt"]
    dense, lr, sgt = runs
    s = sgt.cfg.train.sgt
    assert (s.mode, s.match_flops, s.reduce_flop) == ("fixedflop", "dense", True)
    assert sgt.steps > dense.steps  # S + G: the first G batches are replayed
    assert sgt.tokens - dense.tokens == (sgt.steps - dense.steps) * 32 * 128
    assert sgt.train_flops <= dense.train_flops
    assert sgt.train_flops > lr.train_flops * 0.9


def test_grids_union_without_duplicates_and_eval_cadence(tmp_path):
    sweep = SweepConfig(out_dir=str(tmp_path), tokens=1e6, evals=4, grids=(
        {"sizes": ["2x128", "3x192"], "structures": ["dense", "lowrank:0.32"]},
        {"sizes": ["2x128"], "structures": ["lowrank:0.32", "blockshuffle:0.32"]},
    ))
    runs = plan_sweep(sweep)
    names = [r.name for r in runs]
    assert names == ["2x128-dense", "2x128-lowrank32", "3x192-dense", "3x192-lowrank32",
                     "2x128-blockshuffle32"]
    for r in runs:
        assert r.cfg.train.eval_interval == max(1, r.steps // 4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one budget rule"),
    (dict(tokens=1e6, flops=1e12), "exactly one budget rule"),
    (dict(tokens=-5.0), "must be positive"),
    (dict(tokens=1e6, budget_from="other"), "budget_from"),
    (dict(tokens=1e6, grids=({"sizes": ["2x64"], "lr": 1},)),
     "sizes, structures, sgt, preset, set, tag only"),
])
def test_bad_sweep_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SweepConfig(**kwargs)


@pytest.mark.parametrize("field, value, match", [
    ("sizes", ("4by256",), "bad size"),
    ("sizes", ("2x100h3",), "not divisible by 3 heads"),
    ("structures", ("lowrank",), "bad structure"),
    ("structures", ("lowrank:1.5",), "bad structure"),
    ("structures", ("sparse:0.5",), "bad structure"),
    ("set", ("train.batch_size",), "bad override"),
    ("set", ("train.no_such_field=3",), "bad override"),
    ("set", ("train.batch_size=7",), "multiple of"),
    ("set", ("train.max_steps=2",), "plans train.max_steps for every run; set tokens, "),
    ("set", ("train.eval_interval=1",), "set evals"),
    ("set", ("model.ffn.rank=8",), "set structures"),
    ("param_group", "weights", "param_group"),
    ("sizes", ("1x64",), "keeps every FFN of this 1-layer model dense"),
])
def test_bad_grid_entries_name_the_problem(tmp_path, field, value, match):
    kw = {"out_dir": str(tmp_path), "tokens_per_param": 0.1, field: value}
    with pytest.raises(ValueError, match=match):
        plan_sweep(SweepConfig(**kw))


def test_a_budget_below_one_step_names_the_run(tmp_path):
    with pytest.raises(ValueError, match="2x128-dense.*raise the sweep budget"):
        plan_sweep(SweepConfig(out_dir=str(tmp_path), sizes=("2x128",), tokens=100.0))


def test_parse_size_defaults_to_64_wide_heads():
    assert parse_size("4x256") == (4, 256, 4)
    assert parse_size("2x96h2") == (2, 96, 2)
    assert parse_size("1x32") == (1, 32, 1)


def test_load_sweep_reads_toml_with_grids_and_cli_overrides(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('out_dir = "x"\ntokens_per_param = 0.5\nset = ["optim.lr=1e-3"]\n'
                 '[[grid]]\nsizes = ["2x64"]\nstructures = ["dense"]\n')
    s = load_sweep(str(f), out_dir="y", evals=None)
    assert (s.out_dir, s.tokens_per_param, s.set, s.evals) == ("y", 0.5, ("optim.lr=1e-3",), 4)
    assert s.grids == ({"sizes": ["2x64"], "structures": ["dense"]},)
    assert plan_sweep(s)[0].cfg.optim.lr == 1e-3
    f.write_text('tokens = 1e6\nsizez = ["2x64"]\n')
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['sizez'\]"):
        load_sweep(str(f))
    f.write_text("tokens = [\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_sweep(str(f))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sweep(str(tmp_path / "missing.toml"))


# --- running ----------------------------------------------------------------------------------


def test_sweep_trains_skips_finished_runs_and_resumes_interrupted_ones(corpus, tmp_path, capsys):
    sweep = tiny_sweep(corpus, tmp_path / "sw")
    first = run_sweep(sweep)
    assert [Path(s["out_dir"]).name for s in first] == ["2x32h2-dense", "2x32h2-lowrank32"]
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["tokens"] == 4096.0
    dense_dir = tmp_path / "sw" / "2x32h2-dense"
    lr_dir = tmp_path / "sw" / "2x32h2-lowrank32"
    stamp = (dense_dir / "summary.json").stat().st_mtime_ns
    # the lowrank run "died" after its last checkpoint, before writing its summary
    (lr_dir / "summary.json").unlink()
    assert [status(r) for r in plan_sweep(sweep)] == ["done", "partial"]
    capsys.readouterr()
    second = run_sweep(sweep)
    out = capsys.readouterr().out
    assert "2x32h2-dense: done" in out and "skipped" in out
    assert "2x32h2-lowrank32: resuming" in out
    assert (dense_dir / "summary.json").stat().st_mtime_ns == stamp  # not retrained
    assert second[1]["final_val_loss"] == pytest.approx(first[1]["final_val_loss"], abs=1e-6)
    assert second[1]["steps"] == first[1]["steps"]


def test_sweep_refuses_a_directory_holding_another_run_before_training(corpus, tmp_path):
    out = tmp_path / "sw"
    run_sweep(tiny_sweep(corpus, out, structures=("dense",)))
    changed = tiny_sweep(corpus, out, structures=("lowrank:0.32", "dense"),
                         set=tiny_sweep(corpus, out).set + ("optim.lr=0.01",))
    with pytest.raises(FileExistsError, match="holds a different run"):
        run_sweep(changed)
    assert not (out / "2x32h2-lowrank32").exists()  # nothing trained before the refusal


def test_a_damaged_summary_is_retrained_and_options_are_kept(corpus, tmp_path, capsys):
    """A half-written summary.json makes its run partial, not a crash; a second sweep with other
    options into the same folder keeps the first's record."""
    out = tmp_path / "sw"
    first = tiny_sweep(corpus, out, structures=("dense",))
    run_sweep(first)
    summary = out / "2x32h2-dense" / "summary.json"
    summary.write_text('{"steps": 4, "final')
    assert [status(r) for r in plan_sweep(first)] == ["partial"]
    run_sweep(first)
    assert json.loads(summary.read_text())["steps"] > 0
    record = (out / "sweep.json").read_text()
    run_sweep(tiny_sweep(corpus, out, structures=("dense",), evals=1))
    assert (out / "sweep.json").read_text() == record
    assert json.loads((out / "sweep-2.json").read_text())["evals"] == 1
    run_sweep(first)  # the same options again: their record exists, no third file
    assert not (out / "sweep-3.json").exists()


def test_dry_run_plans_without_writing(corpus, tmp_path, capsys):
    run_sweep(tiny_sweep(corpus, tmp_path / "sw"), dry_run=True)
    out = capsys.readouterr().out
    assert "2x32h2-lowrank32" in out and "2 runs" in out and "todo" in out
    assert not (tmp_path / "sw").exists()


def test_cli_sweep_scaling_and_report(corpus, tmp_path, capsys):
    out = tmp_path / "sw"
    sets = tiny_sweep(corpus, out).set
    args = ["sweep", "--out_dir", str(out), "--preset", "tiny", "--sizes", "2x32h2", "3x32h2",
            "--structures", "dense", "lowrank:0.32", "--tokens", "4096", "--set", *sets]
    main([*args, "--dry-run"])
    assert "4 runs" in capsys.readouterr().out
    main(args)
    assert len(list(out.glob("*/summary.json"))) == 4
    capsys.readouterr()
    main(["scaling", str(out), "--forms", "power", "--bootstrap", "50",
          "--json", str(tmp_path / "fit.json"), "--plot", str(tmp_path / "fit.png")])
    text = capsys.readouterr().out
    assert "dense" in text and "lowrank-32%" in text
    fits = json.loads((tmp_path / "fit.json").read_text())["fits"]
    assert {f["family"] for f in fits} == {"dense", "lowrank-32%"}
    assert (tmp_path / "fit.png").stat().st_size > 0
    main(["report", str(out), "--decode_batch", "4", "--md", str(tmp_path / "t.md"),
          "--csv", str(tmp_path / "t.csv")])
    rows = list(csv.DictReader(io.StringIO((tmp_path / "t.csv").read_text())))
    assert [r["run"] for r in rows][:2] == ["2x32h2-dense", "3x32h2-dense"]
    assert all(float(r["decode_tokens_per_s"]) > 0 for r in rows)
    md = (tmp_path / "t.md").read_text()
    assert md.count("\n| ") == 4 and "decode tokens/s" in md
    with pytest.raises(SystemExit):
        main(["sweep", "--tokens", "4096", "--flops", "1e12", "--dry-run"])
    assert "exactly one budget rule" in capsys.readouterr().err


def test_report_rows_match_the_summaries(corpus, tmp_path):
    out = tmp_path / "sw"
    summaries = run_sweep(tiny_sweep(corpus, out))
    rows = report_rows([str(out)])
    by_run = {r["run"]: r for r in rows}
    for s in summaries:
        r = by_run[Path(s["out_dir"]).name]
        assert r["params"] == s["param_groups"]["total"]
        assert r["ffn_matrix_params"] == s["param_groups"]["ffn_matrix"]
        assert r["tokens"] == s["tokens"] and r["val_ppl"] == s["final_val_ppl"]
    md = to_markdown(rows)
    best = min(rows, key=lambda r: r["val_ppl"])
    assert f"**{best['val_ppl']:.2f}**" in md
    parsed = list(csv.DictReader(io.StringIO(to_csv(rows))))
    assert [p["run"] for p in parsed] == [r["run"] for r in rows]
    assert float(parsed[0]["train_flops"]) == rows[0]["train_flops"]
    shutil.rmtree(out)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report_runs([str(out)])


def test_a_new_budget_extends_finished_runs_instead_of_skipping_them(corpus, tmp_path):
    out = tmp_path / "sw"
    first = run_sweep(tiny_sweep(corpus, out, structures=("dense",)))
    longer = tiny_sweep(corpus, out, structures=("dense",), tokens=8192.0)
    (run,) = plan_sweep(longer)
    assert run.steps > first[0]["steps"] and status(run) == "partial"
    (second,) = run_sweep(longer)
    assert second["steps"] == run.steps and status(run) == "done"
    shorter = tiny_sweep(corpus, out, structures=("dense",), tokens=2048.0)
    with pytest.raises(ValueError, match="beyond the budget"):
        run_sweep(shorter)


def test_grids_on_their_own_presets_are_named_by_them_and_keep_their_size(tmp_path):
    sweep = SweepConfig(out_dir=str(tmp_path), structures=("dense", "lowrank:0.32"),
                        tokens_per_param=0.1, grids=({"preset": "tiny"},
                                                      {"preset": "small", "set": ["optim.lr=1e-3"],
                                                       "structures": ["dense"]}))
    runs = plan_sweep(sweep)
    assert [r.name for r in runs] == ["tiny-dense", "tiny-lowrank32", "small-dense"]
    small = runs[2].cfg
    assert small.optim.lr == 1e-3 and runs[0].cfg.optim.lr != 1e-3
    assert (small.model.n_layer, small.model.d_model) == (4, 256)  # the preset's own size
    assert (runs[0].cfg.model.n_layer, runs[0].cfg.model.d_model) == (2, 64)


def test_gpu_recipe_reproduces_the_papers_sizes_and_flops(capsys):
    """experiments/gpu_recipe/paper.toml: Table 1's xl rows (1274M params, 2.10e20 FLOPs dense) and
    a GPU-hour estimate per run."""
    sweep = load_sweep(str(Path(__file__).parents[1] / "experiments/gpu_recipe/paper.toml"))
    runs = {r.name: r for r in plan_sweep(sweep)}
    assert len(runs) == 4 * 9
    xl = runs["paper-xl-dense"]
    assert xl.params == pytest.approx(1274e6, rel=1e-3)
    assert xl.train_flops == pytest.approx(2.10e20, rel=5e-3)
    assert runs["paper-xl-lowrank32"].train_flops == pytest.approx(1.29e20, rel=5e-3)
    run_sweep(sweep, dry_run=True)
    out = capsys.readouterr().out
    assert "GPU-h" in out and "GPU-hours at 40% MFU" in out


def test_a_grid_tag_names_a_second_seed_apart(tmp_path):
    sweep = SweepConfig(out_dir=str(tmp_path), sizes=("2x64",), structures=("dense",),
                        tokens_per_param=0.1,
                        grids=({}, {"set": ["train.seed=2"], "tag": "seed2"}))
    runs = plan_sweep(sweep)
    assert [r.name for r in runs] == ["2x64-dense", "2x64-dense-seed2"]
    assert runs[1].cfg.train.seed == 2 and runs[0].cfg.train.seed != 2
