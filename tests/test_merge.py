"""Pre-merge: merged models equal structured ones, dispatch equivalence on both sides of the
threshold, refresh after weight changes, no second copy in checkpoints, cache keys."""

import pytest
import torch

from structlm.config import LinearSpec, ModelConfig
from structlm.linear import LINEARS, build_linear
from structlm.linear import merge as pm
from structlm.linear.merge import PreMergedLinear, merge_linears, premerge, unmerge
from structlm.model.gpt import GPT

SPECS = {
    "dense": LinearSpec("dense"),
    "lowrank": LinearSpec("lowrank", rank=8),
    "blockdense": LinearSpec("blockdense", rank=16, nblocks=4),
    "blockshuffle": LinearSpec("blockshuffle", nblocks=4),
    "btt": LinearSpec("btt", rank=2, nblocks=4),
}


def tiny(kind: str, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=97, block_size=32, n_layer=3, n_head=4, d_model=32, d_ff=128,
                       ffn=SPECS[kind], **kw)


@pytest.mark.parametrize("kind", sorted(LINEARS))
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_merge_linears_equals_the_structured_model(kind, act):
    model = GPT(tiny(kind, act=act)).double()
    merged = merge_linears(model)
    idx = torch.randint(0, 97, (2, 20))
    torch.testing.assert_close(merged(idx)[0], model(idx)[0])
    n_struct = sum(isinstance(m, LINEARS[kind]) for m in merged.modules())
    assert n_struct == (6 if kind == "dense" else 0)  # every structured layer became an nn.Linear
    assert merged is not model and any(isinstance(m, LINEARS[kind]) for m in model.modules())


@pytest.mark.parametrize("kind", sorted(k for k in LINEARS if k != "dense"))
@pytest.mark.parametrize("tokens", [1, 7, 8, 40])  # threshold 8: merged below, structured from 8 on
def test_premerged_dispatch_equals_the_structured_layer(kind, tokens):
    layer = build_linear(SPECS[kind], 32, 64, dtype=torch.float64)
    torch.nn.init.normal_(layer.bias)
    pm = PreMergedLinear(layer, max_dense_tokens=8).eval()
    x = torch.randn(tokens, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), layer(x))
    assert (pm.merged.numel() > 0) == (tokens < 8)  # the merged matrix is built only when used
    assert pm.calls["merged"] == (tokens < 8)


@pytest.mark.parametrize("train", [True, False])
def test_gradients_reach_the_factors_in_eval_mode_too(train):
    layer = build_linear(SPECS["lowrank"], 16, 32, dtype=torch.float64)
    pm = PreMergedLinear(layer, max_dense_tokens=1000).train(train)
    pm(torch.randn(4, 16, dtype=torch.float64)).sum().backward()
    assert pm.calls == {"merged": 0, "structured": 1}
    assert all(p.grad is not None for p in layer.parameters())


def test_merged_matrix_is_refreshed_when_weights_change():
    layer = build_linear(SPECS["lowrank"], 16, 32, dtype=torch.float64)
    pm = PreMergedLinear(layer, max_dense_tokens=1000).eval()
    x = torch.randn(4, 16, dtype=torch.float64)
    merged = torch.no_grad()(pm)
    merged(x)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).sum().backward()
    opt.step()  # in-place update of the factors
    torch.testing.assert_close(merged(x), layer(x))
    other = build_linear(SPECS["lowrank"], 16, 32, dtype=torch.float64)
    layer.load_state_dict(other.state_dict())  # loading new weights
    torch.testing.assert_close(merged(x), other(x))
    third = build_linear(SPECS["lowrank"], 16, 32, dtype=torch.float64)
    pm.load_state_dict(third.state_dict(), assign=True)  # new tensors, fresh version counters
    torch.testing.assert_close(merged(x), third(x))
    layer.up.data = torch.randn_like(layer.up)  # a swapped storage
    torch.testing.assert_close(merged(x), layer(x))
    assert pm.calls == {"merged": 5, "structured": 0}


def test_premerge_model_round_trip_and_no_second_copy_in_state_dict():
    model = GPT(tiny("blockdense")).double().eval()
    keys = set(model.state_dict())
    idx = torch.randint(0, 97, (1, 5))
    ref = model(idx)[0]
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    premerge(model, 16)
    assert sum(isinstance(m, PreMergedLinear) for m in model.modules()) == 4
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], ref)  # 5 tokens: merged path
    assert set(model.state_dict()) == keys  # the same checkpoint with or without pre-merge
    other = GPT(tiny("blockdense")).double().eval()
    model.load_state_dict(other.state_dict())  # a plain checkpoint loads into a pre-merged model
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], other(idx)[0])
    model.load_state_dict(plain)
    unmerge(model)
    assert set(model.state_dict()) == keys
    torch.testing.assert_close(model(idx)[0], ref)


def test_greedy_generation_with_premerge_matches_without():
    torch.manual_seed(0)
    model = GPT(tiny("lowrank")).double().eval()
    prompt = torch.randint(0, 97, (1, 4))
    plain = model.generate(prompt, 12, temperature=0)
    premerge(model, 16)
    assert torch.equal(model.generate(prompt, 12, temperature=0), plain)


