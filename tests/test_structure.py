"""Dense -> structured: projections reproduce representable matrices exactly, are optimal where
stated, and `structure()` converts structlm's GPT and transformers models in place."""

import json
import math

import pytest
import torch
from torch import nn

import structlm
from structlm.config import ModelConfig
from structlm.linear import LinearSpec, build_linear, merge_linears, structure
from structlm.linear.structure import project_, weighted_error
from structlm.model.gpt import GPT
from structlm.runs.run import load_model

SPECS = {  # kind: spec for 24 -> 48 and 48 -> 24 layers
    "lowrank": LinearSpec("lowrank", rank=6),
    "blockshuffle-2": LinearSpec("blockshuffle", nblocks=2),
    "blockshuffle-4": LinearSpec("blockshuffle", nblocks=4),
    "blockdense": LinearSpec("blockdense", rank=8, nblocks=4),
    "btt": LinearSpec("btt", rank=2, nblocks=4),
}
SHAPES = [(24, 48), (48, 24), (24, 24)]


def err(layer, w):
    return ((layer.to_dense() - w).norm() / w.norm()).item()


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_a_matrix_with_the_structure_is_reproduced_exactly(name, shape):
    torch.manual_seed(0)
    truth = build_linear(SPECS[name], *shape, bias=False, dtype=torch.float64)
    for p in truth.parameters():
        p.data.normal_()
    w = truth.to_dense()
    fresh = build_linear(SPECS[name], *shape, bias=False, dtype=torch.float64)
    project_(fresh, w)
    assert err(fresh, w) < 1e-10


def test_lowrank_error_is_the_tail_singular_energy():
    w = torch.randn(40, 30, dtype=torch.float64)
    layer = build_linear(LinearSpec("lowrank", rank=7), 30, 40, bias=False, dtype=torch.float64)
    project_(layer, w)
    s = torch.linalg.svdvals(w)
    assert (layer.to_dense() - w).norm().item() == pytest.approx(s[7:].norm().item(), rel=1e-10)


@pytest.mark.parametrize("name", ["blockshuffle-2", "blockshuffle-4", "blockdense", "btt"])
def test_block_projections_are_local_optima(name):
    """No small step of any factor lowers the Frobenius error of the projection."""
    torch.manual_seed(1)
    w = torch.randn(48, 24, dtype=torch.float64)
    layer = build_linear(SPECS[name], 24, 48, bias=False, dtype=torch.float64)
    project_(layer, w)
    best = (layer.to_dense() - w).norm().item()
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        for p in layer.weights():
            step = 1e-4 * torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.data += step
            assert (layer.to_dense() - w).norm().item() >= best - 1e-9
            p.data -= step


def test_blockdense_error_is_the_per_block_tail_energy():
    w = torch.randn(48, 24, dtype=torch.float64)
    layer = build_linear(SPECS["blockdense"], 24, 48, bias=False, dtype=torch.float64)
    project_(layer, w)  # rank 8 over 4 blocks of 6 columns: rank 2 each
    tail = sum(torch.linalg.svdvals(w[:, k * 6:(k + 1) * 6])[2:].square().sum() for k in range(4))
    assert (layer.to_dense() - w).norm().item() == pytest.approx(tail.sqrt().item(), rel=1e-10)


