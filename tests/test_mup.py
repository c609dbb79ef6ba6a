"""Structure-aware muP: the base model, the per-factor lr multipliers and inits, the two scales and
their folding, the coordinate check's verdict, and training/resume under --optim.param_scaling."""

import dataclasses
import math

import pytest
import torch
from helpers import crash_and_resume, tiny_cfg, train_rows

from structlm.bench.coord import coord_check
from structlm.config import (
    PRESETS,
    LinearSpec,
    ModelConfig,
    RunConfig,
    from_dict,
    mup_model,
    to_dict,
)
from structlm.linear.guided import wrap_guided
from structlm.linear.registry import choose_hparams, linear_class
from structlm.model import mup
from structlm.model.gpt import GPT
from structlm.runs.run import load_model
from structlm.training import train
from structlm.training.optim import make_optimizer, set_lr

KINDS = ("dense", "lowrank", "blockshuffle", "blockdense", "btt")


def model_cfg(kind: str, width: int = 128, **kw) -> ModelConfig:
    m = ModelConfig(vocab_size=256, block_size=32, n_layer=2, n_head=4, d_model=width,
                    d_ff=4 * width, **kw)
    if kind != "dense":
        m = dataclasses.replace(m, ffn=choose_hparams(kind, [(n, k) for _, n, k in
                                                             m.ffn_shapes()], 0.32))
    return m


def ffn_share(m: ModelConfig) -> float:
    cls = linear_class(m.ffn.kind)
    return (sum(cls.weight_params(n, k, **m.ffn.hparams()) for _, n, k in m.ffn_shapes())
            / sum(n * k for _, n, k in m.ffn_shapes()))


@pytest.mark.parametrize("kind", KINDS)
def test_the_base_model_keeps_heads_and_the_structures_share(kind):
    m = model_cfg(kind, 256)
    base = m.at_width(64)
    assert (base.d_model, base.d_ff, base.n_head, base.head_dim) == (64, 256, 4, 16)
    assert base.ffn.kind == kind
    assert ffn_share(base) == pytest.approx(ffn_share(m), rel=0.35)
    with pytest.raises(ValueError, match="below 2 \\* n_head"):
        m.at_width(6)


def test_at_the_base_width_mup_is_standard_but_for_nothing():
    m = model_cfg("lowrank", 64)
    scaled = mup_model(m, 64, pretrained=False)
    assert scaled.attn_scale == pytest.approx(1 / math.sqrt(m.head_dim))
    assert scaled.logit_scale == 1.0
    model = GPT(scaled)
    assert set(mup.fan_in_ratios(model, 64).values()) == {1.0}
    opt = make_optimizer(model, dataclasses.replace(PRESETS["tiny"]().optim,
                                                    param_scaling="mup", base_width=64))
    assert [g["lr_mult"] for g in opt.param_groups] == [1.0]


@pytest.mark.parametrize("kind", KINDS)
def test_every_hidden_factor_gets_its_own_fan_in_ratio(kind):
    """lr multiplier = base fan-in / fan-in of each factor (its last axis); embeddings, the
    output layer, norms and biases keep the lr."""
    m = model_cfg(kind, 256)
    model, base = GPT(m), GPT(m.at_width(64))
    ratios = mup.fan_in_ratios(model, 64)
    base_params = dict(base.named_parameters())
    assert "wte.weight" not in ratios and not any("ln" in n or "bias" in n for n in ratios)
    for name, p in model.named_parameters():
        if p.dim() >= 2 and name != "wte.weight":
            assert ratios[name] == base_params[name].shape[-1] / p.shape[-1], name
    assert ratios["blocks.1.attn.qkv.weight"] == 0.25
    if kind == "btt":  # blocks of about sqrt(width): its first core's fan-in grows more slowly
        assert ratios["blocks.1.mlp.fc1.core1"] > 0.25


def test_set_lr_gives_each_group_its_multiple():
    m = model_cfg("btt", 256)
    optim = dataclasses.replace(PRESETS["tiny"]().optim, param_scaling="mup", base_width=64)
    opt = make_optimizer(GPT(m), optim)
    set_lr(opt, 0.01)
    assert sorted({g["lr"] for g in opt.param_groups}) == sorted(
        {0.01 * g["lr_mult"] for g in opt.param_groups})
    assert len(opt.param_groups) >= 3  # 1, 1/4 and BTT's first core's own ratio


def _spectral(m: torch.nn.Module) -> float:
    return torch.linalg.matrix_norm(m.to_dense().double(), ord=2).item()


@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_mup_init_keeps_the_layer_spectral_norm_width_independent(kind):
    """Standard's fixed std makes a layer's spectral norm grow like sqrt(width); muP's std from
    the fan-in keeps it (LowRank's SVD init follows the dense draw it is taken from)."""
    norms = {}
    for scaling in ("standard", "mup"):
        for w in (64, 512):
            torch.manual_seed(0)
            model = GPT(model_cfg(kind, w))
            if scaling == "mup":
                mup.init_(model, 64)
            norms[scaling, w] = _spectral(model.blocks[1].mlp.fc2)
    assert norms["standard", 512] / norms["standard", 64] > 2.0
    assert 0.75 < norms["mup", 512] / norms["mup", 64] < 1.33