def test_calibration_picks_a_threshold_and_the_cache_key_tracks_its_context(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTLM_CACHE", str(tmp_path))
    layer = build_linear(SPECS["lowrank"], 64, 256)
    cpu = torch.device("cpu")
    t, rows = pm.calibrate_layer(layer, cpu, None, tokens=(1, 64), reps=1)
    assert len(rows) == 2 and {"structured_ms", "merged_ms"} <= set(rows[0])
    key32 = pm.crossover_key(layer, cpu, None)
    assert key32 != pm.crossover_key(layer, cpu, torch.bfloat16)  # dtype is part of the key
    other = build_linear(LinearSpec("lowrank", rank=16), 64, 256)
    assert key32 != pm.crossover_key(other, cpu, None)  # so are the hyper-parameters
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert key32 != pm.crossover_key(layer, cpu, None)  # and the torch version
    monkeypatch.undo()
    monkeypatch.setenv("STRUCTLM_CACHE", str(tmp_path))
    model = GPT(tiny("lowrank"))
    th, _ = pm.thresholds_for(model, cpu, None)
    assert set(th.values()) == {pm.DEFAULT_MAX_DENSE_TOKENS}  # nothing cached yet: the default
    pm.save_cache({pm.crossover_key(m, cpu, None): 5 for m in model.modules()
                      if isinstance(m, LINEARS["lowrank"])})
    th, _ = pm.thresholds_for(model, cpu, None)
    assert set(th.values()) == {5}


@pytest.mark.parametrize(
    "structured_faster, threshold",
    [
        ([False, False, True, True], 4),  # merged wins at 1 and 2 tokens
        ([True, True, True, True], 1),  # structured always faster: never merge
        ([False, False, False, False], 16),  # merged always faster: beyond the grid
        ([False, True, False, True], 8),  # a noisy win at 2 tokens does not count
    ],
)
def test_calibration_threshold_is_where_the_structured_path_wins_from_then_on(
    monkeypatch, structured_faster, threshold
):
    calls = iter(structured_faster)

    def fake(fns, device, **kw):
        fast = next(calls)
        return {"structured": [1.0 if fast else 2.0], "merged": [1.5]}

    monkeypatch.setattr(pm, "time_interleaved", fake)
    layer = build_linear(SPECS["lowrank"], 32, 64)
    t, _ = pm.calibrate_layer(layer, torch.device("cpu"), None, tokens=(1, 2, 4, 8))
    assert t == threshold


def test_premerge_twice_does_not_nest_and_survives_autocast_changes():
    model = GPT(tiny("lowrank")).eval()
    premerge(model, 16)
    premerge(model, 16)
    assert not any(isinstance(m.structured, PreMergedLinear) for m in model.modules()
                   if isinstance(m, PreMergedLinear))
    idx = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(idx)  # the merged matrices are built here, inside autocast
        out, _ = model(idx)  # and used in fp32 afterwards
    assert out.dtype == torch.float32


@pytest.mark.parametrize("structured,merged,want", [
    ([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], 8),      # ties everywhere: merged (the dense GEMM) always
    ([1.04, 0.97, 0.5], [1.0, 1.0, 1.0], 4),    # within 5% used to count for the factors
    ([0.5, 0.5, 0.5], [1.0, 1.0, 1.0], 1),      # clearly faster at every count: factors always
    ([0.5, 1.2, 0.5], [1.0, 1.0, 1.0], 4),      # only from the count after the last loss
    ([0.5, 0.5, 0.95], [1.0, 1.0, 1.0], 8),     # near-tie at the largest count: merged always
])
def test_the_factors_are_chosen_only_where_clearly_faster(structured, merged, want):
    """The pre-merge choice on planted timings (token counts 1, 2, 4): the merged matrix unless
    the factors are at least 10% faster at that and every larger count, so a noisy per-layer
    timing cannot make the pre-merged model slower than its dense parent."""
    assert pm.choose_threshold((1, 2, 4), structured, merged) == want


@pytest.mark.parametrize("kind, d, rank, device, dtype, want", [
    ("lowrank", 384, 96, "cpu", None, 1),              # big enough: the factors from one token on
    ("lowrank", 384, 96, "cpu", torch.bfloat16, 1),
    ("lowrank", 256, 64, "cpu", None, 1),
    ("lowrank", 256, 64, "cpu", torch.bfloat16, 16),   # half the bytes saved: merged
    ("lowrank", 32, 8, "cpu", None, 16),               # tiny: a second GEMM's fixed cost wins
    ("lowrank", 384, 96, "cuda", None, 16),            # launch latency: merged below 16 tokens
    ("blockdense", 384, 96, "cpu", None, 16),          # block kinds merge below 16 everywhere
])
def test_uncalibrated_threshold_follows_the_byte_rule(kind, d, rank, device, dtype, want):
    hp = {"rank": rank} if kind == "lowrank" else {"rank": rank, "nblocks": 4}
    layer = build_linear(LinearSpec.of(kind, **hp), d, 4 * d)
    assert pm.default_threshold(layer, torch.device(device), dtype) == want


def test_uncalibrated_thresholds_of_a_model_use_the_byte_rule(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTLM_CACHE", str(tmp_path))  # nothing measured
    cfg = ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, d_model=384, d_ff=1536,
                      ffn=LinearSpec("lowrank", rank=96))
    th, rows = pm.thresholds_for(GPT(cfg), torch.device("cpu"), None)
    assert set(th.values()) == {1} and rows == []
    assert not (tmp_path / "premerge.json").exists()  # a rule, not a measurement: nothing cached
