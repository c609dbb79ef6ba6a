"""Converters work on any nn.Module: find-and-replace by name pattern, and the guided / pre-merged
/ merged conversions with their inverses, on a model that is not structlm's GPT."""

import torch
from torch import nn

from structlm.linear import (
    GuidedLinear,
    LinearSpec,
    PreMergedLinear,
    build_linear,
    merge_linears,
    premerge,
    replace_modules,
    unmerge,
    unwrap_guided,
    wrap_guided,
)
from structlm.linear.replace import matches, named_modules


class UserBlock(nn.Module):
    """A model a user wrote: its own names, a plain nn.Linear beside structured layers."""

    def __init__(self) -> None:
        super().__init__()
        self.up = build_linear(LinearSpec("lowrank", rank=4), 16, 32, dtype=torch.float64)
        self.gate = build_linear(LinearSpec("blockshuffle", nblocks=2), 16, 32,
                                 dtype=torch.float64)
        self.down = build_linear(LinearSpec("blockdense", rank=4, nblocks=2), 32, 16,
                                 dtype=torch.float64)
        self.head = nn.Linear(16, 16, dtype=torch.float64)

    def forward(self, x):
        return self.head(self.down(torch.tanh(self.gate(x)) * self.up(x)))


def user_model() -> nn.Module:
    return nn.Sequential(UserBlock(), UserBlock())


def test_patterns_select_by_qualified_name():
    assert matches("0.up") and matches("0.up", include="*.up") and not matches("0.up", "*.down")
    assert not matches("0.up", include="*", exclude=["0.*"])
    names = [n for n, *_ in named_modules(user_model(), include="1.*")]
    assert names == ["1.up", "1.gate", "1.down", "1.head"]  # named_modules() order


def test_replace_modules_by_pattern_in_place():
    model = user_model()
    done = replace_modules(model, lambda n, m: nn.Identity() if isinstance(m, nn.Linear) else None,
                           include="*.head", exclude="0.*")
    assert list(done) == ["1.head"]
    assert isinstance(model[1].head, nn.Identity) and isinstance(model[0].head, nn.Linear)


def test_guided_wrap_and_unwrap_round_trip_on_a_user_model():
    model = user_model()
    x = torch.randn(5, 16, dtype=torch.float64)
    ref = model(x)
    layers = [model[0].up, model[0].gate, model[0].down]
    assert wrap_guided(model, exclude="1.*") is model
    assert [type(m) for m in (model[0].up, model[1].up)] == [GuidedLinear, type(layers[0])]
    torch.testing.assert_close(model(x), ref)  # alpha 1 with exact guides: the same map
    wrap_guided(model, exclude="1.*")  # wrapping again does not nest
    assert isinstance(model[0].up.structured, type(layers[0]))
    unwrap_guided(model)
    assert [model[0].up, model[0].gate, model[0].down] == layers  # the same modules back


def test_premerge_unmerge_and_merge_on_a_user_model():
    model = user_model().eval()
    x = torch.randn(3, 16, dtype=torch.float64)
    ref = model(x)
    premerge(model, 8)  # 3 tokens per call: the merged matrices
    assert isinstance(model[1].gate, PreMergedLinear) and isinstance(model[1].head, nn.Linear)
    torch.testing.assert_close(model(x), ref)
    merged = merge_linears(model)  # a copy; pre-merged layers are merged too
    assert all(type(m) is nn.Linear for m in merged.modules() if not list(m.children())
               and not isinstance(m, nn.Sequential))
    torch.testing.assert_close(merged(x), ref)
    unmerge(model)
    assert not any(isinstance(m, PreMergedLinear) for m in model.modules())
    torch.testing.assert_close(model(x), ref)
