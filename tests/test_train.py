"""End-to-end training: loss falls, one batch overfits, resume is exact, bad input fails early, DDP
matches."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import crash_and_resume, tiny_cfg, train_rows

from structlm.config import PRESETS, LinearSpec, ModelConfig, from_dict, to_dict
from structlm.model.gpt import GPT
from structlm.runs import checkpoint
from structlm.runs.run import load_model
from structlm.training import train
from structlm.training.optim import lr_at


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = PRESETS["tiny"]().optim
    lrs = [lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(cfg.lr / 10)  # warm-up of 10 steps: (0+1)/10
    assert lrs[9] == pytest.approx(cfg.lr)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lr_at(100, cfg, 100) == pytest.approx(0.1 * cfg.lr)


def test_loss_decreases_and_artifacts_written(corpus, tmp_path):
    s = train(tiny_cfg(corpus, tmp_path / "run", max_steps=30))
    rows = train_rows(tmp_path / "run")
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    for f in ("config.json", "metrics.jsonl", "summary.json", "loss.png", "tokenizer.json"):
        assert (tmp_path / "run" / f).exists(), f
    assert checkpoint.find_latest(tmp_path / "run").name == "step_0000030"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["final_val_loss"] == pytest.approx(s.final_val_loss)
    assert summary["tokens"] == 30 * 8 * 32


def test_the_final_evaluation_covers_final_eval_tokens(corpus, tmp_path):
    """The final validation loss (summary.json) is the trained model's loss on the first
    final_eval_tokens of the split in micro-batch windows; None covers the whole split."""
    from structlm.data.batches import eval_batches, load_tokens
    from structlm.runs.evaluate import evaluate

    cfg = tiny_cfg(corpus, tmp_path / "run", max_steps=4, eval_interval=0, final_eval_tokens=256)
    s = train(cfg)
    model, _ = load_model(tmp_path / "run")
    val = load_tokens(cfg.data.data_dir, "val")
    cpu = torch.device("cpu")
    for tokens, want in ((256, s.final_val_loss), (None, None)):
        res = evaluate(model, eval_batches(val, 32, cfg.train.micro_batch_size, tokens), cpu)
        if want is not None:
            assert res["tokens"] == 256 and res["loss"] == pytest.approx(want, rel=1e-5)
        else:  # the whole split: another number, so the bound took effect
            assert res["tokens"] > 256 and res["loss"] != pytest.approx(s.final_val_loss, rel=1e-5)


def test_overfit_one_batch():
    """A tiny structured model memorises one batch (llm.c's --overfit_single_batch)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=32, d_ff=128,
                      ffn=LinearSpec("blockshuffle", nblocks=2))
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    x = torch.randint(0, 64, (4, 17))
    for _ in range(150):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_resume_reproduces_uninterrupted_run(corpus, tmp_path, monkeypatch):
    """A run that crashes at step 13 and resumes from its step-10 checkpoint logs exactly the same
    losses."""
    crash_and_resume(lambda out: tiny_cfg(corpus, out), tmp_path, monkeypatch)
    a, b = train_rows(tmp_path / "a"), train_rows(tmp_path / "b")
    # rows of the lost steps 11-13 were not kept twice
    assert [r["step"] for r in b] == list(range(1, 21))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # exact, fp32 on CPU
    wa = checkpoint.find_latest(tmp_path / "a")
    ma, _ = load_model(wa)
    mb, _ = load_model(tmp_path / "b")
    for (n, p), q in zip(ma.state_dict().items(), mb.state_dict().values(), strict=True):
        assert torch.equal(p, q), n


def test_sigkill_then_resume_loses_nothing(corpus, tmp_path):
    """SIGKILL a training process mid-run; the rerun resumes from the last complete checkpoint and
    ends with exactly the weights of an uninterrupted run."""
    ref = tiny_cfg(corpus, tmp_path / "ref", max_steps=40, eval_interval=0, ckpt_interval=4)
    train(ref)
    cfg = tiny_cfg(corpus, tmp_path / "killed", max_steps=40, eval_interval=0, ckpt_interval=4)
    cfg_path = tmp_path / "killed.json"
    cfg_path.write_text(json.dumps(to_dict(cfg)))
    cmd = [sys.executable, "-m", "structlm", "train", "--config", str(cfg_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 13:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.find_latest(tmp_path / "killed") is not None
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    a, b = train_rows(tmp_path / "ref"), train_rows(tmp_path / "killed")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    ma, _ = load_model(tmp_path / "ref")
    mb, _ = load_model(tmp_path / "killed")
    for p, q in zip(ma.state_dict().values(), mb.state_dict().values(), strict=True):
        assert torch.equal(p, q)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    import structlm.model.gpt as M

    real = M.cross_entropy
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] > 14 else out

    monkeypatch.setattr(M, "cross_entropy", poisoned)
    with pytest.raises(FloatingPointError, match="step_0000010"):
        train(tiny_cfg(corpus, tmp_path / "nan", eval_interval=0, ckpt_interval=5))
    assert checkpoint.find_latest(tmp_path / "nan").name == "step_0000010"


def test_out_dir_with_a_different_run_is_refused(corpus, tmp_path):
    train(tiny_cfg(corpus, tmp_path / "r", max_steps=2, eval_interval=0))
    other = tiny_cfg(corpus, tmp_path / "r", max_steps=2, eval_interval=0)
    other.model.ffn = LinearSpec("lowrank", rank=8)
    with pytest.raises(FileExistsError, match=r"model\.ffn\.rank: 16 vs 8"):
        train(other)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a structlm run"):
        train(tiny_cfg(corpus, tmp_path / "junk"))
    assert (tmp_path / "junk" / "notes.txt").read_text() == "mine"


def test_data_vocab_larger_than_model_is_refused(corpus, tmp_path):
    cfg = tiny_cfg(corpus, tmp_path / "v")
    cfg.model.vocab_size = 280
    with pytest.raises(ValueError, match="set --model.vocab_size 300"):
        train(from_dict(type(cfg), to_dict(cfg)))
    assert not (tmp_path / "v").exists()


def test_a_tokenizer_larger_than_the_model_is_refused_before_preparing(corpus, fresh_corpus,
                                                                       tmp_path):
    train(tiny_cfg(corpus, tmp_path / "donor", max_steps=1, eval_interval=0))  # a 300-token BPE
    cfg = tiny_cfg(fresh_corpus, tmp_path / "run")
    cfg.data.tokenizer = str(tmp_path / "donor" / "tokenizer.json")
    cfg.data.data_dir = str(tmp_path / "prepared")
    cfg.model.vocab_size = 280
    with pytest.raises(ValueError, match=r"tokenizer.json \(300\) exceeds model.vocab_size=280"):
        train(from_dict(type(cfg), to_dict(cfg)))
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "run").exists()