def _correlated_cov(n: int, seed: int = 3) -> torch.Tensor:
    """The covariance of correlated inputs with uneven scales, as a real layer's are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(
        0, -2, n, dtype=torch.float64)
    x = torch.randn(2000, n, generator=g, dtype=torch.float64) @ mix
    return x.T @ x / x.shape[0]


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_activation_aware_projection_lowers_the_weighted_error(name, shape):
    torch.manual_seed(3)
    d_in, d_out = shape
    w = torch.randn(d_out, d_in, dtype=torch.float64)
    cov = _correlated_cov(d_in)
    plain = build_linear(SPECS[name], d_in, d_out, bias=False, dtype=torch.float64)
    aware = build_linear(SPECS[name], d_in, d_out, bias=False, dtype=torch.float64)
    project_(plain, w)
    project_(aware, w, cov)
    assert weighted_error(w, aware.to_dense(), cov) < 0.9 * weighted_error(w, plain.to_dense(), cov)
    assert err(aware, w) > err(plain, w)  # it traded the plain error for the weighted one


@pytest.mark.parametrize("name", ["blockshuffle-4", "blockdense", "btt"])
def test_weighted_refinement_is_monotone_and_exact_on_representable_matrices(name):
    from structlm.linear.factors import weighted_refine

    torch.manual_seed(4)
    cov = _correlated_cov(24)
    truth = build_linear(SPECS[name], 24, 48, bias=False, dtype=torch.float64)
    for p in truth.parameters():
        p.data.normal_()
    fresh = build_linear(SPECS[name], 24, 48, bias=False, dtype=torch.float64)
    project_(fresh, truth.to_dense(), cov)
    assert err(fresh, truth.to_dense()) < 1e-9
    # BlockDense as A @ blockdiag: the error after k sweeps never exceeds the error after k - 1
    w = torch.randn(48, 24, dtype=torch.float64)
    a0, b0 = torch.randn(48, 8, dtype=torch.float64), torch.randn(4, 2, 6, dtype=torch.float64)
    groups = [(torch.arange(48), torch.arange(8))]
    errors = [weighted_error(w, a @ torch.block_diag(*b), cov) for a, b in (
        weighted_refine(w, cov, a0, groups, b0, sweeps=k, tol=0) for k in range(5))]
    assert all(later <= earlier + 1e-12 for earlier, later in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 0.9 * errors[0]


def _check_converted(model, report, before: int, x):
    """Parameters as promised, and the converted model equals its merged dense form."""
    saved = sum(r["params_before"] - r["params_after"] for r in report)
    assert sum(p.numel() for p in model.parameters()) == before - saved
    with torch.no_grad():
        torch.testing.assert_close(merge_linears(model)(x)[0], model(x)[0])


def test_structure_converts_a_structlm_gpt_but_block_0():
    cfg = ModelConfig(vocab_size=100, block_size=16, n_layer=3, n_head=2, d_model=32, d_ff=128,
                      dense_ffn_layers=(0, 1, 2))
    model = GPT(cfg).double()
    before = sum(p.numel() for p in model.parameters())
    model, report = structure(model, 0.32, kind="lowrank")
    assert [r["name"] for r in report] == ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2",
                                           "blocks.2.mlp.fc1", "blocks.2.mlp.fc2"]
    assert all(r["kind"] == "lowrank" and 0 < r["rel_error"] < 1 for r in report)
    _check_converted(model, report, before, torch.randint(0, 100, (2, 8)))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_structure_converts_transformers_models(family):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "llama":
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100)).double().eval()
    else:
        m = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=16)).double().eval()
    before = sum(p.numel() for p in m.parameters())
    idx = torch.randint(0, 100, (2, 8))
    spec = LinearSpec("blockshuffle", nblocks=2)
    m, report = structure(m, spec, calib=None)
    assert len(report) == (3 if family == "llama" else 2)  # block 1's FFN; block 0 stays dense
    with torch.no_grad():
        out = m(idx).logits
        assert torch.isfinite(out).all()
        torch.testing.assert_close(merge_linears(m)(idx).logits, out)
    saved = sum(r["params_before"] - r["params_after"] for r in report)
    assert sum(p.numel() for p in m.parameters()) == before - saved


def test_structure_with_calibration_tokens_reports_the_weighted_error():
    cfg = ModelConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, d_model=32, d_ff=64)
    model = GPT(cfg).double()
    calib = torch.randint(0, 100, (4, 16))
    _, report = structure(model, LinearSpec("lowrank", rank=8), calib=calib)
    assert all(math.isfinite(r["weighted_error"]) for r in report)


def test_structure_refuses_what_it_cannot_do():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        structure(model, 0.5)


def test_convert_writes_a_structured_run_that_loads_and_heals_from(tmp_path):
    """structlm convert: a dense run -> LowRank-32% (activation-aware on a text file); the written
    run loads as a structlm model equal to structure()'s, and init_from accepts it."""
    import subprocess
    import sys

    from helpers import bpe_tokenizer, random_run

    from structlm.training.rundir import load_init

    bpe_tokenizer(tmp_path / "tok.json", ["To be, or not to be, that is the question."] * 50)
    run, dense = random_run(tmp_path, tmp_path / "tok.json", norm="layernorm", act="gelu",
                            pos_emb="rope", dense_ffn_layers=(0,))
    text = tmp_path / "calib.txt"
    text.write_text("To be, or not to be, that is the question. " * 200)
    r = subprocess.run([sys.executable, "-m", "structlm", "convert", str(run), str(tmp_path / "lr"),
                        "--fraction", "0.32", "--calib", str(text)], capture_output=True, text=True)
    assert r.returncode == 0 and "converted 2 FFN layers" in r.stdout, r.stderr[-2000:]
    model, cfg = load_model(tmp_path / "lr")
    assert cfg.model.ffn == LinearSpec("lowrank", rank=6) and cfg.model.dense_ffn_layers == (0,)
    conversion = json.loads((tmp_path / "lr" / "conversion.json").read_text())
    assert conversion["structlm_version"] == structlm.__version__
    assert [r["name"] for r in conversion["layers"]] == ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    fresh = GPT(cfg.model)
    load_init(str(tmp_path / "lr"), fresh, cfg.model)
    idx = torch.randint(0, 320, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx)[0], model(idx)[0])


