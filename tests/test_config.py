"""Typed configs: JSON round trips, validation messages, presets and the `structlm info` command."""

import json
import math
import subprocess
import sys

import pytest

from structlm.config import (
    PRESETS,
    LinearSpec,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    from_dict,
    to_dict,
)
from structlm.model.flops import flops_per_token, param_groups
from structlm.model.gpt import GPT

PAPER_SIZES = {  # docs/method.md §3.2 / §6.3: d_model, n_layer, n_head, head_dim, lr, tokens
    "paper-s": (768, 12, 12, 64, 6e-4, 2.2e9),
    "paper-m": (1024, 24, 16, 64, 3e-4, 6.7e9),
    "paper-l": (1536, 24, 12, 128, 2.5e-4, 14.58e9),
    "paper-xl": (2048, 24, 16, 128, 2e-4, 25.5e9),
}


# --- serialisation --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_json_round_trip(name):
    cfg = PRESETS[name]()
    d = to_dict(cfg)
    back = from_dict(RunConfig, json.loads(json.dumps(d)))
    assert back == cfg
    assert to_dict(back) == d
    assert isinstance(back.model.ffn, LinearSpec) and isinstance(back.model.dense_ffn_layers, tuple)


def test_to_dict_is_plain_json():
    d = to_dict(PRESETS["tiny"]())
    assert set(d) == {"model", "data", "optim", "train"}
    assert d["model"]["dense_ffn_layers"] == [0]  # tuples become lists
    assert d["model"]["ffn"] == {"kind": "lowrank", "rank": 16, "nblocks": None, "init": "default",
                                 "params": {}}


@pytest.mark.parametrize(
    "d, match",
    [
        (
            {"modle": {}},
            r"unknown config key\(s\) \['modle'\] in RunConfig; valid keys: \['data', 'model'",
        ),
        ({"model": {"d_modle": 3}}, r"unknown config key\(s\) \['d_modle'\] in model;"),
        ({"model": {"ffn": {"rnk": 3}}}, r"unknown config key\(s\) \['rnk'\] in model\.ffn;"),
        ({"train": {"max_step": 3, "lr": 1}}, r"\['lr', 'max_step'\] in train;"),
    ],
)
def test_from_dict_unknown_keys_name_the_path(d, match):
    with pytest.raises(ValueError, match=match):
        from_dict(RunConfig, d)


def test_from_dict_partial_dict_keeps_defaults():
    cfg = from_dict(RunConfig, {"model": {"n_layer": 3, "dense_ffn_layers": [1, 2]}})
    assert cfg.model.n_layer == 3 and cfg.model.dense_ffn_layers == (1, 2)
    assert cfg.model.d_model == ModelConfig().d_model and cfg.optim == OptimConfig()


# --- ModelConfig ----------------------------------------------------------------------------------


def test_model_config_derived_properties():
    cfg = ModelConfig(n_head=8, n_kv_head=2, d_model=256, attn_dim=128, d_ff=512)
    assert (cfg.kv_heads, cfg.attention_dim, cfg.head_dim) == (2, 128, 16)
    cfg = ModelConfig(n_head=4, d_model=64, d_ff=256)
    assert (cfg.kv_heads, cfg.attention_dim, cfg.head_dim) == (4, 64, 16)


def test_model_config_ffn_shapes_and_specs():
    spec = LinearSpec("lowrank", rank=16)
    cfg = ModelConfig(n_layer=3, d_model=64, n_head=4, d_ff=256, ffn=spec, dense_ffn_layers=(0, 2))
    assert cfg.ffn_shapes() == [("fc1", 64, 256), ("fc2", 256, 64)]
    assert [cfg.ffn_spec(i) for i in range(3)] == [LinearSpec(), spec, LinearSpec()]
    swiglu = ModelConfig(n_layer=3, d_model=64, n_head=4, d_ff=256, act="swiglu")
    assert swiglu.ffn_shapes() == [("fc1", 64, 512), ("fc2", 256, 64)]


