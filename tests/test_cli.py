"""The command line end to end, in a temporary directory (subprocesses, as a user runs it)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import structlm
from structlm.cli.args import output_path, parse_run_config


def run(*args, cwd=None, check=True):
    r = subprocess.run([sys.executable, "-m", "structlm", *args], capture_output=True, text=True,
                       cwd=cwd)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    text = tmp / "corpus.txt"
    text.write_text("\n\n".join(f"KING {i}: Now is the winter of our discontent made glorious "
                                "summer." for i in range(400)))
    r = run("train", "--preset", "tiny", "--data.source", str(text),
            "--data.data_dir", str(tmp / "data"),
            "--data.vocab_size", "300", "--model.vocab_size", "300", "--train.max_steps", "6",
            "--train.out_dir", str(tmp / "run"), "--train.eval_interval", "3")
    assert "val ppl" in r.stdout and "structlm generate" in r.stdout
    return tmp


def test_train_writes_a_complete_run(trained):
    run_dir = trained / "run"
    for f in ("config.json", "metrics.jsonl", "summary.json", "loss.png", "tokenizer.json"):
        assert (run_dir / f).exists(), f
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_0000006"


def test_eval_on_val_split_and_on_text(trained):
    r = run("eval", str(trained / "run"), "--json")
    res = json.loads(r.stdout)
    summary = json.loads((trained / "run" / "summary.json").read_text())
    assert res["loss"] == pytest.approx(summary["final_val_loss"], rel=1e-3)
    assert summary["structlm_version"] == structlm.__version__
    other = trained / "other.txt"
    other.write_text("KING 7: Now is the winter of our discontent.\n" * 20)
    r = run("eval", str(trained / "run"), "--text", str(other), "--json")
    assert json.loads(r.stdout)["tokens"] > 0


def test_eval_windows_of_another_length(trained):
    """--seq_len: shorter windows than the training length (each scores fewer tokens of context),
    and a length beyond the model's context is refused."""
    full = json.loads(run("eval", str(trained / "run"), "--json").stdout)
    short = json.loads(run("eval", str(trained / "run"), "--json", "--seq_len", "16").stdout)
    assert short["tokens"] > 0 and short["loss"] != full["loss"]
    r = run("eval", str(trained / "run"), "--seq_len", "100000", check=False)
    assert r.returncode == 2 and "must be in 1.." in r.stderr


def test_generate_streams_text(trained):
    r = run("generate", str(trained / "run"), "--prompt", "KING", "--max_new_tokens", "12",
            "--seed", "1")
    assert r.stdout.startswith("KING") and len(r.stdout) > len("KING")
    again = run("generate", str(trained / "run"), "--prompt", "KING", "--max_new_tokens", "12",
                "--seed", "1")
    assert again.stdout == r.stdout  # seeded sampling is reproducible


def test_resume_of_a_finished_run_extends_it(trained, tmp_path):
    run_dir = tmp_path / "run"  # a copy: the other tests read the 6-step run, in any order
    shutil.copytree(trained / "run", run_dir)
    r = run("train", "--resume", str(run_dir), "--train.max_steps", "8")
    assert "resuming" in r.stdout
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8
    assert (trained / "run" / "checkpoints" / "latest").read_text() == "step_0000006"


def test_resume_refuses_a_checkpoint_dir_and_another_out_dir(trained):
    """A checkpoint is not a run: training into it would break its manifest. And --resume RUN
    with another --train.out_dir would silently start a fresh run there."""
    run_dir = trained / "run"
    ckpt = sorted((run_dir / "checkpoints").iterdir())[-1]
    before = sorted(p.name for p in ckpt.iterdir())
    for args in (["--resume", str(ckpt)], ["--preset", "tiny", "--train.out_dir", str(ckpt)]):
        r = run("train", *args, check=False)
        assert r.returncode == 2 and "this is a checkpoint, not a run directory" in r.stderr
        assert f"--resume {run_dir}" in r.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == before
    r = run("train", "--resume", str(run_dir), "--train.out_dir", str(trained / "other"),
            check=False)
    assert r.returncode == 2 and "drop --train.out_dir" in r.stderr
    assert "--train.init_from" in r.stderr
    assert not (trained / "other").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--model.bogus", "1"], "bogus"),
        (["train", "--model.n_layer", "many"], "many"),
        (["train", "--resume", "/nonexistent/run"], "does not exist"),
        (["train", "--preset", "nope"], "unknown preset"),
        (["info", "--model.ffn.rank", "100000"], "rank=100000"),
        (["eval", "/nonexistent/run"], "does not exist"),
        (["frobnicate"], "unknown command"),
        (["plan", "--flops=-1e20"], "--flops -1e+20 is not a positive number"),
        (["serve", "/nonexistent/run", "--port", "99999"], "is not a port number (0-65535)"),
        (["report", "/nonexistent/run", "--decode_batch", "0"], "'0' is not a positive integer"),
        (["bench", "ffn", "--quick", "--json", "/"], "is a folder; give a file name in it"),
        (["scaling", "/nonexistent/run", "--bootstrap", "0"], "'0' is not a positive integer"),
    ],
)
def test_bad_input_exits_2_with_a_message(args, message):
    r = run(*args, check=False)
    assert r.returncode == 2
    assert message in r.stderr