def test_guided_healing_starts_at_the_dense_models_loss(corpus, tmp_path):
    """A converted run healed with SGT and guide_init=dense: alpha = 1 at step 0 and the guides
    are the dense weights it came from, so its first loss is the pretrained dense model's."""
    from helpers import tiny_cfg, train_rows  # the tests directory is on sys.path

    from structlm.config import from_dict, to_dict
    from structlm.runs.convert import convert_run
    from structlm.training import train

    dense = tiny_cfg(corpus, tmp_path / "dense", max_steps=3, eval_interval=0)
    dense.model.ffn = LinearSpec()
    train(dense)
    out, report = convert_run(tmp_path / "dense", tmp_path / "lr", "lowrank", 0.32)
    assert report and all(r["rel_error"] > 0 for r in report)
    with pytest.raises(ValueError, match="its FFNs are lowrank already"):
        convert_run(out, tmp_path / "again", "blockdense", 0.32)
    assert not (tmp_path / "again").exists()

    def continued(name, init, **sgt):
        cfg = tiny_cfg(corpus, tmp_path / name, max_steps=4, eval_interval=0)
        cfg.model = checkpoint_model(init)
        cfg.train.init_from = str(init)
        for k, v in sgt.items():
            setattr(cfg.train.sgt, k, v)
        train(from_dict(type(cfg), to_dict(cfg)))
        return train_rows(tmp_path / name)[0]["loss"]

    base = continued("base", tmp_path / "dense")
    healed = continued("healed", out, mode="fixedstep", ratio=0.5, guide_init="dense")
    unguided = continued("unguided", out)
    assert healed == pytest.approx(base, abs=1e-5)
    assert unguided > base + 1e-3  # without the dense guides it starts at the projection's loss


def checkpoint_model(run):
    from structlm.config import load_run_config

    return load_run_config(str(run / "config.json")).model


def test_self_guided_in_a_users_own_loop_heals_from_the_dense_weights():
    """The README's example: a user's model structured, healed with SelfGuided from its own
    dense weights (so step 0 computes the dense model), then left purely structured."""
    from structlm import SelfGuided

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("mlp", nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)))
    x, target = torch.randn(32, 16), torch.randn(32, 16)
    dense_out = model(x).detach()
    dense = {f"mlp.{i}": model.mlp[i].weight.detach().clone() for i in (0, 2)}
    structure(model, 0.25, kind="lowrank", exclude=None)
    sg = SelfGuided(model, guided_steps=5, guides=dense)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    n_params = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    for step in range(8):
        if not sg.done:
            alpha = sg.step()
        out = model(x)
        if step == 0:
            assert alpha == 1.0
            torch.testing.assert_close(out, dense_out)  # the pretrained function exactly
        torch.nn.functional.mse_loss(out, target).backward()
        optimizer.step()
        optimizer.zero_grad()
        if sg.done and any("guide" in n for n, _ in model.named_parameters()):
            sg.finish(optimizer)
    assert not any("guide" in n for n, _ in model.named_parameters())
    left = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert left == n_params - 2 * 16 * 64  # the two guides' parameters are gone


def test_btt_error_is_the_tail_energy_of_every_block_pair():
    """BTT's projection: each (output block, input block) sub-matrix keeps its top `rank`
    singular values, so the error is the energy of all the others."""
    w = torch.randn(48, 24, dtype=torch.float64)
    layer = build_linear(SPECS["btt"], 24, 48, bias=False, dtype=torch.float64)
    project_(layer, w)  # 4 x 4 sub-matrices of 12 x 6, rank 2 each
    tail = sum(torch.linalg.svdvals(w[i * 12:(i + 1) * 12, j * 6:(j + 1) * 6])[2:].square().sum()
               for i in range(4) for j in range(4))
    assert (layer.to_dense() - w).norm().item() == pytest.approx(tail.sqrt().item(), rel=1e-10)


def _two_way_mlp() -> nn.Module:
    model = nn.Module()
    model.mlp = nn.ModuleDict({"up": nn.Linear(32, 128), "down": nn.Linear(128, 32),
                               "gate": nn.Linear(32, 1)})  # a gate: no structure is smaller
    return model


