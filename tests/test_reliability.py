"""Faults a user meets, each planted by hand: kills in the final phase, damaged files, divergence,
bad input. Every one ends in a finished run equal to an uninterrupted one, or in a clear error
that names the problem and the fix, with nothing the user made lost."""

import json
import math
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from structlm.config import PRESETS, DataConfig, OptimConfig, from_dict, to_dict
from structlm.data.prepare import prepare
from structlm.runs import checkpoint
from structlm.runs.run import load_model
from structlm.studies.sweep import SweepConfig, plan_sweep
from structlm.training import loop, train

# isort: split
from helpers import tiny_cfg, train_rows

TIMING = ("wall_time_s", "tokens_per_s")


def rows(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def summary(run: Path) -> dict:
    """summary.json, parsed strictly: NaN or Infinity literals are not JSON."""
    def refuse(c):
        raise AssertionError(f"summary.json holds {c}")
    return json.loads((run / "summary.json").read_text(), parse_constant=refuse)


def untimed(s: dict) -> dict:
    return {k: v for k, v in s.items() if k not in TIMING}


def cli(*args, check_rc=None) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "structlm", *args], capture_output=True, text=True)
    if check_rc is not None:
        assert r.returncode == check_rc, r.stderr[-2000:]
    return r


# --- the final phase and the last save -------------------------------------------------------


def test_the_last_step_is_saved_once(corpus, tmp_path, monkeypatch):
    saved = []
    real = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda *a, **k: saved.append(a[4]) or real(*a, **k))
    train(tiny_cfg(corpus, tmp_path / "r", max_steps=6, eval_interval=3, ckpt_interval=1))
    assert saved == [1, 2, 3, 4, 5, 6]


def test_a_kill_inside_the_final_save_leaves_a_run_that_finishes(corpus, tmp_path):
    """A leftover .old_ copy of the final checkpoint (killed between rename and delete) and a
    missing summary: the rerun finishes to the same summary, with one final val row."""
    cfg = tiny_cfg(corpus, tmp_path / "r", max_steps=6, eval_interval=3, ckpt_interval=1)
    train(cfg)
    first, expected = summary(tmp_path / "r"), rows(tmp_path / "r")
    (tmp_path / "r" / "summary.json").unlink()
    old = tmp_path / "r" / "checkpoints" / ".old_step_0000006"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"partial")
    train(cfg)
    assert untimed(summary(tmp_path / "r")) == untimed(first)
    assert rows(tmp_path / "r") == expected  # no second final val row
    assert not old.exists()


def test_a_resumed_final_phase_reproduces_the_summary(corpus, tmp_path):
    """Killed after the final checkpoint but before summary.json: the rerun's summary equals the
    uninterrupted one (train loss, FLOPs, losses; only timing may differ) and is valid JSON."""
    cfg = tiny_cfg(corpus, tmp_path / "r", max_steps=6, eval_interval=3)
    train(cfg)
    first, expected = summary(tmp_path / "r"), rows(tmp_path / "r")
    (tmp_path / "r" / "summary.json").unlink()
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "split": "va')  # and a row cut mid-write
    again = train(cfg)
    assert untimed(summary(tmp_path / "r")) == untimed(first)
    assert math.isfinite(again.final_train_loss) and again.wall_time_s > 0.01
    assert rows(tmp_path / "r") == expected


def test_a_damaged_summary_is_rewritten_not_fatal(corpus, tmp_path, capsys):
    cfg = tiny_cfg(corpus, tmp_path / "r", max_steps=4, eval_interval=0)
    train(cfg)
    first = summary(tmp_path / "r")
    (tmp_path / "r" / "summary.json").write_text('{"out_dir": "r", "ste')
    train(cfg)
    assert "summary.json is damaged" in capsys.readouterr().err
    assert untimed(summary(tmp_path / "r")) == untimed(first)


# --- checkpoints and files damaged by hand -----------------------------------------------------


def test_a_manifest_without_files_falls_back_to_the_previous_checkpoint(corpus, tmp_path):
    train(tiny_cfg(corpus, tmp_path / "r", max_steps=4, eval_interval=0, ckpt_interval=2))
    (tmp_path / "r" / "checkpoints" / "step_0000004" / "manifest.json").write_text('{"step": 4}')
    assert checkpoint.find_latest(tmp_path / "r").name == "step_0000002"