def test_the_coordinate_check_is_flat_under_mup_and_drifts_under_standard():
    m = dataclasses.replace(model_cfg("dense", 64), vocab_size=128)
    optim = dataclasses.replace(PRESETS["tiny"]().optim, lr=1e-2, base_width=32,
                                weight_decay=0.0)
    rows = coord_check(m, optim, PRESETS["tiny"]().data, (32, 128), ("dense", "lowrank"), 3, 1,
                       4, 16, torch.device("cpu"), None)
    slope = {(r["kind"], r["scaling"], r["layer"]): r["slope"] for r in rows}
    for kind in ("dense", "lowrank"):
        for layer in ("attention", "ffn"):
            assert slope[kind, "standard", layer] > 1.0, (kind, layer, slope)
            assert abs(slope[kind, "mup", layer]) < 0.6, (kind, layer, slope)
        assert abs(slope[kind, "mup", "logits"]) < 0.3


@pytest.mark.parametrize("extra", [dict(), dict(norm="rmsnorm", bias=False, n_kv_head=2),
                                   dict(pos_emb="absolute", act="swiglu")])
def test_folding_the_scales_keeps_the_function(extra):
    m = mup_model(model_cfg("lowrank", 96, **extra), 64, pretrained=False)
    assert m.attn_scale != 1 / math.sqrt(m.head_dim) and m.logit_scale == 64 / 96
    torch.manual_seed(0)
    model = GPT(m).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms and biases drawn too: a missed one shows
            p.add_(0.1 * torch.randn_like(p))
    folded = mup.fold_scales(model)
    assert (folded.cfg.attn_scale, folded.cfg.logit_scale) == (None, 1.0)
    idx = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(idx)[0]
        torch.testing.assert_close(folded(idx)[0], ref, rtol=0, atol=1e-5 * ref.abs().max())
    assert torch.equal(model.generate(idx[:1, :5], 8, temperature=0),
                       folded.generate(idx[:1, :5], 8, temperature=0))
    assert model.cfg.logit_scale == 64 / 96  # the original is untouched


def test_run_config_derives_the_scales_and_refuses_a_pretrained_start():
    cfg = PRESETS["tiny"]()
    cfg.optim.param_scaling, cfg.optim.base_width = "mup", 32
    cfg = from_dict(RunConfig, to_dict(cfg))
    assert cfg.model.logit_scale == 0.5
    assert cfg.model.attn_scale == pytest.approx(math.sqrt(8) / 16)
    assert from_dict(RunConfig, to_dict(cfg)) == cfg  # a saved run reloads unchanged
    d = to_dict(cfg)
    d["model"].update(logit_scale=0.9, d_model=128, d_ff=512)  # resized after: derived again
    assert from_dict(RunConfig, d).model.logit_scale == 0.25
    d = to_dict(cfg)
    d["train"]["init_from"] = "runs/other"
    with pytest.raises(ValueError, match="init_from keeps its own"):
        from_dict(RunConfig, d)
    with pytest.raises(ValueError, match="base_width"):
        dataclasses.replace(cfg.optim, base_width=0)


def mup_cfg(corpus, out, **train_kw):
    cfg = tiny_cfg(corpus, out, **train_kw)
    d = to_dict(cfg)
    d["optim"].update(param_scaling="mup", base_width=32)
    d["model"]["ffn"] = dataclasses.asdict(LinearSpec("btt", rank=2, nblocks=4))
    return from_dict(RunConfig, d)


def test_a_mup_run_resumes_exactly_and_exports_a_standard_model(corpus, tmp_path, monkeypatch):
    crash_and_resume(lambda out: mup_cfg(corpus, out), tmp_path, monkeypatch)
    assert [r["loss"] for r in train_rows(tmp_path / "a")] == [
        r["loss"] for r in train_rows(tmp_path / "b")]
    model, cfg = load_model(tmp_path / "a")
    assert cfg.optim.param_scaling == "mup" and model.cfg.logit_scale == 0.5


def test_sgt_guides_train_at_their_layers_multiplier(corpus, tmp_path):
    cfg = mup_cfg(corpus, tmp_path / "run")
    d = to_dict(cfg)
    d["train"]["sgt"].update(mode="fixedstep", ratio=0.5)
    cfg = from_dict(RunConfig, d)
    summary = train(cfg)
    assert math.isfinite(summary.final_val_loss)
    model = GPT(cfg.model)
    mup.init_(model, 32)
    wrap_guided(model)
    ratios = mup.fan_in_ratios(model, 32)
    assert ratios["blocks.1.mlp.fc1.guide"] == 32 / 64
    assert ratios["blocks.1.mlp.fc2.guide"] == 128 / 256