def test_missing_corpus_fails_before_anything_is_written(tmp_path):
    cfg = tiny_cfg(tmp_path / "nope", tmp_path / "run")
    with pytest.raises((FileNotFoundError, ValueError), match="nope"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_bad_init_from_and_missing_tensorboard_fail_before_the_data(fresh_corpus, tmp_path,
                                                                   monkeypatch):
    """Checked before the corpus is prepared or a run directory made: an init_from that holds
    no model, one of another shape, dense guides from a run that has none, TensorBoard absent."""
    donor = tmp_path / "donor"
    train(tiny_cfg(fresh_corpus, donor, max_steps=1, eval_interval=0))
    prepared = fresh_corpus.with_name(fresh_corpus.name + "-prepared")
    shutil.rmtree(prepared)
    cases = [({"init_from": str(tmp_path / "nowhere")}, FileNotFoundError,
              "--train.init_from: .*nowhere does not exist"),
             ({"init_from": str(donor)}, ValueError, "its model differs"),
             ({"init_from": str(donor)}, FileNotFoundError, "has no dense_ffn.safetensors")]
    for i, (kw, err, message) in enumerate(cases):
        cfg = tiny_cfg(fresh_corpus, tmp_path / f"run{i}", **kw)
        if i == 1:
            cfg.model.n_layer += 1
        if i == 2:
            cfg.train.sgt.mode, cfg.train.sgt.guide_init = "fixedstep", "dense"
        with pytest.raises(err, match=message):
            train(from_dict(type(cfg), to_dict(cfg)))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install 'structlm\[tensorboard\]'"):
        train(tiny_cfg(fresh_corpus, tmp_path / "tb", tensorboard=True))
    assert not prepared.exists()
    assert not any((tmp_path / n).exists() for n in ("run0", "run1", "run2", "tb"))


def test_ddp_two_processes_match_one(corpus, tmp_path):
    """torchrun with 2 gloo processes, each reading half of every global batch, follows the
    1-process run."""
    one = tiny_cfg(corpus, tmp_path / "one", max_steps=6, eval_interval=0)
    one.train.micro_batch_size = 4  # 2 micro-steps of 4 in one process; 1 of 4 per rank in two
    two = tiny_cfg(corpus, tmp_path / "two", max_steps=6, eval_interval=0)
    two.train.micro_batch_size = 4
    train(one)
    path = tmp_path / "two.json"
    path.write_text(json.dumps(to_dict(two)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "structlm", "train", "--config", str(path)],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = train_rows(tmp_path / "one"), train_rows(tmp_path / "two")
    assert len(a) == len(b) == 6
    for ra, rb in zip(a, b, strict=True):
        assert math.isclose(ra["loss"], rb["loss"], rel_tol=1e-4), (ra, rb)


@pytest.mark.parametrize("mode", ["block", "selective"])
def test_activation_checkpointing_recomputes_the_same_numbers(corpus, tmp_path, mode):
    """Recomputing activations in the backward changes memory, not the trajectory (fp32)."""
    cfg = tiny_cfg(corpus, tmp_path / "none", max_steps=4, eval_interval=0)
    cfg.model.ffn = LinearSpec("blockdense", rank=16, nblocks=2)
    train(cfg, progress=False)
    cfg.train.out_dir, cfg.train.activation_checkpointing = str(tmp_path / mode), mode
    train(cfg, progress=False)
    for a, b in zip(train_rows(tmp_path / "none"), train_rows(tmp_path / mode), strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-6) and math.isclose(
            a["gnorm"], b["gnorm"], rel_tol=1e-5), (a, b)


@pytest.mark.slow
def test_compiled_blocks_follow_the_eager_run(corpus, tmp_path):
    """--train.compile compiles each block (torch.compile, inductor): same losses as eager."""
    cfg = tiny_cfg(corpus, tmp_path / "eager", max_steps=3, eval_interval=0)
    train(cfg, progress=False)
    cfg.train.out_dir, cfg.train.compile = str(tmp_path / "compiled"), True
    train(cfg, progress=False)
    for a, b in zip(train_rows(tmp_path / "eager"), train_rows(tmp_path / "compiled"),
                    strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a, b)