def test_help_lists_config_fields():
    r = run("train", "--help", check=False)
    assert "--model.ffn.kind" in r.stdout and "--train.max_steps" in r.stdout


def test_generate_help_loads_no_library():
    """`structlm generate --help` reads its options dataclass and nothing heavy: not the training
    loop, not matplotlib, not torch (whose import brings torch.distributed)."""
    code = ("import sys\nfrom structlm.cli import main\ntry:\n    main(['generate', '--help'])\n"
            "except SystemExit:\n    pass\n"
            "heavy = ('structlm.training.loop', 'matplotlib', 'torch.distributed', 'torch')\n"
            "print('LOADED', [m for m in heavy if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--max_new_tokens" in r.stdout and "LOADED []" in r.stdout


@pytest.mark.parametrize(
    "args, flags",
    [
        (["sweep"], ["--dry-run", "--tokens_per_param", "--sizes", "--structures", "--sgt"]),
        (["plan"], ["--flops", "--target_loss", "--from", "--bootstrap", "--extrapolate"]),
        (["bench", "ffn"], ["--quick", "--widths", "--tokens", "--kinds", "--json",
                            "--model.ffn.kind"]),
        (["export"], ["RUN_DIR", "OUT", "--format", "hf-merged", "gguf", "q8_0"]),
    ],
)
def test_help_lists_each_verbs_flags(args, flags):
    """Each verb's --help comes from its options dataclass: every flag, with its comment."""
    r = run(*args, "--help")
    for flag in flags:
        assert flag in r.stdout, flag


def test_switching_the_ffn_kind_drops_the_presets_hparams():
    """--model.ffn.kind blockshuffle --model.ffn.nblocks 4 on a LowRank preset (tiny: rank 16):
    the preset's rank is dropped before the overrides apply, however the flag is written."""
    for kind in (["--model.ffn.kind", "blockshuffle"], ["--model.ffn.kind=blockshuffle"]):
        cfg, _, _ = parse_run_config("structlm info", ["--preset", "tiny", *kind,
                                                        "--model.ffn.nblocks", "4"])
        assert (cfg.model.ffn.kind, cfg.model.ffn.nblocks) == ("blockshuffle", 4)
    cfg, _, _ = parse_run_config("structlm info", ["--preset", "tiny", "--model.ffn.rank", "8"])
    assert (cfg.model.ffn.kind, cfg.model.ffn.rank) == ("lowrank", 8)


def test_reuse_freed_memory_switch(monkeypatch):
    """The CLI's malloc setting: on by default (on glibc), off with STRUCTLM_MALLOC=system, and a
    bad value is named."""
    import platform

    from structlm.utils.device import reuse_freed_memory

    monkeypatch.setenv("STRUCTLM_MALLOC", "system")
    assert reuse_freed_memory() is False
    monkeypatch.setenv("STRUCTLM_MALLOC", "huge")
    with pytest.raises(ValueError, match="STRUCTLM_MALLOC='huge': choose reuse or system"):
        reuse_freed_memory()
    monkeypatch.delenv("STRUCTLM_MALLOC")
    assert reuse_freed_memory() is (platform.libc_ver()[0] == "glibc")


def test_output_files_get_their_folder_before_the_work(tmp_path):
    """--json/--plot/--md/--csv of a folder that does not exist yet: made at parse time, so a
    long benchmark does not lose its rows at the end."""
    target = tmp_path / "new" / "deeper" / "rows.jsonl"
    assert output_path(str(target)) == str(target)
    assert target.parent.is_dir() and not target.exists()


def test_version_is_one_string_everywhere():
    """`structlm --version`, `structlm.__version__` and the installed metadata agree."""
    from importlib.metadata import version

    assert structlm.__version__ == version("structlm")
    assert run("--version").stdout.strip() == f"structlm {structlm.__version__}"
