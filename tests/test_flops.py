"""Accounting: param_groups against the built model, FLOPs against FlopCounterMode, the paper's
tables."""

import pytest
import torch
from helpers import tiny_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from structlm.config import PRESETS, LinearSpec, ModelConfig
from structlm.linear import LINEARS
from structlm.model.flops import (
    ffn_layer_params,
    flops_per_token,
    param_groups,
    tokens_for_budget,
    train_flops,
)
from structlm.model.gpt import GPT

KINDS = sorted(LINEARS)
TOKENS_PER_STEP = 512 * 1024  # the paper's global batch (docs/method.md §6.3)

GRID = {  # tiny configs covering every term of param_groups
    "default": {},
    "untied": {"tie_embeddings": False},
    "absolute": {"pos_emb": "absolute"},
    "nobias-rmsnorm": {"bias": False, "norm": "rmsnorm"},
    "swiglu": {"act": "swiglu"},
    "gqa-attn-dim": {"n_kv_head": 2, "attn_dim": 48},
    "all-structured": {"dense_ffn_layers": ()},
    "everything": {
        "tie_embeddings": False,
        "pos_emb": "absolute",
        "bias": False,
        "act": "swiglu",
        "n_kv_head": 1,
        "attn_dim": 64,
        "n_layer": 3,
        "dense_ffn_layers": (0, 2),
    },
}


def paper_cfg(preset: str, kind: str = "dense", **hp) -> ModelConfig:
    cfg = PRESETS[preset]().model
    cfg.ffn = LinearSpec(kind, **hp)
    return cfg


def millions(n: int, ndigits: int = 0) -> float:
    return round(n / 1e6, ndigits)


def sig(x: float, digits: int) -> float:
    """x rounded to `digits` significant digits, as the paper prints it."""
    return float(f"{x:.{digits - 1}e}")


# --- parameters against the model -----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("opts", list(GRID.values()), ids=list(GRID))
def test_param_groups_total_equals_model_numel(kind, opts):
    cfg = tiny_model(kind, **opts)
    model = GPT(cfg)
    g = param_groups(cfg)
    assert g["total"] == sum(p.numel() for p in model.parameters())
    # and component by component
    assert g["embedding"] == model.wte.weight.numel()
    assert g["position"] == (model.wpe.weight.numel() if model.wpe is not None else 0)
    assert g["attention"] == sum(p.numel() for b in model.blocks for p in b.attn.parameters())
    assert g["ffn"] == sum(p.numel() for b in model.blocks for p in b.mlp.parameters())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm | torch.nn.RMSNorm)]
    assert g["norms"] == sum(p.numel() for m in norms for p in m.parameters())
    assert g["lm_head"] == (0 if cfg.tie_embeddings else model.lm_head.weight.numel())
    assert g["non_embedding"] == g["total"] - g["embedding"] - g["position"] - g["lm_head"]
    ffn_matrices = sum(p.numel() for b in model.blocks for p in b.mlp.parameters() if p.dim() >= 2)
    assert g["ffn_matrix"] == ffn_matrices


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("opts", [{}, GRID["everything"]], ids=["default", "everything"])
def test_matrix_params_count_matrices_and_one_embedding(kind, opts):
    """docs/method.md §3.6: the paper's model size counts >= 2-D weights (a tied embedding once);
    no biases, norms or position table."""
    cfg = tiny_model(kind, **opts)
    model = GPT(cfg)
    matrices = sum(
        p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and n != "wpe.weight"
    )
    assert param_groups(cfg)["matrix"] == matrices


# --- FLOPs against torch's counter ----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
@pytest.mark.parametrize("bias", [True, False])
def test_ffn_flops_match_flop_counter(kind, act, bias):
    """One MLP forward: FlopCounterMode (2·M·N·K per mm/bmm, bias adds ignored) equals flops.py
    exactly."""
    cfg = tiny_model(kind, act=act, bias=bias, dense_ffn_layers=())
    model = GPT(cfg)
    B, T = 3, 5
    x = torch.randn(B, T, cfg.d_model)
    with FlopCounterMode(display=False) as counter:
        model.blocks[1].mlp(x)
    assert counter.get_total_flops() == 2 * ffn_layer_params(cfg, 1, bias=False) * B * T
    assert counter.get_total_flops() == model.blocks[1].mlp.fc1.flops_per_token() * B * T + (
        model.blocks[1].mlp.fc2.flops_per_token() * B * T
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("opts", [{}, GRID["everything"]], ids=["default", "everything"])
def test_model_forward_flops_match_flop_counter(kind, opts):
    """The whole forward with the math SDPA backend (plain bmm's over the full T x T scores, i.e. no
    causal
    halving, the paper's convention) equals flops_per_token(cfg, T)["total"] x tokens exactly."""
    cfg = tiny_model(kind, **opts)
    model = GPT(cfg)
    B, T = 2, 32
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx)
    f = flops_per_token(cfg, T)
    assert counter.get_total_flops() == f["total"] * B * T
    assert f["ffn"] == 2 * param_groups(cfg)["ffn_matrix"]


