"""The native tanh-GELU (activation.py, csrc/gelu.c) against PyTorch's, and its fallbacks."""

import ctypes
import math
import platform
import subprocess

import pytest
import torch
import torch.nn.functional as F

from structlm.ops import gelu as activation
from structlm.ops import native
from structlm.ops.gelu import gelu_tanh, sigmoid_form


def reference(x: torch.Tensor) -> torch.Tensor:
    """The function both kernels approximate, in fp64 and in the sigmoid form: the tanh form's
    1 + tanh cancels for x < -3 (in fp32) and x < -7 (even in fp64)."""
    x = x.double()
    return x * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))


def grads(fn, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    (dx,) = torch.autograd.grad(y, x, g)
    return y, dx


@pytest.fixture(autouse=True)
def _native(monkeypatch):
    monkeypatch.delenv(activation.GELU_ENV, raising=False)
    assert native.load("gelu") is not None, "the test machine has a C compiler"


def test_fp32_forward_and_backward_match_the_tanh_form():
    torch.manual_seed(0)
    x = torch.randn(257, 1031) * 4  # odd sizes: slices end mid cache line
    g = torch.randn_like(x)
    y, dx = grads(gelu_tanh, x, g)
    y_ref, dx_ref = grads(reference, x.double(), g.double())
    torch.testing.assert_close(y_ref, F.gelu(x.double(), approximate="tanh"), atol=1e-12, rtol=0)
    assert y.dtype == dx.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dx.double(), dx_ref, atol=1e-5, rtol=1e-5)
    # at least as close to the exact function as PyTorch's own fp32 kernel, within rounding
    y_aten, dx_aten = grads(lambda t: F.gelu(t, approximate="tanh"), x, g)
    assert (y.double() - y_ref).abs().max() <= 2 * (y_aten.double() - y_ref).abs().max() + 1e-7


def test_bf16_rounds_the_fp32_result_once():
    torch.manual_seed(1)
    x = (torch.randn(64, 4096) * 3).bfloat16()
    g = torch.randn_like(x)
    y, dx = grads(gelu_tanh, x, g)
    y32, dx32 = grads(gelu_tanh, x.float(), g.float())
    assert y.dtype == dx.dtype == torch.bfloat16
    assert torch.equal(y, y32.bfloat16())
    assert torch.equal(dx, dx32.bfloat16())
    # within one unit of the exact value rounded, everywhere; PyTorch's kernel is not, at x < -3,
    # where 1 + tanh cancels (and rounds to 0 below about -4)
    exact = reference(x).bfloat16()
    units = lambda a: (a.view(torch.int16).int() - exact.view(torch.int16).int()).abs()  # noqa: E731
    tiny = exact.abs() < 2e-37  # our kernel flushes gelu(x < -10.05) to -0
    assert units(y)[~tiny].max() <= 1 and (y == exact).float().mean() > 0.99
    assert units(F.gelu(x, approximate="tanh")).max() > 1


def test_special_values():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 30.0, -30.0, 1e-30,
                      -10.0, -10.1])
    y, dx = grads(gelu_tanh, x, torch.ones_like(x))
    assert y[0].isnan() and dx[0].isnan()
    assert y[1:].tolist() == [float("inf"), 0.0, 0.0, 0.0, 30.0, 0.0, pytest.approx(5e-31),
                              pytest.approx(-1.2e-37, rel=0.05), 0.0]
    assert dx[1:].tolist() == [1.0, 0.0, 0.5, 0.5, 1.0, 0.0, pytest.approx(0.5),
                               pytest.approx(-1e-35, rel=0.1), 0.0]


