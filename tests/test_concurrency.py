"""Two commands on one thing, in real processes: the second stops naming the first, a lock left by
a killed process is taken over, and what is published belongs to one command only."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from structlm.utils.locks import Busy, exclusive, lock_path

PREPARE = ["--data.vocab_size", "300", "--data.workers", "1", "--data.val_fraction", "0.2"]

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from structlm.utils.locks import exclusive, lock_path
    with exclusive(lock_path(Path(sys.argv[1])), "x", "y"):
        print("held", flush=True)
        time.sleep(60)
""")


def structlm(*args, **kw):
    return subprocess.run([sys.executable, "-m", "structlm", *args], capture_output=True,
                          text=True, **kw)


def hold_lock(target):
    """A process that holds `target`'s lock until it is killed."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    holder = hold_lock(tmp_path / "thing")
    try:
        busy = pytest.raises(Busy, match=rf"the thing is in use by process {holder.pid} on ")
        with busy, exclusive(lock_path(tmp_path / "thing"), "the thing", "wait"):
            pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive(lock_path(tmp_path / "thing"), "the thing", "wait"):  # a dead holder's lock
        info = json.loads(lock_path(tmp_path / "thing").read_text())
        assert info["pid"] == os.getpid()


def test_prepare_refuses_a_data_dir_another_prepare_holds(fresh_corpus, tmp_path):
    out = tmp_path / "data"
    holder = hold_lock(out)
    try:
        r = structlm("prepare", "--data.source", str(fresh_corpus), "--data.data_dir", str(out),
                     *PREPARE)
        assert r.returncode == 2 and f"in use by process {holder.pid}" in r.stderr, r.stderr
        assert "--data.data_dir" in r.stderr and "Traceback" not in r.stderr
        assert not out.exists() and not (tmp_path / ".data.partial").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    r = structlm("prepare", "--data.source", str(fresh_corpus), "--data.data_dir", str(out),
                 *PREPARE)  # the killed holder's lock is taken over
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "meta.json").read_text())["split_seed"] == 1005


def _tokens(d) -> int:
    meta = json.loads((d / "meta.json").read_text())
    return meta["train_tokens"] + meta["val_tokens"]


def test_two_prepares_with_other_settings_never_mix(fresh_corpus, tmp_path):
    """The reported defect: two seeds into one directory at once published a mixture with exit
    0. Now one publishes, the other exits 2, and the data equals a clean prepare of its seed."""
    out = tmp_path / "data"
    cmds = [[sys.executable, "-m", "structlm", "prepare", "--data.source", str(fresh_corpus),
             "--data.data_dir", str(out), *PREPARE, "--data.seed", str(seed)] for seed in (1, 7)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "in use by process" in loser or "prepared from something else" in loser, loser
    seed = json.loads((out / "meta.json").read_text())["split_seed"]
    clean = tmp_path / "clean"
    r = structlm("prepare", "--data.source", str(fresh_corpus), "--data.data_dir", str(clean),
                 *PREPARE, "--data.seed", str(seed))
    assert r.returncode == 0, r.stderr
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
    assert _tokens(out) == _tokens(clean)


SCRIPT = """
from structlm.config import DataConfig
from structlm.data.prepare import prepare
prepare(DataConfig(source={src!r}, data_dir={out!r}, vocab_size=300, workers=2,
                   val_fraction=0.2), progress=False)
print("prepared", flush=True)
"""


@pytest.mark.parametrize("how", ["stdin", "unguarded-file"])
def test_prepare_from_a_script_workers_cannot_start_from_still_finishes(fresh_corpus, tmp_path,
                                                                         how):
    """Spawned workers import the main module again: from `python -` (standard input) they cannot,
    and a script without a __main__ guard makes them run it. The pool used to respawn them
    forever; now the tasks run in this process, said once, with the same result."""
    out = tmp_path / "data"
    code = SCRIPT.format(src=str(fresh_corpus), out=str(out))
    if how == "stdin":
        r = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True,
                           timeout=300)
    else:
        (tmp_path / "script.py").write_text(code)
        r = subprocess.run([sys.executable, str(tmp_path / "script.py")], capture_output=True,
                           text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and "prepared" in r.stdout, r.stderr[-2000:]
    assert "tokenizing in this process instead of worker processes" in r.stderr
    clean = tmp_path / "clean"
    r = structlm("prepare", "--data.source", str(fresh_corpus), "--data.data_dir", str(clean),
                 *PREPARE)
    assert r.returncode == 0, r.stderr
    assert (out / "train.bin").read_bytes() == (clean / "train.bin").read_bytes()


def train_args(corpus, data, out, *extra):
    return ["train", "--preset", "tiny", "--data.source", str(corpus), "--data.data_dir",
            str(data), "--data.vocab_size", "300", "--model.vocab_size", "300",
            "--data.val_fraction", "0.2", "--train.max_steps", "30", "--train.eval_interval",
            "10", "--train.eval_tokens", "1024", "--train.dtype", "fp32", "--train.out_dir",
            str(out), *extra]


def test_train_refuses_a_run_directory_another_command_holds(corpus, tmp_path):
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        r = structlm(*train_args(corpus, tmp_path / "data", out))
        assert r.returncode == 2 and f"in use by process {holder.pid}" in r.stderr, r.stderr
        assert "--train.out_dir" in r.stderr and "Traceback" not in r.stderr
        assert not out.exists() and not (tmp_path / "data").exists()  # nothing read or written
        r = structlm("train", "--resume", str(out))  # --resume of a run that is training
        assert r.returncode == 2
    finally:
        holder.kill()
        holder.wait()


def test_two_trains_into_one_run_directory_keep_one_run(corpus, tmp_path):
    """The reported defect: both exited 0, the files were the second run's and metrics.jsonl
    interleaved both. Now one trains, the other exits 2, and every file is the winner's."""
    data, out = tmp_path / "data", tmp_path / "run"
    assert structlm("prepare", "--data.source", str(corpus), "--data.data_dir", str(data),
                    "--data.vocab_size", "300", "--data.val_fraction", "0.2").returncode == 0
    runs = {lr: [sys.executable, "-m", "structlm",
                 *train_args(corpus, data, out, "--optim.lr", lr)] for lr in ("3e-3", "1e-3")}
    procs = {lr: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for lr, c in runs.items()}
    done = {lr: (p.wait(), p.stderr.read()) for lr, p in procs.items()}
    assert sorted(rc for rc, _ in done.values()) == [0, 2], done
    winner = next(lr for lr, (rc, _) in done.items() if rc == 0)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["optim"]["lr"] == float(winner)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["optim"]["lr"] == float(winner) and summary["steps"] == 30
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 30  # one run's rows, once each
    assert not list(tmp_path.glob(".run.lock"))  # released and removed