def test_train_flops_and_tokens_for_budget_are_inverse():
    cfg = tiny_model("lowrank")
    assert train_flops(cfg, 1e6) == 3 * flops_per_token(cfg)["total"] * 1e6
    assert tokens_for_budget(cfg, train_flops(cfg, 12345.0)) == pytest.approx(12345.0, rel=1e-12)


def test_flops_per_token_uses_seq_len():
    cfg = tiny_model("dense")
    a, b = flops_per_token(cfg, 16), flops_per_token(cfg, 32)
    assert b["attention_scores"] == 2 * a["attention_scores"]
    assert flops_per_token(cfg) == b  # default: block_size
    assert {k: v for k, v in a.items() if k not in ("attention_scores", "total")} == {
        k: v for k, v in b.items() if k not in ("attention_scores", "total")
    }


# --- docs/method.md §3.6 / §8.1: Table 1 (Transformer-xl, 25.5B tokens) ---------------------------

TABLE_1 = [  # (kind, hp, model size M, FFN size M, training FLOPs)
    ("dense", {}, 1274, 805, 2.10e20),
    ("lowrank", {"rank": 1024}, 985, 516, 1.66e20),
    ("blockdense", {"nblocks": 4, "rank": 1536}, 955, 486, 1.61e20),
    ("blockshuffle", {"nblocks": 2}, 985, 516, 1.66e20),
    ("lowrank", {"rank": 512}, 744, 275, 1.29e20),
    ("blockdense", {"nblocks": 4, "rank": 768}, 728, 260, 1.27e20),
    ("blockshuffle", {"nblocks": 4}, 744, 275, 1.29e20),
]


@pytest.mark.parametrize("kind, hp, size, ffn, flops", TABLE_1)
def test_table_1(kind, hp, size, ffn, flops):
    cfg = paper_cfg("paper-xl", kind, **hp)
    g = param_groups(cfg)
    # all parameters, biases and norms included (the matrices alone give 1273.5 for dense)
    assert millions(g["total"]) == size
    assert millions(g["ffn_matrix"]) == ffn
    assert sig(train_flops(cfg, 25.5e9), 3) == flops


def test_xl_dense_flops_per_token():
    """docs/method.md §3.6: xl dense is 2748.3 MFLOP per token; 1273.5M matrix parameters."""
    cfg = paper_cfg("paper-xl")
    assert round(flops_per_token(cfg)["total"] / 1e6, 1) == 2748.3
    assert millions(param_groups(cfg)["matrix"], 1) == 1273.5


# --- docs/method.md §8.2: computed sizes and FLOPs for s, m, l ------------------------------------

LR, BS, BD = "lowrank", "blockshuffle", "blockdense"
SECTION_8_2_CASES = [  # (size, kind, hp, model params M, FFN params M, train FLOPs)
    ("s", "dense", {}, 109.5, 56.6, 1.695e18),
    ("s", LR, {"rank": 384}, 90.1, 37.2, 1.438e18),  # 63%
    ("s", BS, {"nblocks": 2}, 90.1, 37.2, 1.438e18),
    ("s", BD, {"nblocks": 2, "rank": 512}, 90.1, 37.2, 1.438e18),
    ("s", LR, {"rank": 192}, 73.8, 20.9, 1.224e18),  # 32%
    ("s", BS, {"nblocks": 4}, 73.8, 20.9, 1.224e18),
    ("s", BD, {"nblocks": 2, "rank": 256}, 73.8, 20.9, 1.224e18),
    ("m", "dense", {}, 334.8, 201.3, 1.548e19),
    ("m", LR, {"rank": 512}, 262.4, 129.0, 1.257e19),  # 63%
    ("m", BS, {"nblocks": 2}, 262.4, 129.0, 1.257e19),
    ("m", LR, {"rank": 256}, 202.1, 68.7, 1.015e19),  # 32%
    ("m", BS, {"nblocks": 4}, 202.1, 68.7, 1.015e19),
    ("m", BD, {"nblocks": 4, "rank": 768}, 254.9, 121.4, 1.227e19),  # 58.6%
    ("m", BD, {"nblocks": 4, "rank": 384}, 198.3, 64.9, 9.997e18),  # 29.3%
    ("l", "dense", {}, 728.6, 453.0, 7.034e19),
    ("l", LR, {"rank": 768}, 565.8, 290.2, 5.610e19),  # 63%
    ("l", BS, {"nblocks": 2}, 565.8, 290.2, 5.610e19),
    ("l", BD, {"nblocks": 2, "rank": 1024}, 565.8, 290.2, 5.610e19),
    ("l", LR, {"rank": 384}, 430.2, 154.5, 4.424e19),  # 32%
    ("l", BS, {"nblocks": 4}, 430.2, 154.5, 4.424e19),
    ("l", BD, {"nblocks": 2, "rank": 512}, 430.2, 154.5, 4.424e19),
]


