"""Self-guided training: the wrapper's math, the schedule, the step plan and its FLOPs, guide
removal, resume."""

import dataclasses
import importlib
import json

import pytest
import torch

from structlm.config import PRESETS, LinearSpec, SGTConfig, from_dict, to_dict
from structlm.linear import LINEARS, build_linear
from structlm.linear.guided import (
    GuidedLinear,
    guide_parameters,
    guided_layers,
    set_guide,
    unwrap_guided,
    wrap_guided,
)
from structlm.model.gpt import GPT
from structlm.runs import checkpoint
from structlm.runs.run import load_model
from structlm.training import train
from structlm.training.optim import lr_at
from structlm.training.sgt import guide_alpha, guide_draws, guide_forwards, make_plan

# isort: split
from helpers import tiny_cfg

SPECS = {
    "lowrank": LinearSpec("lowrank", rank=4),
    "blockdense": LinearSpec("blockdense", rank=8, nblocks=2),
    "blockshuffle": LinearSpec("blockshuffle", nblocks=4),
    "btt": LinearSpec("btt", rank=2, nblocks=4),
}


@pytest.mark.parametrize("kind", sorted(k for k in LINEARS if k != "dense"))
def test_alpha_one_is_the_guide_and_alpha_zero_the_structured_map(kind):
    layer = build_linear(SPECS[kind], 16, 24, dtype=torch.float64)
    torch.nn.init.normal_(layer.bias)
    g = GuidedLinear(layer).double()
    with torch.no_grad():
        g.guide.normal_()  # a guide that differs from the structured map
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    set_guide(g, 1.0)
    torch.testing.assert_close(g(x), x @ g.guide.T + layer.bias)
    set_guide(g, 0.0)
    torch.testing.assert_close(g(x), layer(x))
    set_guide(g, 0.3, active=[False])  # reduce_flop skipped the guide: pure structured, not scaled
    torch.testing.assert_close(g(x), layer(x))
    set_guide(g, 0.3)
    torch.testing.assert_close(g(x), 0.3 * (x @ g.guide.T) + 0.7 * layer.matmul(x) + layer.bias)


@pytest.mark.parametrize("kind", sorted(k for k in LINEARS if k != "dense"))
def test_exact_guide_init_equals_the_structured_map(kind):
    layer = build_linear(SPECS[kind], 16, 32, dtype=torch.float64)
    g = GuidedLinear(layer, init="exact")
    torch.testing.assert_close(g.guide.detach(), layer.to_dense())


def test_paper_guide_init_ignores_the_blockshuffle_shuffle():
    layer = build_linear(SPECS["blockshuffle"], 16, 32, dtype=torch.float64)
    w = GuidedLinear(layer, init="paper").guide.detach()
    expected = torch.block_diag(*layer.blkdiag2) @ torch.block_diag(*layer.blkdiag1)
    torch.testing.assert_close(w, expected)
    assert not torch.allclose(w, layer.to_dense())  # the reference's quirk: not the layer's map
    lr = build_linear(SPECS["lowrank"], 16, 32, dtype=torch.float64)
    torch.testing.assert_close(GuidedLinear(lr, init="paper").guide.detach(), lr.to_dense())


def test_unwrap_leaves_the_outputs_of_a_model_at_alpha_zero_unchanged():
    cfg = PRESETS["tiny"]().model
    model = GPT(cfg).double()
    wrap_guided(model)
    assert len(guided_layers(model)) == 2 * (cfg.n_layer - len(cfg.dense_ffn_layers))
    set_guide(model, 0.0)
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    before, _ = model(idx)
    guides = guide_parameters(model)
    assert unwrap_guided(model) is model
    after, _ = model(idx)
    torch.testing.assert_close(before, after)
    assert guides and not guided_layers(model)
    assert not any("guide" in n for n, _ in model.named_parameters())


def test_alpha_schedules():
    assert guide_alpha(0, 10) == 1.0
    assert guide_alpha(5, 10) == pytest.approx(0.5)
    assert guide_alpha(10, 10) == 0.0 and guide_alpha(50, 10) == 0.0
    assert guide_alpha(5, 10, "linear") == pytest.approx(0.5)
    assert guide_alpha(9, 10, "linear") == pytest.approx(0.1)
    cos = [guide_alpha(t, 100) for t in range(100)]
    assert all(a > b for a, b in zip(cos, cos[1:], strict=False))
    assert guide_forwards(100, "cosine", True) == pytest.approx(50.5)  # sum of alpha = G/2 + 1/2
    assert guide_forwards(100, "cosine", False) == 100


