"""Budget allocation across layers: the greedy over whitened spectra is the optimum of the summed
truncation error on small cases, never worse than one share everywhere, and `structure(...,
allocate="error")` projects the layers at those ranks within the budget."""

import itertools
import json

import pytest
import torch
from torch import nn

from structlm.linear import structure
from structlm.linear.allocate import allocate_ranks, spectrum, truncation_error
from structlm.linear.registry import choose_hparams


def _layers(seed: int = 0) -> dict[str, torch.Tensor]:
    """Three 24x24 weights of very different spectra: nearly rank 2, decaying, flat."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(24, 2, generator=g) @ torch.randn(2, 24, generator=g)
    low += 0.01 * torch.randn(24, 24, generator=g)
    u, _, vh = torch.linalg.svd(torch.randn(24, 24, generator=g))
    decay = u @ torch.diag(0.7 ** torch.arange(24.0)) @ vh
    return {"low": low, "decay": decay, "flat": torch.randn(24, 24, generator=g)}


def test_the_greedy_is_the_optimum_of_the_summed_error():
    spectra = [spectrum(n, w) for n, w in _layers().items()]
    got = allocate_ranks(spectra, 0.4)
    budget = 0.4 * 3 * 24 * 24
    best = min((r for r in itertools.product(range(1, 12), repeat=3)
                if sum(r) * 48 <= budget),
               key=lambda r: truncation_error(spectra, dict(zip(["low", "decay", "flat"], r,
                                                                  strict=True))))
    assert truncation_error(spectra, got) == pytest.approx(
        truncation_error(spectra, dict(zip(["low", "decay", "flat"], best, strict=True))))
    assert sum(got.values()) * 48 <= budget
    # the budget goes where the error is: the flat spectrum takes most; the nearly rank-2 layer
    # its two directions; the fast-decaying one, whose error is tiny, the least
    assert got["flat"] > got["low"] >= 2 and got["low"] >= got["decay"]


def test_allocated_beats_uniform_on_the_projected_model():
    layers = _layers(1)
    model = nn.Sequential(*[nn.Linear(24, 24, bias=False) for _ in layers])
    with torch.no_grad():
        for lin, w in zip(model, layers.values(), strict=True):
            lin.weight.copy_(w)
    x = torch.randn(256, 24)
    errors = {}
    for how in ("uniform", "error"):
        m = nn.Sequential(*[nn.Linear(24, 24, bias=False) for _ in layers])
        m.load_state_dict(model.state_dict())
        _, report = structure(m, 0.4, include="*", exclude=(), allocate=how)
        kept = sum(r["params_after"] for r in report)
        assert kept <= 0.4 * sum(r["params_before"] for r in report)
        errors[how] = sum(((lin_s(x) - lin_d(x)) ** 2).sum().item()
                          for lin_s, lin_d in zip(m, model, strict=True))
    uniform_rank = choose_hparams("lowrank", [(24, 24)], 0.4).rank
    assert uniform_rank > 1 and errors["error"] < errors["uniform"]


def test_allocation_is_refused_where_it_does_not_apply():
    model = nn.Sequential(nn.Linear(24, 24))
    with pytest.raises(ValueError, match="choose uniform, error or sensitivity"):
        structure(model, 0.4, include="*", exclude=(), allocate="even")
    with pytest.raises(ValueError, match="give a fraction and kind='lowrank'"):
        structure(model, 0.4, kind="blockdense", include="*", exclude=(), allocate="error")


def test_convert_allocate_error_writes_uneven_ranks_that_load(tmp_path):
    """`structlm convert --allocate error`: ranks follow each linear's spectrum (a nearly rank-2
    fc1 gets few, the others more) within the budget; the config keeps them in
    model.ffn_overrides, so the run loads, counts its parameters and heals from them."""
    import subprocess
    import sys

    from helpers import bpe_tokenizer, random_run

    from structlm.config import load_run_config
    from structlm.model.flops import ffn_params
    from structlm.runs import checkpoint
    from structlm.runs.run import Run

    bpe_tokenizer(tmp_path / "tok.json", ["To be, or not to be, that is the question."] * 50)
    run, model = random_run(tmp_path, tmp_path / "tok.json", n_layer=3, d_model=48, d_ff=96,
                            dense_ffn_layers=(0,))
    w = model.blocks[1].mlp.fc1.weight
    with torch.no_grad():
        w.copy_(w[:, :2] @ torch.randn(2, w.shape[1]))  # rank 2
    checkpoint.save(run, model, None, load_run_config(str(run / "config.json")), 1, {})
    out = tmp_path / "allocated"
    r = subprocess.run([sys.executable, "-m", "structlm", "convert", str(run), str(out),
                        "--fraction", "0.32", "--allocate", "error"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = load_run_config(str(out / "config.json")).model
    layers = json.loads((out / "conversion.json").read_text())["layers"]
    ranks = {row["name"]: row["rank"] for row in layers}
    others = [v for k, v in ranks.items() if k != "blocks.1.mlp.fc1"]
    assert ranks["blocks.1.mlp.fc1"] <= 2 < min(others)
    assert sum(row["params_after"] for row in layers) <= 0.32 * sum(
        row["params_before"] for row in layers)
    loaded, _ = Run.open(out).load_model()
    for name, rank in ranks.items():
        assert loaded.get_submodule(name).rank == rank
        block, fc = name.split(".")[1], name.split(".")[-1]
        assert cfg.linear_spec(int(block), fc).rank == rank
    assert ffn_params(cfg, bias=False) == sum(row["params_after"] for row in layers) + 2 * 48 * 96


def test_ffn_overrides_are_checked():
    from structlm.config import LinearSpec, ModelConfig

    base = dict(vocab_size=64, n_layer=2, n_head=2, d_model=16, d_ff=32,
                ffn=LinearSpec("lowrank", rank=4))
    with pytest.raises(ValueError, match="keys are BLOCK.fc1 or BLOCK.fc2"):
        ModelConfig(**base, ffn_overrides={"0.fc1": {"rank": 2}})  # block 0 is dense
    with pytest.raises(ValueError, match="keys are BLOCK.fc1"):
        ModelConfig(**base, ffn_overrides={"1.fc3": {"rank": 2}})
    with pytest.raises(ValueError, match=r"ffn_overrides\['1.fc2'\]"):
        ModelConfig(**base, ffn_overrides={"1.fc2": {"rank": 0}})
    ModelConfig(**{**base, "ffn": LinearSpec()}, ffn_overrides={"1.fc2": {"rank": 2}})  # inert


def test_convert_refuses_allocation_for_a_block_kind(tmp_path):
    from helpers import bpe_tokenizer, random_run

    from structlm.runs.convert import convert_run

    bpe_tokenizer(tmp_path / "tok.json", ["To be, or not to be."] * 50)
    run, _ = random_run(tmp_path, tmp_path / "tok.json", dense_ffn_layers=(0,))
    with pytest.raises(ValueError, match="kind='lowrank'"):
        convert_run(run, tmp_path / "out", "blockdense", 0.32, allocate="error")
    assert not (tmp_path / "out").exists()


class _TwoBranches(nn.Module):
    """head(10 a(x) + 0.1 b(x)): a and b have the same singular values, so their local errors are
    alike, but a's matter 100x more to the output."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b = nn.Linear(24, 24, bias=False), nn.Linear(24, 24, bias=False)
        self.head = nn.Linear(24, 40, bias=False)
        with torch.no_grad():
            w = torch.randn(24, 24, generator=g)
            self.a.weight.copy_(w)
            self.b.weight.copy_(w[torch.randperm(24, generator=g)])
            self.head.weight.copy_(torch.randn(40, 24, generator=g))

    def forward(self, x):
        return self.head(10 * self.a(x) + 0.1 * self.b(x))


def test_sensitivity_allocation_gives_rank_where_the_outputs_need_it():
    x = torch.randn(512, 24, generator=torch.Generator().manual_seed(1))
    ref = _TwoBranches()(x).log_softmax(-1)
    ranks, kl = {}, {}
    for how in ("uniform", "error", "sensitivity"):
        m = _TwoBranches()
        _, report = structure(m, 0.4, include=["a", "b"], exclude=(), calib=x, allocate=how)
        ranks[how] = {r["name"]: r["rank"] for r in report}
        with torch.no_grad():
            kl[how] = (ref.exp() * (ref - m(x).log_softmax(-1))).sum(-1).mean().item()
    assert abs(ranks["error"]["a"] - ranks["error"]["b"]) <= 1  # alike locally
    assert ranks["sensitivity"]["a"] > ranks["sensitivity"]["b"] + 2
    assert kl["sensitivity"] < kl["uniform"]
    with pytest.raises(ValueError, match="give calib"):
        structure(_TwoBranches(), 0.4, include=["a", "b"], exclude=(), allocate="sensitivity")