def test_a_truncated_config_json_is_named(corpus, tmp_path):
    cfg = tiny_cfg(corpus, tmp_path / "r", max_steps=2, eval_interval=0)
    train(cfg)
    (tmp_path / "r" / "config.json").write_text('{"model": {"vocab')
    with pytest.raises(ValueError, match=r"cannot read the run configuration .*r/config\.json"):
        train(cfg)
    r = cli("train", "--resume", str(tmp_path / "r"), check_rc=2)
    assert "config.json" in r.stderr and "Traceback" not in r.stderr


def test_a_failed_save_keeps_the_earlier_checkpoints(corpus, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = checkpoint.save_model

    def disk_full(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(checkpoint, "save_model", disk_full)
    with pytest.raises(checkpoint.CheckpointError, match="earlier checkpoints .* are intact"):
        train(tiny_cfg(corpus, tmp_path / "r", max_steps=6, eval_interval=0, ckpt_interval=2))
    assert checkpoint.find_latest(tmp_path / "r").name == "step_0000002"
    assert not list((tmp_path / "r" / "checkpoints").glob(".tmp_*"))


def test_a_restart_that_discards_progress_keeps_the_old_metrics(corpus, tmp_path, capsys):
    cfg = tiny_cfg(corpus, tmp_path / "r", max_steps=2, eval_interval=0)
    train(cfg)
    old_rows = (tmp_path / "r" / "metrics.jsonl").read_text()
    shutil.rmtree(tmp_path / "r" / "checkpoints")  # as if it died before its first checkpoint
    (tmp_path / "r" / "summary.json").unlink()
    train(cfg)
    assert "starting it over from step 0" in capsys.readouterr().err
    assert (tmp_path / "r" / "metrics.discarded-1.jsonl").read_text() == old_rows


def test_every_preset_checkpoints_before_the_end():
    for name, make in PRESETS.items():
        t = make().train
        assert t.ckpt_interval > 0 or t.eval_interval > 0, name


# --- divergence and the way back -------------------------------------------------------------


def _diverge_at(monkeypatch, bad_step: int) -> None:
    real = loop.forward_backward

    def fb(run, step):
        loss = real(run, step)
        return loss * float("nan") if step == bad_step else loss

    monkeypatch.setattr(loop, "forward_backward", fb)


def test_divergence_stops_before_the_update_and_names_a_good_checkpoint(
    corpus, tmp_path, monkeypatch
):
    _diverge_at(monkeypatch, 4)  # the loss of the weights saved as step_0000004
    cfg = tiny_cfg(corpus, tmp_path / "r", max_steps=8, eval_interval=0, ckpt_interval=2)
    with pytest.raises(FloatingPointError) as e:
        train(cfg)
    msg = str(e.value)
    assert "step_0000002" in msg and "--override --optim.lr" in msg
    assert "fp32" not in msg  # the run already computes in fp32
    ckpts = tmp_path / "r" / "checkpoints"
    assert (ckpts / "diverged_step_0000004").is_dir() and not (ckpts / "step_0000004").exists()
    assert checkpoint.find_latest(tmp_path / "r").name == "step_0000002"
    w = load_file(ckpts / "step_0000002" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in w.values())


def test_resume_with_override_changes_the_lr_and_records_it(corpus, tmp_path, monkeypatch):
    cfg = tiny_cfg(corpus, tmp_path / "r", max_steps=8, eval_interval=0, ckpt_interval=2)
    with monkeypatch.context() as m:
        _diverge_at(m, 4)
        with pytest.raises(FloatingPointError):
            train(cfg)
    lower = from_dict(type(cfg), to_dict(cfg))
    lower.optim = OptimConfig(**{**to_dict(cfg.optim), "lr": cfg.optim.lr / 4})
    with pytest.raises(FileExistsError, match="resume it with --override"):
        train(lower)
    s = train(lower, override=True)
    assert s.overrides == [{"step": 2, "changes": [f"optim.lr: {cfg.optim.lr!r} vs "
                                                   f"{cfg.optim.lr / 4!r}"]}]
    assert summary(tmp_path / "r")["overrides"] == s.overrides
    marks = [r for r in rows(tmp_path / "r") if r["split"] == "override"]
    assert [r["step"] for r in marks] == [2]
    assert [r["step"] for r in train_rows(tmp_path / "r")] == list(range(1, 9))


def test_override_cannot_change_the_model(corpus, tmp_path):
    cfg = tiny_cfg(corpus, tmp_path / "r", max_steps=2, eval_interval=0)
    train(cfg)
    other = from_dict(type(cfg), to_dict(cfg))
    other.model.n_layer = 3
    with pytest.raises(FileExistsError, match="model.n_layer"):
        train(from_dict(type(other), to_dict(other)), override=True)


# --- bad input: refused before any work, with the field and the fix --------------------------


@pytest.mark.parametrize("section, field, value, match", [
    ("optim", "grad_clip", -1.0, r"optim\.grad_clip=-1.0 must be >= 0"),
    ("optim", "weight_decay", -0.1, r"optim\.weight_decay=-0.1 must be >= 0"),
    ("optim", "lr", float("nan"), r"optim\.lr=nan must be a positive number"),
    ("optim", "lr", float("inf"), r"optim\.lr=inf must be a positive number"),
    ("optim", "beta2", 1.0, r"optim\.beta2=1.0 must be in \[0, 1\)"),
    ("optim", "eps", 0.0, r"optim\.eps=0.0 must be a small positive number"),
    ("model", "init_std", 0.0, r"model\.init_std=0.0 must be a positive number"),
    ("model", "rope_scale", 0.0, r"model\.rope_scale=0.0 must be a positive number"),
    ("train", "batch_size", "abc", r"train\.batch_size='abc' must be of type int"),
    ("data", "encoding", "klingon", r"data\.encoding='klingon' is not a known text encoding"),
])
def test_bad_fields_are_refused_with_their_path(section, field, value, match):
    d = to_dict(PRESETS["tiny"]())
    d[section][field] = value
    with pytest.raises(ValueError, match=match):
        from_dict(type(PRESETS["tiny"]()), d)


@pytest.mark.parametrize("args, match", [
    (["--temperature", "-1"], "temperature=-1.0 must be a number >= 0"),
    (["--temperature", "nan"], "temperature=nan"),
    (["--top_p", "1.5"], r"top_p=1.5 must be in \(0, 1\]"),
    (["--top_p", "-0.5"], r"top_p=-0.5 must be in \(0, 1\]"),
    (["--top_k", "0"], "top_k=0 must be >= 1"),
    (["--top_k", "-3"], "top_k=-3 must be >= 1"),
    (["--max_new_tokens", "-5"], "'-5' is not an integer >= 0"),
    (["--num_samples", "0"], "'0' is not a positive integer"),
    (["--top_p", "1.0", "--temperature", "0.5"], "no-run does not exist"),  # valid: gets further
])
def test_generate_refuses_bad_sampling_settings(tmp_path, args, match):
    r = cli("generate", str(tmp_path / "no-run"), *args, check_rc=2)
    assert re.search(match, r.stderr) and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("args, match", [
    (["eval", "RUN", "--batch_size", "0"], "'0' is not a positive integer"),
    (["train", "--preset", "tiny", "--train.device", "foo"], "'foo' is not a device name"),
    (["train", "--preset", "tiny", "--train.device", "cuda:7"], "cuda:7 asked for"),
])
def test_bad_arguments_exit_2_with_a_message(tmp_path, args, match):
    args = [str(tmp_path) if a == "RUN" else a for a in args]
    if torch.cuda.device_count() > 7 and "cuda:7" in args:
        pytest.skip("this machine has a cuda:7")
    r = cli(*args, "--train.out_dir", str(tmp_path / "o")) if args[0] == "train" else cli(*args)
    assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_train_on_a_prepared_directory_needs_only_its_path(corpus, tmp_path):
    """The README's recipe: `prepare --data.source X --data.data_dir D`, then `train
    --data.data_dir D` alone trains on D (the preset's source is not re-prepared into it); any
    other --data flag keeps the check that D holds what those flags would prepare."""
    d = str(tmp_path / "d")
    cli("prepare", "--preset", "tiny", "--data.source", str(corpus), "--data.data_dir", d,
        check_rc=0)
    steps = ("--train.max_steps", "2", "--train.eval_interval", "2", "--train.eval_tokens", "256")
    r = cli("train", "--preset", "tiny", "--data.data_dir", d, *steps,
            "--train.out_dir", str(tmp_path / "run"), check_rc=0)
    assert f"using the data prepared in {d} (from {corpus}" in r.stdout
    r = cli("train", "--preset", "tiny", "--data.data_dir", d, "--data.seed", "3", *steps,
            "--train.out_dir", str(tmp_path / "run2"), check_rc=2)
    assert "holds data prepared from something else" in r.stderr
    assert not (tmp_path / "run2").exists()


def test_an_unwritable_out_dir_is_an_error_not_a_traceback(corpus, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    cfg = tiny_cfg(corpus, tmp_path / "file" / "run", max_steps=2, eval_interval=0)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(to_dict(cfg)))
    r = cli("train", "--config", str(path), check_rc=2)
    assert "file/run" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("kw, match", [
    ({"tokens_per_param": "abc"}, "sweep tokens_per_param='abc' must be of type float"),
    ({"sizes": [2]}, r"sweep sizes\[0\]=2 must be of type str"),
    ({"set": ["train.batch_size=abc"]}, "train.batch_size='abc' must be of type int"),
    ({"sizes": ["2x30h2"]}, "size '2x30h2' gives an invalid model: RoPE needs an even"),
])
def test_sweep_values_of_the_wrong_type_are_named(kw, match):
    kw.setdefault("tokens_per_param", 1.0)
    with pytest.raises(ValueError, match=match):
        plan_sweep(SweepConfig(**kw))


def test_sweep_file_of_the_wrong_type_exits_2(tmp_path):
    (tmp_path / "s.toml").write_text('tokens_per_param = "abc"\n')
    r = cli("sweep", str(tmp_path / "s.toml"), "--dry-run", check_rc=2)
    assert "tokens_per_param='abc'" in r.stderr and "Traceback" not in r.stderr


# --- text that is not what it claims to be ---------------------------------------------------


def test_text_that_is_not_utf8_is_refused_with_file_and_offset(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        text = f"Scene {i}. caf\xe9 and cr\xe8me.\n\n" * 40
        (src / f"d{i}.txt").write_bytes(text.encode("latin-1"))
    cfg = DataConfig(source=str(src), data_dir=str(tmp_path / "out"), vocab_size=300)
    with pytest.raises(ValueError, match=r"d0\.txt is not valid utf-8 text: .* at byte 12"):
        prepare(cfg, progress=False)
    assert not (tmp_path / "out").exists()
    out = prepare(DataConfig(source=str(src), data_dir=str(tmp_path / "out"), vocab_size=300,
                             encoding="latin-1"), progress=False)
    assert (out / "train.bin").stat().st_size > 0


def test_a_killed_prepares_temp_directory_is_cleaned_next_time(fresh_corpus, tmp_path):
    dead = tmp_path / ".out.tmp-999999999-abcd"  # a process id no process has
    dead.mkdir()
    (dead / "train.bin").write_bytes(b"half")
    prepare(DataConfig(source=str(fresh_corpus), data_dir=str(tmp_path / "out"), vocab_size=300,
                       val_fraction=0.25), progress=False)
    assert not dead.exists() and (tmp_path / "out" / "meta.json").exists()


def test_warnings_go_to_stderr_not_into_generated_text(corpus, tmp_path):
    cfg = tiny_cfg(corpus, tmp_path / "r", max_steps=4, eval_interval=0, ckpt_interval=2)
    train(cfg)
    (tmp_path / "r" / "checkpoints" / "step_0000004" / "state.pt").write_bytes(b"damaged")
    r = cli("generate", str(tmp_path / "r"), "--max_new_tokens", "5", "--prompt", "A",
            check_rc=0)
    assert "warning" not in r.stdout and "skipping checkpoint" in r.stderr


# --- the fault-injection campaign ------------------------------------------------------------

ROW_TIMING = ("tok_per_s", "ms_per_step")


def _last_step(ckpts: Path) -> int:
    """The newest complete checkpoint's step (0 when none)."""
    steps = [int(p.name.removeprefix("step_")) for p in ckpts.glob("step_*")
             if p.name.removeprefix("step_").isdigit()]
    return max(steps, default=0)


@pytest.mark.slow
def test_sigkill_at_random_points_resumes_to_the_uninterrupted_run(corpus, tmp_path):
    """SIGKILL a tiny run at 20 random moments (start-up, steps, checkpoint saves every step),
    rerunning after each: the same trajectory, weights, metrics rows and summary as an
    uninterrupted run, and no temporary file left. Start-up kills are scaled to a timed rerun of
    the finished reference; step kills wait for their step's checkpoint, then land within a step."""
    kw = dict(max_steps=200, eval_interval=50, ckpt_interval=1)
    cmds = {}
    for name in ("ref", "run"):
        cfg = tiny_cfg(corpus, tmp_path / name, **kw)
        (tmp_path / f"{name}.json").write_text(json.dumps(to_dict(cfg)))
        cmds[name] = [sys.executable, "-m", "structlm", "train", "--config",
                      str(tmp_path / f"{name}.json")]
    t0 = time.time()
    subprocess.run(cmds["ref"], check=True, capture_output=True)
    t1 = time.time()
    subprocess.run(cmds["ref"], check=True, capture_output=True)  # finished: start-up only
    startup, work = time.time() - t1, max(t1 - t0 - (time.time() - t1), 1.0)
    cmd = cmds["run"]
    rng, kills, start = random.Random(1005), 0, time.time()
    # 4 kills in start-up, 16 at random steps (in order): each waits for its step's checkpoint, so
    # the campaign spreads over the run whatever this machine's speed
    targets = [0] * 4 + sorted(rng.sample(range(5, 195), 16))
    ckpts = tmp_path / "run" / "checkpoints"
    for target in targets:
        if time.time() - start > 600:
            break
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if target == 0:
            time.sleep(startup * rng.uniform(0.2, 0.9))
        else:
            while proc.poll() is None and _last_step(ckpts) < target:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, work / 200))  # somewhere inside the next step
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
            break
        proc.kill()
        proc.wait()
        kills += 1
    print(f"{kills} kills landed (start-up {startup:.1f} s, work {work:.1f} s)")
    assert kills >= 10, f"only {kills} kills landed"
    subprocess.run(cmd, check=True, capture_output=True)
    untimed_rows = lambda run: [{k: v for k, v in r.items() if k not in ROW_TIMING}  # noqa: E731
                                for r in rows(run) if r["split"] != "override"]
    assert untimed_rows(tmp_path / "run") == untimed_rows(tmp_path / "ref")
    assert untimed(summary(tmp_path / "run"))["final_val_loss"] == summary(tmp_path / "ref")[
        "final_val_loss"]
    ref_s, run_s = untimed(summary(tmp_path / "ref")), untimed(summary(tmp_path / "run"))
    ref_s.pop("out_dir"), run_s.pop("out_dir"), ref_s.pop("config"), run_s.pop("config")
    assert run_s == ref_s
    a, _ = load_model(tmp_path / "ref")
    b, _ = load_model(tmp_path / "run")
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    left = [p for p in (tmp_path / "run").rglob("*") if ".tmp" in p.name or ".old_" in p.name]
    assert not left, left


def test_a_truncated_summary_is_named_by_report_and_scaling(corpus, tmp_path):
    train(tiny_cfg(corpus, tmp_path / "r", max_steps=2, eval_interval=0))
    (tmp_path / "r" / "summary.json").write_text('{"out_dir": "r", "ste')
    for cmd in (["report", str(tmp_path / "r")], ["scaling", str(tmp_path / "r")]):
        r = cli(*cmd, check_rc=2)
        assert "r/summary.json is damaged" in r.stderr and "Traceback" not in r.stderr, r.stderr