def test_model_config_accepts_ffn_dict():
    cfg = ModelConfig(ffn={"kind": "blockshuffle", "nblocks": 4})
    assert cfg.ffn == LinearSpec("blockshuffle", nblocks=4)


@pytest.mark.parametrize(
    "kw, match",
    [
        (
            {"n_head": 12, "n_kv_head": 5},
            r"model\.n_kv_head=5 must divide model\.n_head=12; pick a divisor of n_head",
        ),
        ({"n_kv_head": 0}, r"model\.n_kv_head=0 must divide model\.n_head=12"),
        ({"attn_dim": 100}, r"model\.attn_dim=100 is not divisible by model\.n_head=12"),
        ({"d_model": 36, "n_head": 12, "d_ff": 144}, r"RoPE needs an even head_dim, got 3"),
        (
            {"dense_ffn_layers": (0, 12)},
            r"model\.dense_ffn_layers=\[0, 12\] names blocks \[12\] outside 0\.\.11",
        ),
        ({"dense_ffn_layers": (-1,)}, r"names blocks \[-1\] outside 0\.\.11"),
        ({"n_layer": 0}, r"model\.n_layer=0 must be positive"),
        ({"vocab_size": -1}, r"model\.vocab_size=-1 must be positive"),
        ({"dropout": 1.0}, r"model\.dropout=1\.0 must be in \[0, 1\)"),
        (
            {"ffn": LinearSpec("lowrank", rank=5000)},
            r"model\.ffn \(fc1: 768->3072\): rank=5000 is larger than min\(d_in, d_out\)=768",
        ),
        (
            {"ffn": LinearSpec("lowrank")},
            r"model\.ffn \(fc1: 768->3072\): kind 'lowrank' needs rank",
        ),
        (
            {"ffn": LinearSpec("blockshuffle", nblocks=5)},
            r"model\.ffn \(fc1: 768->3072\): d_in=768 is not divisible by nblocks=5",
        ),
        (
            {"ffn": LinearSpec("blockdense", rank=128, nblocks=64), "d_ff": 3000},
            r"model\.ffn \(fc2: 3000->768\): d_in=3000 is not divisible by nblocks=64",
        ),
        (
            {"ffn": LinearSpec("lowrank", rank=400), "act": "swiglu", "d_ff": 300},
            r"model\.ffn \(fc2: 300->768\): rank=400 is larger",
        ),
        (
            {"ffn": LinearSpec("nope")},
            r"model\.ffn \(fc1: 768->3072\): unknown structured linear kind 'nope'",
        ),
        (
            {"ffn": LinearSpec("dense", rank=4)},
            r"model\.ffn \(fc1: 768->3072\): rank=4 is not used by kind",
        ),
        (
            {"ffn": LinearSpec("lowrank", rank=4, init="ortho")},
            r"model\.ffn \(fc1: 768->3072\): init='ortho' is not available for kind 'lowrank'",
        ),
    ],
)
def test_model_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kw)


def test_absolute_positions_allow_odd_head_dim():
    assert ModelConfig(d_model=36, n_head=12, d_ff=144, pos_emb="absolute").head_dim == 3


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: TrainConfig(max_steps=3, max_tokens=1e6), r"give only one of train\.max_steps"),
        (
            lambda: TrainConfig(batch_size=12, micro_batch_size=8),
            r"train\.batch_size=12 must be a multiple",
        ),
        (lambda: TrainConfig(max_steps=0), r"must be positive"),
        (lambda: OptimConfig(lr=0), r"optim\.lr=0 must be a positive number"),
        (
            lambda: RunConfig(model=ModelConfig(block_size=64), train=TrainConfig(seq_len=65)),
            r"train\.seq_len=65 must be in 1\.\.model\.block_size=64",
        ),
    ],
)
def test_run_config_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_from_dict_runs_validation():
    with pytest.raises(
        ValueError, match=r"model\.ffn \(fc1: 768->3072\): kind 'lowrank' needs rank"
    ):
        from_dict(RunConfig, {"model": {"ffn": {"kind": "lowrank"}}})


