"""structlm.native's OpenMP runtime check: one runtime in the process, or one warning."""

import warnings

import pytest

from structlm import native

TORCH_GOMP = "/site-packages/torch/lib/libgomp.so.1"


def maps(*paths: str) -> str:
    """/proc/self/maps lines for these files (and an anonymous mapping)."""
    lines = [f"7f00{i:04x}000-7f00{i:04x}fff r-xp 00000000 08:01 {i} {p}"
             for i, p in enumerate(paths)]
    return "\n".join([*lines, "7ffd0000-7ffd1000 rw-p 00000000 00:00 0 "])


def test_runtimes_are_read_from_the_maps():
    text = maps(TORCH_GOMP, "/opt/conda/lib/libiomp5.so", "/usr/lib/libomp.so.5",
                "/x/torch.libs/libgomp-a34b3233.so.1.0.0", "/usr/lib/libomptarget.so",
                "/usr/lib/libc.so.6", "/tmp/gelu-0123456789abcdef.so")
    assert native.openmp_runtimes(text) == {
        TORCH_GOMP, "/opt/conda/lib/libiomp5.so", "/usr/lib/libomp.so.5",
        "/x/torch.libs/libgomp-a34b3233.so.1.0.0"}


def test_loading_a_kernel_adds_no_runtime_here(monkeypatch):
    """PyTorch's wheel ships libgomp: our kernels bind to that very copy, by soname."""
    monkeypatch.setattr(native, "_loaded", {})  # load it again, even if an earlier test did
    before = native.openmp_runtimes()
    assert before, "PyTorch's CPU wheel runs on OpenMP"
    assert native.load("gelu") is not None
    assert native.openmp_runtimes() == before


def test_a_second_runtime_warns_once_and_names_the_fix(monkeypatch):
    monkeypatch.setattr(native, "_warned", [])
    before = {"/opt/conda/lib/libiomp5.so"}
    with pytest.warns(UserWarning, match=r"libgomp\.so\.1 beside PyTorch's .*libiomp5\.so.*"
                                         r"OMP_WAIT_POLICY=passive.*STRUCTLM_GELU=aten"):
        native.warn_second_runtime(before, before | {"/usr/lib/libgomp.so.1"}, "gelu")
    with warnings.catch_warnings():  # the next kernel's load: the same runtime, no second warning
        warnings.simplefilter("error")
        native.warn_second_runtime(before, before | {"/usr/lib/libgomp.so.1"}, "xent")


@pytest.mark.parametrize(("before", "after"), [
    (set(), {"/usr/lib/libgomp.so.1"}),  # PyTorch without OpenMP: ours is the only runtime
    ({TORCH_GOMP}, {TORCH_GOMP}),  # the usual case: the same copy
])
def test_one_runtime_is_quiet(before, after):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        native.warn_second_runtime(before, after, "gelu")
