"""The same code on a CUDA device: every kind and the whole model agree with the CPU, in fp32 (with
the Triton kernels and without) and under bf16 autocast, and pre-merge and training run unchanged.
Skipped without a GPU."""

import json

import pytest
import torch
from helpers import tiny_cfg
from linear_cases import small_hparams

from structlm.config import PRESETS
from structlm.linear import LINEARS, LinearSpec, build_linear, premerge
from structlm.model.gpt import GPT
from structlm.training import train

pytestmark = pytest.mark.gpu
KINDS = sorted(LINEARS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("triton", ["auto", "0"])  # the Triton kernels where installed; bmm path
def test_layer_on_cuda_matches_cpu_values_and_grads(kind, triton, monkeypatch):
    monkeypatch.setenv("STRUCTLM_TRITON", triton)
    torch.manual_seed(0)
    layer = build_linear(LinearSpec.of(kind, **small_hparams(kind, 64, 256)), 64, 256)
    x = torch.randn(37, 64, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    gpu = build_linear(LinearSpec.of(kind, **small_hparams(kind, 64, 256)), 64, 256).cuda()
    gpu.load_state_dict(layer.state_dict())
    xg = x.detach().cuda().requires_grad_()
    yg = gpu(xg)
    yg.square().sum().backward()
    # fp32 on both; CUDA matmuls may use TF32-free but differently ordered sums
    torch.testing.assert_close(yg.cpu(), y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xg.grad.cpu(), x.grad, rtol=1e-4, atol=1e-5)
    for (name, p), pg in zip(layer.named_parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(pg.grad.cpu(), p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_layer_under_cuda_bf16_autocast_is_close_to_fp32(kind):
    layer = build_linear(LinearSpec.of(kind, **small_hparams(kind, 128, 512)), 128, 512).cuda()
    x = torch.randn(64, 128, device="cuda")
    ref = layer(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: a few 1e-3 relative on sums of 128 products
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())


def test_model_premerged_on_cuda_equals_the_structured_model():
    cfg = PRESETS["tiny"]().model
    model = GPT(cfg).cuda().eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 16), device="cuda")
    with torch.no_grad():
        ref, _ = model(idx)
        premerge(model, 64)  # 32 tokens per call: the merged matrices
        out, _ = model(idx)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def _train_losses(run) -> list[float]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def test_training_on_cuda_follows_the_cpu_trajectory(corpus, tmp_path):
    """Six fp32 steps of the tiny model: the same data and init, so the same losses up to float
    summation order (CUDA fp32 matmuls do not use TF32 unless asked)."""
    runs = {}
    for device in ("cpu", "cuda"):
        cfg = tiny_cfg(corpus, tmp_path / device, max_steps=6, eval_interval=3)
        cfg.train.device = device
        assert train(cfg).device.startswith(device)
        runs[device] = _train_losses(tmp_path / device)
    assert len(runs["cuda"]) == 6
    torch.testing.assert_close(runs["cuda"], runs["cpu"], rtol=0, atol=1e-3)