# --- presets --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid(name):
    cfg = PRESETS[name]()
    assert isinstance(cfg, RunConfig)
    assert from_dict(RunConfig, to_dict(cfg)) == cfg  # re-running every __post_init__ check passes
    assert PRESETS[name]() is not cfg and PRESETS[name]() == cfg  # a fresh object each call
    assert (
        param_groups(cfg.model)["total"] > 0
        and flops_per_token(cfg.model, cfg.seq_len)["total"] > 0
    )


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_cpu_presets_build_a_model(name):
    cfg = PRESETS[name]()
    model = GPT(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == param_groups(cfg.model)["total"]


@pytest.mark.parametrize("name", sorted(PAPER_SIZES))
def test_paper_presets_match_the_spec(name):
    d, n_layer, n_head, head_dim, lr, tokens = PAPER_SIZES[name]
    cfg = PRESETS[name]()
    m = cfg.model
    assert (m.d_model, m.n_layer, m.n_head, m.head_dim, m.d_ff) == (
        d,
        n_layer,
        n_head,
        head_dim,
        4 * d,
    )
    assert (m.vocab_size, m.block_size, m.kv_heads, m.attention_dim) == (32000, 1024, n_head, d)
    assert (m.act, m.norm, m.bias, m.tie_embeddings, m.pos_emb) == (
        "gelu",
        "layernorm",
        True,
        True,
        "rope",
    )
    assert m.dense_ffn_layers == (0,) and m.init_std == 0.02 and m.rope_base == 10000.0
    assert cfg.optim.lr == lr and cfg.train.max_tokens == tokens
    assert cfg.train.batch_size * m.block_size == 512 * 1024  # 524,288 tokens per optimizer step


@pytest.mark.parametrize(
    "name, d_ff, attn_dim, n_head, n_kv_head, ffn, tokens",
    [  # Table 2 of the paper, docs/method.md §8.5
        ("wide-m", 4864, 512, 8, 4, LinearSpec("lowrank", rank=512), 10.58e9),
        ("wide-l", 7424, 768, 12, 4, LinearSpec("lowrank", rank=768), 23.36e9),
        ("gqa-m", 4864, None, 16, 4, LinearSpec(), 6.7e9),
        ("gqa-l", 7424, None, 12, 2, LinearSpec(), 14.58e9),
    ],
)
def test_table_2_presets_match_the_spec(name, d_ff, attn_dim, n_head, n_kv_head, ffn, tokens):
    cfg = PRESETS[name]()
    m = cfg.model
    assert (m.d_ff, m.attn_dim, m.n_head, m.n_kv_head, m.ffn) == (
        d_ff,
        attn_dim,
        n_head,
        n_kv_head,
        ffn,
    )
    assert cfg.train.max_tokens == tokens


# --- the info command -----------------------------------------------------------------------------


def _structlm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "structlm", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_info_json_reproduces_table_1():
    """Table 1, 63% LowRank (R=1024): 985M parameters, 516M in FFNs, 1.66e20 training FLOPs at
    25.5B tokens."""
    proc = _structlm(
        "info",
        "--preset",
        "paper-xl",
        "--model.ffn.kind",
        "lowrank",
        "--model.ffn.rank",
        "1024",
        "--tokens",
        "25.5e9",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert round(out["params_total"] / 1e6) == 985
    assert round(out["params_ffn"] / 1e6) == 516
    assert float(f"{out['train_flops']:.2e}") == 1.66e20
    cfg = PRESETS["paper-xl"]().model
    cfg.ffn = LinearSpec("lowrank", rank=1024)
    assert out["params_total"] == param_groups(cfg)["total"]
    assert out["flops_per_token"] == flops_per_token(cfg, 1024)["total"]
    assert math.isclose(out["train_flops"], 3 * out["flops_per_token"] * 25.5e9, rel_tol=1e-12)


def test_cli_bad_override_exits_2_with_message():
    proc = _structlm(
        "info", "--preset", "paper-xl", "--model.ffn.kind", "lowrank", "--model.ffn.rank", "5000"
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    said = " ".join(proc.stderr.replace("│", " ").split())  # tyro wraps it in a box
    assert "rank=5000" in said and "larger than" in said