@pytest.mark.slow
def test_racing_prepares_and_trains_with_random_kills_never_mix(tmp_path):
    """20 rounds of 2-4 processes racing `prepare` and `train` on two data and two run
    directories with random settings, some SIGKILLed at random moments. Afterwards every published
    data directory equals a clean prepare of the settings it records, and every file of a run
    (config, checkpoints, summary, metrics) belongs to that one run."""
    import random

    from conftest import write_corpus

    rng = random.Random(0)
    corpus = write_corpus(tmp_path / "corpus", n_docs=6, n_lines=120)
    datas = [tmp_path / f"data{i}" for i in range(2)]
    runs = [tmp_path / f"run{i}" for i in range(2)]
    for _ in range(20):
        procs = []
        for _ in range(rng.randint(2, 4)):
            data, seed = rng.choice(datas), rng.choice(["1", "7"])
            if rng.random() < 0.4:
                args = ["prepare", "--data.source", str(corpus), "--data.data_dir", str(data),
                        *PREPARE, "--data.seed", seed]
            else:
                args = train_args(corpus, data, rng.choice(runs), "--optim.lr",
                                  rng.choice(["3e-3", "1e-3"]), "--data.seed", seed,
                                  "--data.workers", "1")
            procs.append(subprocess.Popen([sys.executable, "-m", "structlm", *args],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        for p in procs:
            if rng.random() < 0.3:
                time.sleep(rng.uniform(0.5, 6.0))
                p.send_signal(signal.SIGKILL)
        for p in procs:
            rc = p.wait()
            err = p.stderr.read().decode(errors="replace")
            assert rc in (0, 2, -signal.SIGKILL), err[-2000:]
            assert rc != 2 or "Traceback" not in err, err[-2000:]
    for data in datas:
        if (data / "meta.json").exists():
            seed = str(json.loads((data / "meta.json").read_text())["split_seed"])
            clean = tmp_path / f"clean-{data.name}"
            assert structlm("prepare", "--data.source", str(corpus), "--data.data_dir",
                            str(clean), *PREPARE, "--data.seed", seed).returncode == 0
            for name in ("train.bin", "val.bin", "tokenizer.json"):
                assert (data / name).read_bytes() == (clean / name).read_bytes(), (data, name)
    for run in runs:
        if not (run / "config.json").exists():
            continue
        cfg = json.loads((run / "config.json").read_text())
        for ckpt in (run / "checkpoints").glob("step_*"):
            assert json.loads((ckpt / "config.json").read_text()) == cfg, ckpt
        if (run / "summary.json").exists():
            assert json.loads((run / "summary.json").read_text())["config"] == cfg
        steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()
                 if json.loads(ln).get("split") == "train"]
        assert steps == sorted(set(steps)), run


def test_a_failed_checkpoint_write_names_its_cause(tmp_path):
    """Two racing trains used to die with "Free disk space" when one removed the other's files."""
    import errno

    from structlm.runs import checkpoint

    for err, says, not_says in ((errno.ENOENT, "no other command writes", "Free disk space"),
                                (errno.ENOSPC, "Free disk space", "no other command"),
                                (errno.EACCES, "permissions", "Free disk space")):
        cls = PermissionError if err == errno.EACCES else OSError
        with pytest.raises(checkpoint.CheckpointError) as e:
            checkpoint._failed(tmp_path / "tmp", tmp_path / "step_1", cls(err, os.strerror(err)))
        assert says in str(e.value) and not_says not in str(e.value)


@pytest.mark.slow
def test_under_torchrun_one_rank_prints_the_summary(corpus, tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "-m", "structlm", *train_args(corpus, tmp_path / "data", tmp_path / "run",
                                                      "--train.max_steps", "4",
                                                      "--train.micro_batch_size", "4")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("done: ") == 1, r.stdout