def _ids(case):
    size, kind, hp, *_ = case
    return f"{size}-{kind}-" + "-".join(f"{k}{v}" for k, v in hp.items())


CASE_IDS = [_ids(case) for case in SECTION_8_2_CASES]


def _section_8_2_params_cases():
    """The s 63% rows print 90.1M; the exact count is 90,046,464 = 90.0M (see the xfail reason)."""
    out = []
    for case in SECTION_8_2_CASES:
        marks = ()
        if case[0] == "s" and case[3] == 90.1:
            marks = pytest.mark.xfail(
                strict=True,
                reason="the paper prints 90.1M, but the exact matrix count is 90,046,464 = 90.0M; "
                "90.1 = 109.5 - 56.6 + 37.2 adds rounded figures "
                "(see test_section_8_2_s63_exact_count)",
            )
        out.append(pytest.param(*case, marks=marks, id=_ids(case)))
    return out


def _budget_tokens(preset: str) -> int:
    steps = int(PRESETS[preset]().train.max_tokens / TOKENS_PER_STEP)
    return steps * TOKENS_PER_STEP


@pytest.mark.parametrize("size, kind, hp, params, ffn, flops", _section_8_2_params_cases())
def test_section_8_2_model_params(size, kind, hp, params, ffn, flops):
    assert millions(param_groups(paper_cfg(f"paper-{size}", kind, **hp))["matrix"], 1) == params


@pytest.mark.parametrize("size, kind, hp, params, ffn, flops", SECTION_8_2_CASES, ids=CASE_IDS)
def test_section_8_2_ffn_params(size, kind, hp, params, ffn, flops):
    assert millions(param_groups(paper_cfg(f"paper-{size}", kind, **hp))["ffn_matrix"], 1) == ffn


@pytest.mark.parametrize("size, kind, hp, params, ffn, flops", SECTION_8_2_CASES, ids=CASE_IDS)
def test_section_8_2_train_flops(size, kind, hp, params, ffn, flops):
    cfg = paper_cfg(f"paper-{size}", kind, **hp)
    assert sig(train_flops(cfg, _budget_tokens(f"paper-{size}")), 4) == flops


@pytest.mark.parametrize(
    "kind, hp",
    [
        ("lowrank", {"rank": 384}),
        ("blockshuffle", {"nblocks": 2}),
        ("blockdense", {"nblocks": 2, "rank": 512}),
    ],
)
def test_section_8_2_s63_exact_count(kind, hp):
    """Transformer-s at 63%: 11 structured FFNs of 2,949,120 parameters replace dense ones of
    4,718,592."""
    assert (
        param_groups(paper_cfg("paper-s", kind, **hp))["matrix"]
        == 109_510_656 - 11 * (4_718_592 - 2_949_120)
        == 90_046_464
    )


# --- docs/method.md §8.5: Table 2 (wide & structured) ---------------------------------------------

TABLE_2 = [  # (preset, #Param M, training FLOPs, tokens B)
    ("paper-m", 335, 1.55e19, 6.7),
    ("gqa-m", 335, 1.55e19, 6.7),
    ("wide-m", 219, 1.55e19, 10.6),
    ("paper-l", 729, 7.03e19, 14.6),
    ("gqa-l", 729, 7.03e19, 14.6),
    ("wide-l", 464, 7.03e19, 23.4),
]


@pytest.mark.parametrize("preset, params, flops, tokens", TABLE_2)
def test_table_2(preset, params, flops, tokens):
    run = PRESETS[preset]()
    g = param_groups(run.model)
    assert millions(g["total"]) == params
    assert millions(g["matrix"]) == params  # the matrices alone round to the same figure
    assert round(run.train.max_tokens / 1e9, 1) == tokens
    assert sig(train_flops(run.model, run.train.max_tokens), 3) == flops
    # whole optimizer steps of 524,288 tokens give the same figure
    assert sig(train_flops(run.model, _budget_tokens(preset)), 3) == flops
