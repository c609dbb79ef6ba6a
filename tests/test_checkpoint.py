"""Checkpoints: exact round trip, atomicity, and refusal of incomplete or corrupt ones."""

import pytest
import torch

from structlm.config import PRESETS
from structlm.model.gpt import GPT
from structlm.runs import checkpoint
from structlm.runs.run import load_model
from structlm.training.optim import make_optimizer


@pytest.fixture
def setup():
    cfg = PRESETS["tiny"]()
    model = GPT(cfg.model)
    opt = make_optimizer(model, cfg.optim)
    x = torch.randint(0, cfg.model.vocab_size, (2, 9))
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    opt.step()
    return cfg, model, opt


def test_round_trip_is_exact(setup, tmp_path):
    cfg, model, opt = setup
    ckpt = checkpoint.save(tmp_path, model, opt, cfg, 7, {"best_val": 1.5})
    loaded, cfg2 = load_model(tmp_path)
    assert cfg2 == cfg
    for (n, p), q in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    assert loaded.lm_head.weight is loaded.wte.weight  # tying survives the round trip
    state = checkpoint.load_state(ckpt)
    assert state["step"] == 7 and state["best_val"] == 1.5
    opt2 = make_optimizer(loaded, cfg.optim)
    opt2.load_state_dict(state["optimizer"])
    for a, b in zip(opt.state.values(), opt2.state.values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"])


def test_keeps_last_k_and_latest_pointer(setup, tmp_path):
    cfg, model, opt = setup
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, model, opt, cfg, step, {}, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_0000003", "step_0000004"]
    assert checkpoint.find_latest(tmp_path).name == "step_0000004"


def test_half_written_checkpoint_is_never_latest(setup, tmp_path, capsys):
    """A save killed before its manifest (or mid-rename) leaves the previous checkpoint as the
    latest."""
    cfg, model, opt = setup
    checkpoint.save(tmp_path, model, opt, cfg, 1, {})
    good = checkpoint.save(tmp_path, model, opt, cfg, 2, {})
    # killed mid-save: a temp dir and a step dir without manifest, pointer still at step 2
    (tmp_path / "checkpoints" / ".tmp_step_0000003").mkdir()
    partial = tmp_path / "checkpoints" / "step_0000003"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 10)
    assert checkpoint.find_latest(tmp_path) == good
    # the pointer names the partial one (killed between rename and pointer write is impossible,
    # but be robust)
    (tmp_path / "checkpoints" / "latest").write_text("step_0000003")
    assert checkpoint.find_latest(tmp_path) == good
    assert "incomplete" in capsys.readouterr().err  # a warning: stderr, never mixed into output


def test_truncated_checkpoint_is_refused(setup, tmp_path):
    cfg, model, opt = setup
    first = checkpoint.save(tmp_path, model, opt, cfg, 1, {})
    second = checkpoint.save(tmp_path, model, opt, cfg, 2, {})
    f = second / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        checkpoint.load_state(second)
    assert checkpoint.find_latest(tmp_path) == first


def test_checkpoint_of_another_model_is_refused(setup, tmp_path):
    cfg, model, opt = setup
    ckpt = checkpoint.save(tmp_path, model, opt, cfg, 1, {})
    other = PRESETS["tiny"]().model
    other.ffn.rank = 8
    with pytest.raises(checkpoint.CheckpointError, match="does not fit"):
        checkpoint.load_weights(GPT(other), ckpt)


def test_load_model_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_model(tmp_path)
