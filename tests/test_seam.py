"""The one-file seam: a structure defined only here, registered by one call, runs through the
model, the accounting, choose_hparams, SGT, pre-merge, `structlm info` and `bench kernel` with no
change to the package.

The toy is a Kronecker product W = A ⊗ B with its own hyper-parameter (`factor`, not rank or
nblocks) and FLOPs that are not 2 x its parameters, so the seam's every declaration is exercised.
"""

import io
import json
import math
from contextlib import redirect_stdout

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import structlm.bench.kernels as kernels
from structlm import cli
from structlm.config import PRESETS, LinearSpec, from_dict, to_dict
from structlm.linear import (
    LINEARS,
    StructuredLinear,
    choose_hparams,
    merge_linears,
    premerge,
    register,
    unregister,
    wrap_guided,
)
from structlm.linear.guided import guided_layers, set_guide
from structlm.model.flops import flops_per_token, param_groups
from structlm.model.gpt import GPT
from structlm.training import train

# isort: split
from helpers import tiny_cfg


class KroneckerLinear(StructuredLinear):
    """W = A ⊗ B: A (f, f), B (d_out/f, d_in/f); y[i*m + a] = sum_j A[i, j] (B x_j)[a]."""

    kind = "kron"
    hparams = ("factor",)

    def __init__(self, d_in, d_out, *, factor, bias=True, init="default", init_std=0.02,
                 device=None, dtype=None):
        self.check(d_in, d_out, factor=factor)
        self.check_init(init)
        super().__init__(d_in, d_out, bias=bias, device=device, dtype=dtype)
        self.factor = factor
        self.a = nn.Parameter(torch.empty(factor, factor, device=device, dtype=dtype))
        self.b = nn.Parameter(torch.empty(d_out // factor, d_in // factor, device=device,
                                          dtype=dtype))
        self.reset_parameters(init, init_std)

    def matmul(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        f, lead = self.factor, x.shape[:-1]
        h = x.reshape(-1, f, self.d_in // f) @ self.b.T  # (T, f, m)
        y = (self.a @ h).reshape(*lead, self.d_out)  # (T, f, m) -> (..., f*m)
        return y if bias is None else y + bias.to(y.dtype)

    @classmethod
    def check(cls, d_in, d_out, **hp):
        super().check(d_in, d_out, **hp)
        if d_in % hp["factor"] or d_out % hp["factor"]:
            raise ValueError(f"factor={hp['factor']} must divide d_in={d_in} and d_out={d_out}")

    @classmethod
    def weight_params(cls, d_in, d_out, *, factor):
        return factor * factor + (d_in // factor) * (d_out // factor)

    @classmethod
    def weight_flops(cls, d_in, d_out, *, factor):
        m, n = d_out // factor, d_in // factor
        return 2 * factor * m * (n + factor)  # B on each of f chunks, then A mixes the chunks

    @classmethod
    def budget(cls, shapes, fraction, **given):
        dims = [d for s in shapes for d in s]
        target = fraction * sum(n * m for n, m in shapes)
        valid = [f for f in range(1, min(dims) + 1) if all(d % f == 0 for d in dims)]
        total = lambda f: sum(cls.weight_params(n, m, factor=f) for n, m in shapes)  # noqa: E731
        return {"factor": min(valid, key=lambda f: abs(math.log(total(f) / target)))}


@pytest.fixture(autouse=True, scope="module")
def kron():
    register(KroneckerLinear)
    yield KroneckerLinear
    unregister("kron")
    assert "kron" not in LINEARS


def kron_cfg(factor=2):
    cfg = PRESETS["tiny"]()
    cfg.model.ffn = LinearSpec("kron", params={"factor": factor})
    return from_dict(type(cfg), to_dict(cfg))  # validated, and it survives the JSON round trip


def test_the_toy_is_a_kronecker_product():
    layer = KroneckerLinear(6, 8, factor=2, dtype=torch.float64)
    torch.testing.assert_close(layer.to_dense(), torch.kron(layer.a, layer.b).detach())
    assert layer.count_params(6, 8, factor=2) == sum(p.numel() for p in layer.parameters())


def test_model_and_accounting_accept_the_toy():
    cfg = kron_cfg()
    model = GPT(cfg.model)
    assert isinstance(model.blocks[1].mlp.fc1, KroneckerLinear)
    assert param_groups(cfg.model)["total"] == sum(p.numel() for p in model.parameters())
    x = torch.randn(3, 5, cfg.model.d_model)
    with FlopCounterMode(display=False) as counter:
        model.blocks[1].mlp(x)
    toy = sum(KroneckerLinear.weight_flops(n, m, factor=2) for _, n, m in cfg.model.ffn_shapes())
    assert counter.get_total_flops() == 15 * toy  # 15 tokens through the kron FFN of block 1
    dense_block0 = 2 * sum(n * m for _, n, m in cfg.model.ffn_shapes())
    assert flops_per_token(cfg.model)["ffn"] == dense_block0 + toy


def test_config_validation_uses_the_toys_own_check():
    cfg = PRESETS["tiny"]()
    cfg.model.ffn = LinearSpec("kron", params={"factor": 3})  # 64 is not divisible by 3
    with pytest.raises(ValueError, match="model.ffn .*factor=3 must divide"):
        from_dict(type(cfg), to_dict(cfg))
    cfg.model.ffn = LinearSpec("kron", rank=4, params={"factor": 2})
    with pytest.raises(ValueError, match="rank=4 is not used by kind 'kron'"):
        from_dict(type(cfg), to_dict(cfg))


def test_choose_hparams_uses_the_toys_budget_rule():
    spec = choose_hparams("kron", [(64, 256), (256, 64)], 0.1)
    assert spec == LinearSpec("kron", params={"factor": 4})  # 2 x (16 + 16*64) = 6.3% vs 2 at 25%


def test_sgt_guides_and_unguides_the_toy(corpus, tmp_path):
    cfg = kron_cfg()
    model = GPT(cfg.model).double()
    idx = torch.randint(0, cfg.model.vocab_size, (2, 8))
    ref, _ = model(idx)
    wrap_guided(model)
    assert len(guided_layers(model)) == 2
    for alpha in (1.0, 0.3):  # the guide starts as the toy's own matrix: any mix is the same map
        set_guide(model, alpha)
        torch.testing.assert_close(model(idx)[0], ref)
    run = tiny_cfg(corpus, tmp_path / "run", max_steps=6, eval_interval=3)
    run.model.ffn = LinearSpec("kron", params={"factor": 2})
    run.train.sgt.mode, run.train.sgt.ratio = "fixedstep", 0.5
    s = train(from_dict(type(run), to_dict(run)))
    assert s.sgt["guided_steps"] == 3 and math.isfinite(s.final_val_loss)
    weights = (tmp_path / "run" / "checkpoints" / "step_0000006" / "model.safetensors")
    assert weights.exists()  # saved after the guides left: a plain toy model
    assert not any(".guide" in k for k in load_file(weights))


def test_premerge_and_merge_accept_the_toy():
    cfg = kron_cfg()
    model = GPT(cfg.model).double().eval()
    idx = torch.randint(0, cfg.model.vocab_size, (2, 8))
    ref, _ = model(idx)
    torch.testing.assert_close(merge_linears(model)(idx)[0], ref)
    premerge(model, 64)  # 16 tokens per call: the merged path
    torch.testing.assert_close(model(idx)[0], ref)


def run_cli(*argv) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        cli.main(list(argv))
    return out.getvalue()


def test_info_accepts_the_toy():
    info = json.loads(run_cli("info", "--preset", "tiny", "--model.ffn.kind", "kron",
                              "--model.ffn.params", "factor", "2", "--json"))
    assert info["ffn"] == {"kind": "kron", "factor": 2, "dense_ffn_layers": [0]}
    assert info["params_total"] == sum(p.numel() for p in GPT(kron_cfg().model).parameters())
    assert "kron" in info["kinds"]


def test_bench_kernel_accepts_the_toy():
    rows = kernels.bench_kernel(torch.device("cpu"), None, quick=True, kinds=["kron"])
    assert {r["kind"] for r in rows} == {"kron"} and len(rows) == 2
    assert all(r["factor"] == 2 and r["ms"] > 0 and r["ideal"] > 1 for r in rows)
    text = run_cli("bench", "kernel", "--quick", "--kinds", "kron")
    assert text.count("kron") == 2