@pytest.mark.parametrize("kind", ["lowrank", "blockdense", "blockshuffle"])
def test_a_fraction_fits_every_layer_shape_or_leaves_the_layer_dense(kind):
    """A narrowing layer alone (128 -> 32 at 63%) gets a valid spec; a layer no structure makes
    smaller stays dense, named in the report."""
    model, report = structure(_two_way_mlp(), 0.63, kind=kind, exclude=None)
    rows = {r["name"]: r for r in report}
    assert rows["mlp.gate"]["kind"] == "dense" and isinstance(model.mlp.gate, nn.Linear)
    for name in ("mlp.up", "mlp.down"):
        assert rows[name]["kind"] == kind
        assert rows[name]["params_after"] <= 0.63 * rows[name]["params_before"]
    with pytest.raises(ValueError, match="no matching layer can be structured at fraction=0.5"):
        structure(_two_way_mlp(), 0.5, include="mlp.gate")


def test_a_meta_skeleton_is_structured_then_loaded():
    """structure(init="paper") on the meta device builds the layers without touching weights;
    to_empty + a structured checkpoint then gives the structured model."""
    cfg = ModelConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, d_model=32, d_ff=64)
    spec = LinearSpec("blockshuffle", nblocks=2)
    real, _ = structure(GPT(cfg), spec)
    with torch.device("meta"):
        skeleton = GPT(cfg)
    skeleton, report = structure(skeleton, spec, init="paper")
    assert report and all("rel_error" not in r for r in report)
    skeleton.to_empty(device="cpu").load_state_dict(real.state_dict())
    idx = torch.randint(0, 100, (2, 8))
    torch.testing.assert_close(skeleton(idx)[0], real(idx)[0])


@pytest.mark.parametrize("name", ["blockshuffle-4", "btt"])
def test_a_short_calibration_does_not_overfit_it(name):
    """32 calibration tokens for 24 -> 48... here 64 inputs: the covariance is singular, and the
    ridge keeps the error on other inputs near the plain projection's (without it: ~1.4x)."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(64, 64, generator=g, dtype=torch.float64) * torch.logspace(
        0, -1, 64, dtype=torch.float64)

    def cov(n):
        x = torch.randn(n, 64, generator=g, dtype=torch.float64) @ mix
        return x.T @ x / n

    few, other = cov(32), cov(20000)
    w = torch.randn(32, 64, generator=g, dtype=torch.float64)
    spec = SPECS[name] if name == "btt" else LinearSpec("blockshuffle", nblocks=4)
    plain, aware = (build_linear(spec, 64, 32, bias=False, dtype=torch.float64) for _ in "ab")
    project_(plain, w)
    project_(aware, w, few, tokens=32)
    assert weighted_error(w, aware.to_dense(), other) < 1.2 * weighted_error(
        w, plain.to_dense(), other)


def test_structure_warns_when_calibration_is_shorter_than_a_layers_inputs():
    cfg = ModelConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, d_model=32, d_ff=64)
    with pytest.warns(UserWarning, match="12 calibration tokens for layers with more inputs"):
        structure(GPT(cfg).double(), 0.5, calib=torch.randint(0, 100, (1, 12)))


def test_a_guide_of_the_wrong_shape_is_refused():
    from structlm.linear.guided import GuidedLinear

    layer = build_linear(SPECS["lowrank"], 24, 48)
    with pytest.raises(ValueError, match=r"guides are \(d_out, d_in\) = \(48, 24\).*Conv1D"):
        GuidedLinear(layer, weight=torch.randn(24, 48))


def test_self_guided_resumes_where_it_stopped():
    """SelfGuided.state_dict: a loop rebuilt from a checkpoint continues alpha's schedule."""
    from structlm import SelfGuided

    def fresh():
        model = _two_way_mlp()
        structure(model, 0.5, kind="lowrank", exclude=None)
        return model

    model = fresh()
    whole = SelfGuided(model, guided_steps=10, schedule="linear")
    alphas = [whole.step() for _ in range(10)]
    first = SelfGuided(fresh(), guided_steps=10, schedule="linear")
    for _ in range(4):
        first.step()
    state = first.state_dict()
    again = SelfGuided(fresh(), guided_steps=10, schedule="linear")
    again.load_state_dict(state)
    assert [again.step() for _ in range(6)] == alphas[4:]
    with pytest.raises(ValueError, match="saved run's guided_steps and schedule"):
        SelfGuided(fresh(), guided_steps=12, schedule="linear").load_state_dict(state)
    with pytest.raises(ValueError, match="schedule='linaer': choose one of cosine, linear"):
        SelfGuided(fresh(), guided_steps=10, schedule="linaer")
