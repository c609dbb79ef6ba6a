"""Inputs from outside, refused with a message and exit code 2 before any work is lost: non-finite
imported weights, a prompt that is not UTF-8, a damaged or foreign tokenizer, a step that does
not fit in memory; and what is published has the user's umask, not a temporary's private mode."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import bpe_tokenizer, random_run, tiny_cfg
from safetensors.torch import load_file, save_file

from structlm.config import LinearSpec, ModelConfig
from structlm.linear.guided import wrap_guided
from structlm.model.gpt import GPT
from structlm.runs.export import export_run
from structlm.runs.run import Run
from structlm.training import train
from structlm.utils.units import amount


def structlm(*args, **kw):
    return subprocess.run([sys.executable, "-m", "structlm", *args], capture_output=True,
                          text=True, **kw)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    bpe_tokenizer(path, ["To be, or not to be, that is the question."] * 50)
    return path


@pytest.fixture
def run(tmp_path, tokenizer_path):
    return random_run(tmp_path, tokenizer_path, norm="layernorm", act="gelu", pos_emb="rope")[0]


def test_non_finite_imported_weights_are_refused_naming_the_tensor(run, tmp_path):
    pytest.importorskip("transformers")
    hf = export_run(run, tmp_path / "hf", format="hf-merged")
    weights = load_file(str(hf / "model.safetensors"))
    name = sorted(weights)[3]
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, str(hf / "model.safetensors"), metadata={"format": "pt"})
    r = structlm("import", str(hf), str(tmp_path / "imported"))
    assert r.returncode == 2 and name in r.stderr and "non-finite" in r.stderr, r.stderr
    assert not (tmp_path / "imported").exists()


def test_a_prompt_that_is_not_utf8_is_refused(run):
    r = subprocess.run([sys.executable, "-m", "structlm", "generate", str(run), "--prompt",
                        b"a\xff".decode("utf-8", "surrogateescape"), "--max_new_tokens", "2"],
                       capture_output=True)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 2 and "not valid UTF-8" in err and "Traceback" not in err, err


def test_a_damaged_tokenizer_is_named_by_generate_and_eval(run):
    (run / "tokenizer.json").write_bytes(os.urandom(300))
    for args in (["generate", str(run), "--prompt", "To be"], ["eval", str(run), "--text",
                                                               str(run / "config.json")]):
        r = structlm(*args)
        assert r.returncode == 2 and "tokenizer.json" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_another_models_tokenizer_is_refused(run, tmp_path):
    bpe_tokenizer(run / "tokenizer.json", ["Now is the winter of our discontent."] * 20, vocab=280)
    r = structlm("generate", str(run), "--prompt", "a", "--max_new_tokens", "2")
    assert r.returncode == 2 and "is not the tokenizer" in r.stderr, r.stderr


def test_out_of_memory_names_the_fix_and_leaves_no_run(corpus, tmp_path, monkeypatch):
    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 400000000000 bytes.")

    monkeypatch.setattr(GPT, "forward", no_memory)
    with pytest.raises(ValueError, match=r"ran out of memory.*--train.micro_batch_size.*"
                                         r"--train.activation_checkpointing block"):
        train(tiny_cfg(corpus, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def _modes(root):
    return {p.relative_to(root).as_posix(): p.stat().st_mode & 0o777
            for p in [root, *root.rglob("*")]}


def test_published_runs_checkpoints_and_exports_have_the_users_umask(corpus, run, tmp_path):
    pytest.importorskip("transformers")
    old = os.umask(0o022)
    try:
        train(tiny_cfg(corpus, tmp_path / "trained", max_steps=2, eval_interval=0))
        out = export_run(run, tmp_path / "hf", format="hf-merged")
    finally:
        os.umask(old)
    for root in (tmp_path / "trained", out):
        for name, mode in _modes(root).items():
            want = 0o755 if (root / name).is_dir() else 0o644
            assert mode == want, (root, name, oct(mode))


def test_a_killed_exports_leftover_is_removed_by_the_next(run, tmp_path):
    pytest.importorskip("transformers")
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    leftover = tmp_path / f".hf.export-{victim.pid}-abc123"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"x" * 1000)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    live = tmp_path / f".hf.export-{os.getpid()}-def456"  # a live process's own stays
    live.mkdir()
    export_run(run, tmp_path / "hf", format="hf-merged")
    assert not leftover.exists() and live.exists()


def test_guides_for_layers_the_model_lacks_are_refused():
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=32,
                            d_ff=64, ffn=LinearSpec("lowrank", rank=4), dense_ffn_layers=(0,)))
    good = {"blocks.1.mlp.fc1": torch.zeros(64, 32)}
    wrap_guided(GPT(model.cfg), guides=good)  # a real layer's guide is taken
    with pytest.raises(ValueError, match="no structured layer of this model.*model.blocks.1"):
        wrap_guided(model, guides={f"model.{k}": v for k, v in good.items()})


def test_small_amounts_are_not_rounded_to_zero_millions():
    assert amount(12_800, "tokens") == "12,800 tokens"
    assert amount(3_400_000, "tokens") == "3.4M tokens"


def test_a_run_opened_during_training_reads_its_last_complete_checkpoint(corpus, tmp_path):
    """eval/generate/export of a run being trained read its newest complete checkpoint; the run
    lock is only for writers."""
    cfg = tiny_cfg(corpus, tmp_path / "run", max_steps=400, eval_interval=10)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(__import__("structlm").to_dict(cfg)))
    p = subprocess.Popen([sys.executable, "-m", "structlm", "train", "--config", str(path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(600):
            if (tmp_path / "run" / "checkpoints" / "latest").exists():
                break
            time.sleep(0.1)
        assert Run.open(tmp_path / "run").ckpt is not None
        r = structlm("eval", str(tmp_path / "run"), "--max_tokens", "256", "--json")
        assert r.returncode == 0, r.stderr
    finally:
        p.kill()
        p.wait()
    shutil.rmtree(tmp_path / "run")