def test_shapes_threads_and_layouts_agree(monkeypatch):
    torch.manual_seed(2)
    x = torch.randn(3, 70001)
    want = gelu_tanh(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the kernel's OpenMP loop on one thread
        assert torch.equal(gelu_tanh(x), want)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(gelu_tanh(x.view(-1)).view(x.shape), want)
    # non-contiguous input: PyTorch's kernel, the same function
    xt = x.t()
    torch.testing.assert_close(gelu_tanh(xt), F.gelu(xt, approximate="tanh"))
    assert gelu_tanh(torch.empty(0, 5)).shape == (0, 5)


def test_compiled_form_and_aten_choice(monkeypatch):
    x = torch.randn(100, 33)
    torch.testing.assert_close(sigmoid_form(x), gelu_tanh(x), atol=1e-6, rtol=1e-6)
    monkeypatch.setenv(activation.GELU_ENV, "aten")
    assert torch.equal(gelu_tanh(x), F.gelu(x, approximate="tanh"))
    monkeypatch.setenv(activation.GELU_ENV, "fast")
    with pytest.raises(ValueError, match="STRUCTLM_GELU='fast': choose native or aten"):
        gelu_tanh(x)


def test_no_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("STRUCTLM_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-cc")
    x = torch.randn(10, 10)
    with pytest.warns(UserWarning, match=r"gelu\.c\) could not be built: no C compiler"):
        y = gelu_tanh(x)
    assert torch.equal(y, F.gelu(x, approximate="tanh"))
    assert list(tmp_path.iterdir()) == []


def test_build_is_cached_per_machine(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("STRUCTLM_CACHE", str(tmp_path))
    assert native.load("gelu") is not None
    (built,) = tmp_path.glob("gelu-*.so")
    stamp = built.stat().st_mtime_ns
    monkeypatch.setattr(native, "_loaded", {})
    assert native.load("gelu") is not None
    assert built.stat().st_mtime_ns == stamp and len(list(tmp_path.iterdir())) == 1


def test_broken_source_warns_with_the_compiler_message(monkeypatch, tmp_path):
    (tmp_path / "gelu.c").write_text("this is not C\n")
    monkeypatch.setattr(native, "CSRC", tmp_path)
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("STRUCTLM_CACHE", str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="could not be built: .*error"):
        assert native.load("gelu") is None


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="an x86 flag")
def test_bf16_vector_path_is_bitwise_the_portable_one(tmp_path):
    """Where the compiler targets AVX512-BF16 the bf16 kernels are AVX512 intrinsics with the
    hardware rounding; built without it they are the portable loops. Both give the same bits,
    subnormals (which the instruction would flush) and special values included."""
    portable = tmp_path / "gelu_portable.so"
    subprocess.run([native._compiler(), *native.FLAGS, native.OPENMP, "-mno-avx512bf16", "-o",
                    str(portable), str(native.CSRC / "gelu.c")], check=True, capture_output=True)
    fast, slow = native.load("gelu"), ctypes.CDLL(str(portable))
    torch.manual_seed(3)
    special = torch.tensor([0.0, -0.0, 1e-39, -1e-39, 3e-38, 1e-30, float("nan"), float("inf"),
                            -float("inf"), 20.0, 20.5, -10.0, -10.06, -10.1, 1e5, -1e5])
    x = torch.cat([special, torch.randn(100_000) * 4, special[:7]]).bfloat16()  # a ragged tail
    g = torch.cat([torch.full((16,), 1e-39), torch.randn(x.numel() - 16)]).bfloat16()
    out = {}
    for name, lib in (("fast", fast), ("slow", slow)):
        y, dx = torch.empty_like(x), torch.empty_like(x)
        native.call(lib.gelu_fwd_bf16, [x, y], x.numel())
        native.call(lib.gelu_bwd_bf16, [x, g, dx], x.numel())
        out[name] = y.view(torch.int16), dx.view(torch.int16)
    assert torch.equal(out["fast"][0], out["slow"][0])
    assert torch.equal(out["fast"][1], out["slow"][1])
    y, dx = (t.view(torch.bfloat16) for t in out["fast"])
    assert y[2] > 0 and dx[0] > 0  # gelu(1e-39) and 0.5 * 1e-39: subnormals, kept
