"""The benchmark suite's code paths in quick mode: rows with the documented schema, no crash (no
timings are asserted: speed is measured by running `structlm bench`, never in tests)."""

import json
import subprocess
import sys

import pytest
import torch

import structlm.bench.decode as decode
import structlm.bench.kernels as kernels
import structlm.bench.suite as suite
import structlm.bench.train as bench_train_mod
from structlm.config import LinearSpec, ModelConfig

CPU = torch.device("cpu")
TINY = ModelConfig(vocab_size=128, block_size=64, n_layer=2, n_head=2, d_model=32, d_ff=128,
                   ffn=LinearSpec("lowrank", rank=8))
CONTEXT = {"bench", "device", "dtype", "torch"}


def check(rows, keys):
    assert rows
    for r in rows:
        assert CONTEXT | set(keys) <= set(r), set(keys) - set(r)
        json.dumps(r)  # JSON-serialisable


def test_peak_rows():
    check(kernels.bench_peak(CPU, None, quick=True), ["n", "ms", "gflops"])


@pytest.mark.parametrize("backward", [False, True])
def test_kernel_rows(backward):
    rows = kernels.bench_kernel(CPU, None, quick=True, backward=backward)
    check(rows, ["kind", "ms", "dense_ms", "same_flops_ms", "speedup", "ideal", "efficiency"])
    assert {r["kind"] for r in rows} == set(kernels.bench_kinds())


def test_ffn_rows_cover_every_kind_at_both_fractions():
    rows = kernels.bench_ffn(CPU, None, widths=(64,), tokens=(4,), fractions=(0.63, 0.32))
    check(rows, ["variant", "width", "tokens", "ms", "speedup", "ideal"])
    assert len(rows) == 1 + 2 * len(kernels.bench_kinds())
    assert {r["variant"] for r in rows} >= {"dense", "lowrank-32",
                                                               "blockshuffle-63"}
    assert next(r for r in rows if r["variant"] == "lowrank-32")["ideal"] == pytest.approx(3.2)


def test_model_benchmarks_rows():
    check(bench_train_mod.bench_train(TINY, CPU, None, batch=2, seq=16, steps=1, peak=50.0),
          ["variant", "tokens_per_s", "mfu", "speedup"])
    check(decode.bench_prefill(TINY, CPU, None, batch=2, seq=16, reps=1),
          ["variant", "tokens_per_s"])
    check(decode.bench_decode(TINY, CPU, None, prompt=4, gen=3, reps=1),
          ["variant", "ms_per_token", "vs_dense"])
    rows = decode.bench_maxbatch(TINY, CPU, None, gen=8, start=4, step=4, max_batch=8)
    check(rows, ["variant", "max_batch", "tokens_per_s"])
    assert all(r["max_batch"] == 8 and r["hit_limit"] for r in rows)