def test_reduce_flop_draws_are_reproducible_and_follow_alpha():
    a = [guide_draws(1005, s, 0, 8, 0.3) for s in range(500)]
    assert a == [guide_draws(1005, s, 0, 8, 0.3) for s in range(500)]
    rate = sum(map(sum, a)) / (500 * 8)
    assert 0.26 < rate < 0.34  # 4000 Bernoulli(0.3) draws: std 0.007


def _plan(size, spec, **sgt):
    cfg = PRESETS[f"paper-{size}"]()
    model = dataclasses.replace(cfg.model, ffn=spec)
    steps = int(cfg.train.max_tokens // 524288)
    return make_plan(SGTConfig(**sgt), model, steps, 524288, 1024)


@pytest.mark.parametrize(
    "size, ratio, steps, total, flops, dense",
    # docs/method.md §4.5: LowRank 32% fixedflop with reduce_flop; steps S -> S+G and FLOPs vs dense
    [
        ("s", 0.30, 4196, 5454, 1.693e18, 1.695e18),
        ("m", 0.38, 12779, 17635, 1.548e19, 1.548e19),
        ("l", 0.41, 27809, 39210, 7.016e19, 7.034e19),
        ("xl", 0.43, 48637, 69550, 2.099e20, 2.102e20),
    ],
)
def test_sgt_accounting_reproduces_the_paper(size, ratio, steps, total, flops, dense):
    d = PRESETS[f"paper-{size}"]().model.d_model
    p = _plan(size, LinearSpec("lowrank", rank=d // 4), mode="fixedflop", ratio=ratio,
              reduce_flop=True)
    assert (p.base_steps, p.total_steps) == (steps, total)
    assert float(f"{p.train_flops:.3e}") == flops
    assert float(f"{p.dense_train_flops:.3e}") == dense


@pytest.mark.parametrize("size, paper_ratio", [("s", 0.30), ("m", 0.38), ("l", 0.41), ("xl", 0.43)])
def test_match_flops_solves_the_papers_hand_tuned_ratio(size, paper_ratio):
    d = PRESETS[f"paper-{size}"]().model.d_model
    p = _plan(size, LinearSpec("lowrank", rank=d // 4), mode="fixedflop", match_flops="dense",
              reduce_flop=True)
    assert p.train_flops <= p.dense_train_flops
    assert abs(p.ratio - paper_ratio) < 0.005
    more = _plan(size, LinearSpec("lowrank", rank=d // 4), mode="fixedflop",
                 ratio=p.ratio + 2 / p.base_steps, reduce_flop=True)
    assert more.train_flops > p.dense_train_flops  # the largest G within the budget


def test_fixedflop_plan_replays_the_first_guided_batches():
    p = _plan("s", LinearSpec("lowrank", rank=192), mode="fixedflop", ratio=0.5)
    S, G = p.base_steps, p.guided_steps
    assert p.total_steps == S + G
    assert ([p.data_step(s) for s in (0, G - 1, G, S - 1, S, S + G - 1)]
            == [0, G - 1, G, S - 1, 0, G - 1])
    assert p.guided(G - 1) and not p.guided(G)
    fixed = _plan("s", LinearSpec("lowrank", rank=192), mode="fixedstep", ratio=0.5)
    assert fixed.total_steps == S and fixed.guided_steps == G
    off = _plan("s", LinearSpec("lowrank", rank=192))
    assert off.guided_steps == 0 and off.total_steps == S
    # the guides add the dense FFN's FLOPs for G steps (all of them without reduce_flop) ...
    guide = 3 * 524288 * 2 * 11 * 2 * 768 * 3072  # 11 structured blocks x fc1+fc2 guides
    assert fixed.train_flops - off.train_flops == pytest.approx(guide * G, rel=1e-12)
    # ... and docs/method.md §4.5's "+25% of dense-FFN FLOPs" with ratio 0.5 and reduce_flop
    # (mean alpha 1/2)
    halved = _plan("s", LinearSpec("lowrank", rank=192), mode="fixedstep", ratio=0.5,
                   reduce_flop=True)
    assert (halved.train_flops - off.train_flops) / (guide * S) == pytest.approx(0.25, abs=1e-3)


def test_fixedstep_always_ends_with_plain_steps():
    for sgt in ({"ratio": 1.0}, {"match_flops": "dense", "reduce_flop": True}):
        p = _plan("s", LinearSpec("lowrank", rank=192), mode="fixedstep", **sgt)
        assert p.guided_steps == p.base_steps - 1 == p.total_steps - 1


def test_sgt_needs_a_structured_ffn():
    cfg = PRESETS["tiny"]()
    d = to_dict(cfg)
    d["model"]["ffn"] = {"kind": "dense", "rank": None, "nblocks": None, "init": "default"}
    d["train"]["sgt"]["mode"] = "fixedflop"
    with pytest.raises(ValueError, match="needs a structured FFN"):
        from_dict(type(cfg), d)


def _sgt_cfg(corpus, out, **kw):
    kw = {"max_steps": 12, "eval_interval": 0, "ckpt_interval": 2, **kw}
    cfg = tiny_cfg(corpus, out, **kw)
    cfg.train.sgt = SGTConfig(mode="fixedflop", ratio=0.5, reduce_flop=True)
    return from_dict(type(cfg), to_dict(cfg))


def _losses(out):
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]




def test_training_removes_guides_and_their_optimizer_state(corpus, tmp_path):
    s = train(_sgt_cfg(corpus, tmp_path / "run"))
    assert s.sgt["guided_steps"] == 6 and s.steps == 18  # S=12, G=6, fixedflop
    ckpt = checkpoint.find_latest(tmp_path / "run")
    state = checkpoint.load_state(ckpt)
    # strict: a plain structured model, no guide keys
    model, _ = load_model(tmp_path / "run")
    n_params = len(list(model.parameters()))
    assert len(state["optimizer"]["state"]) == n_params
    assert sum(len(g["params"]) for g in state["optimizer"]["param_groups"]) == n_params
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert not any("guide" in k for k in f.keys())  # noqa: SIM118 (safe_open: no __iter__)
    # a checkpoint inside the guided phase does carry the guides (and resumes with them)
    train(_sgt_cfg(corpus, tmp_path / "early", keep_last=20))
    with safe_open(str(tmp_path / "early/checkpoints/step_0000002/model.safetensors"), "pt") as f:
        assert any("guide" in k for k in f.keys())  # noqa: SIM118 (safe_open: no __iter__)


# inside the guided phase; right after it (resuming from the checkpoint written as the guides left);
# inside the replay phase
@pytest.mark.parametrize("crash_at", [5, 7, 15])
def test_resume_reproduces_the_uninterrupted_sgt_run(corpus, tmp_path, monkeypatch, crash_at):
    train(_sgt_cfg(corpus, tmp_path / "a"))
    T = importlib.import_module("structlm.training.loop")

    def crash(step, *a):
        if step == crash_at:
            raise KeyboardInterrupt
        return lr_at(step, *a)

    monkeypatch.setattr(T, "lr_at", crash)
    with pytest.raises(KeyboardInterrupt):
        train(_sgt_cfg(corpus, tmp_path / "b"))
    monkeypatch.setattr(T, "lr_at", lr_at)
    train(_sgt_cfg(corpus, tmp_path / "b"))
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_info_shows_sgt_flops_next_to_the_dense_baseline():
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "structlm", "info", "--preset", "paper-xl",
         "--model.ffn.kind", "lowrank", "--model.ffn.rank", "512", "--tokens", "25.5e9",
         "--train.sgt.mode", "fixedflop", "--train.sgt.ratio", "0.43",
         "--train.sgt.reduce_flop", "True", "--json"],
        capture_output=True, text=True, check=True,
    )
    out = json.loads(r.stdout)
    assert out["sgt"]["total_steps"] == 69550
    assert float(f"{out['train_flops']:.3e}") == 2.099e20
    assert float(f"{out['sgt']['dense_train_flops']:.3e}") == 2.102e20


def test_checkpoints_inside_the_guided_phase_are_refused_for_serving(corpus, tmp_path):
    train(_sgt_cfg(corpus, tmp_path / "run", keep_last=20))
    early = tmp_path / "run" / "checkpoints" / "step_0000004"
    with pytest.raises(checkpoint.CheckpointError, match="self-guided phase"):
        load_model(early)
    # G = 6: written after the guides left
    boundary = tmp_path / "run" / "checkpoints" / "step_0000006"
    model, _ = load_model(boundary)
    assert not guided_layers(model)


def test_changing_the_sgt_budget_of_a_run_is_refused(corpus, tmp_path):
    train(_sgt_cfg(corpus, tmp_path / "run", max_steps=8))
    with pytest.raises(ValueError, match="Keep the budget"):
        train(_sgt_cfg(corpus, tmp_path / "run", max_steps=16))


def test_ddp_with_sgt_and_reduce_flop_runs_and_removes_the_guides(corpus, tmp_path):
    """2 gloo processes: skipped guides (unused parameters), guide removal and DDP re-wrapping."""
    import os
    import subprocess
    import sys

    cfg = _sgt_cfg(corpus, tmp_path / "ddp", max_steps=6)
    cfg.train.micro_batch_size = 4
    path = tmp_path / "ddp.json"
    path.write_text(json.dumps(to_dict(cfg)))
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "structlm", "train", "--config", str(path)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["sgt"]["guided_steps"] == 3
    model, _ = load_model(tmp_path / "ddp")
    assert not guided_layers(model)
