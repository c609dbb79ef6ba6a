"""Budget allocation across layers: the greedy over whitened spectra is the optimum of the summed
truncation error on small cases, never worse than one share everywhere, and `structure(...,
allocate="error")` projects the layers at those ranks within the budget."""

import itertools

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
    with pytest.raises(ValueError, match="choose uniform or error"):
        structure(model, 0.4, include="*", exclude=(), allocate="even")
    with pytest.raises(ValueError, match="give a fraction and kind='lowrank'"):
        structure(model, 0.4, kind="blockdense", include="*", exclude=(), allocate="error")