def test_cli_quick_writes_json_and_plot(tmp_path):
    out, png = tmp_path / "rows.jsonl", tmp_path / "ffn.png"
    r = subprocess.run([sys.executable, "-m", "structlm", "bench", "ffn", "--quick",
                        "--json", str(out), "--plot", str(png)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    check(rows, ["variant", "speedup"])
    assert png.stat().st_size > 1000


def test_ffn_compiled_rows():
    """--compile times compiled variants (one small width, one fraction: compiling is slow)."""
    rows = kernels.bench_ffn(torch.device("cpu"), None, widths=(64,), tokens=(8,), backward=True,
                           fractions=(0.32,), compile=True)
    assert {r["variant"] for r in rows} == {"dense"} | {f"{k}-32"
                                                        for k in kernels.bench_kinds()}
    assert all(r["compiled"] and r["ms"] > 0 for r in rows)
    for r in rows:  # each variant's eager self, timed in the same interleaved loop
        assert r["eager_ms"] > 0 and r["vs_eager"] == pytest.approx(r["eager_ms"] / r["ms"])
    dense = next(r for r in rows if r["variant"] == "dense")
    assert dense["speedup"] == pytest.approx(1, rel=1e-6)
    assert dense["eager_speedup"] == pytest.approx(1, rel=1e-6)


def test_ffn_eager_rows_have_no_compile_columns():
    rows = kernels.bench_ffn(torch.device("cpu"), None, widths=(64,), tokens=(8,),
                           fractions=(0.32,), kinds=["lowrank"])
    assert [r["variant"] for r in rows] == ["dense", "lowrank-32"]
    assert not any("vs_eager" in r or r["compiled"] for r in rows)


def test_compile_variants_lifts_the_recompile_limit():
    """Nine variants share MLP.forward: each compiles as a recompilation, so with dynamo's default
    limit (8) the ninth would silently run eagerly under --compile. dynamo's own `patch` restores
    the setting afterwards: pytest's monkeypatch undoes it with delattr, which hides the entry
    from every later torch.compile in the session."""
    with torch._dynamo.config.patch(recompile_limit=8):
        mods = {str(i): torch.nn.Linear(2, 2) for i in range(9)}
        compiled = kernels.compile_variants(mods)
        assert torch._dynamo.config.recompile_limit >= 4 * 9
        assert set(compiled) == set(mods)


@pytest.mark.slow
def test_memory_rows_from_torchrun_probes():
    """bench memory: one 2-rank torchrun per variant; a structured model holds fewer parameters,
    and every row has a peak and a throughput."""
    from structlm.bench.memory import bench_memory
    from structlm.bench.suite import quick_model

    cfg = quick_model(ModelConfig(ffn=LinearSpec("lowrank", rank=32)))
    rows = bench_memory(cfg, torch.device("cpu"), None, batch=2, seq=16, steps=1,
                        parallels=("fsdp",), modes=("none",))
    assert [(r["variant"], r["parallel"]) for r in rows] == [("dense", "fsdp"),
                                                            ("structured", "fsdp")]
    assert rows[1]["params"] < rows[0]["params"]
    assert all(r["peak_mib"] > 0 and r["tokens_per_s"] > 0 and r["world"] == 2 for r in rows)


@pytest.mark.parametrize(("name", "reps", "want"), [("kernel", None, 7), ("kernel", 2, 2),
                                                    ("ffn", None, 5), ("ffn", 3, 3)])
def test_reps_reach_kernel_and_ffn(monkeypatch, name, reps, want):
    """--reps is honoured by kernel and ffn (it once was silently ignored there)."""
    seen = []
    def fake(fns, device, reps, **kw):
        seen.append(reps)
        return {k: [1e-3] * reps for k in fns}
    for module in (decode, kernels, bench_train_mod):
        monkeypatch.setattr(module, "time_interleaved", fake)
    opts = suite.BenchOptions(torch.device("cpu"), None, reps=reps, widths=(64,), tokens=(8,),
                              kinds=("lowrank",))
    suite.BENCHMARKS[name].run(opts, ModelConfig())
    assert seen and set(seen) == {want}


@pytest.mark.slow
def test_serve_rows_from_the_load_generator():
    """bench serve --quick: three servers on loopback, every request answered."""
    pytest.importorskip("uvicorn")
    rows = suite.BENCHMARKS["serve"].run(
        suite.BenchOptions(torch.device("cpu"), None, quick=True),
        ModelConfig(ffn=LinearSpec("lowrank", rank=32)))
    assert {r["variant"] for r in rows} == {"dense", "structured", "structured+premerge"}
    assert all(r["errors"] == 0 and r["out_tok_per_s"] > 0 and r["ttft_p50_ms"] > 0
               for r in rows)


# A stand-in with nanoGPT's interface (GPTConfig, GPT(config), forward(idx, targets) -> (logits,
# loss), configure_optimizers), written for this test: structlm ships none of nanoGPT's code.
NANOGPT_LIKE = '''
from dataclasses import dataclass
import torch
from torch import nn

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.mlp = nn.Sequential(*[nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
                                   for _ in range(config.n_layer)])
        print("number of parameters:", sum(p.numel() for p in self.parameters()))

    def forward(self, idx, targets=None):
        logits = self.mlp(self.wte(idx)) @ self.wte.weight.T
        loss = nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        return torch.optim.AdamW(self.parameters(), lr=learning_rate, betas=betas,
                                 weight_decay=weight_decay)
'''


def test_train_against_a_nanogpt_style_file(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(NANOGPT_LIKE)
    rows = bench_train_mod.bench_train(TINY, CPU, None, batch=2, seq=16, steps=1, against=path)
    check(rows, ["variant", "params", "tokens_per_s", "speedup"])
    assert [r["variant"] for r in rows] == ["nanogpt", "dense", "structured"]
    assert rows[0]["speedup"] == 1.0  # the speed-ups are against nanoGPT's step
    assert rows[0]["params"] == 128 * 32 + 2 * (32 * 32 + 32)  # built at TINY's shapes
    assert rows[2]["params"] < rows[1]["params"]


def test_train_against_refuses_what_it_cannot_compare(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        bench_train_mod.load_nanogpt(tmp_path / "model.py", TINY, 16, CPU)
    (tmp_path / "other.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no GPT and GPTConfig"):
        bench_train_mod.load_nanogpt(tmp_path / "other.py", TINY, 16, CPU)
    swiglu = ModelConfig(**{**vars(TINY), "act": "swiglu"})
    with pytest.raises(ValueError, match="--model.act gelu --model.d_ff 128"):
        bench_train_mod.load_nanogpt(tmp_path / "other.py", swiglu, 16, CPU)
