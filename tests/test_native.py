"""structlm.ops.native: flags by architecture (and a cross-build for aarch64), the OpenMP runtime
check, the build folder's fallback and one warning per process."""

import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import pytest

from structlm.ops import native

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
    """A kernel's libgomp beside another copy of it (a wheel's renamed one) is still two pools."""
    monkeypatch.setattr(native, "_warned", [])
    before = {"/x/torch.libs/libgomp-a34b3233.so.1.0.0"}
    with pytest.warns(UserWarning, match=r"libgomp\.so\.1 beside PyTorch's .*libgomp-a34b3233.*"
                                         r"OMP_WAIT_POLICY=passive.*STRUCTLM_GELU=aten"):
        native.warn_second_runtime(before, before | {"/usr/lib/libgomp.so.1"}, "gelu")
    with warnings.catch_warnings():  # the next kernel's load: the same runtime, no second warning
        warnings.simplefilter("error")
        native.warn_second_runtime(before, before | {"/usr/lib/libgomp.so.1"}, "xent")


@pytest.mark.parametrize(("runtimes", "other"), [
    ({TORCH_GOMP, "/opt/conda/lib/libiomp5.so"}, "/opt/conda/lib/libiomp5.so"),
    ({"/usr/lib/libomp.so.5"}, "/usr/lib/libomp.so.5"),
    ({TORCH_GOMP, "/x/torch.libs/libgomp-a34b3233.so.1.0.0"}, None),
    (set(), None),
])
def test_other_runtime_is_any_but_libgomp(runtimes, other):
    assert native.other_runtime(runtimes) == other


def test_pytorch_on_another_runtime_keeps_its_ops_with_one_warning(monkeypatch):
    """Where PyTorch runs on libiomp5, no kernel is built or loaded: one warning, then None."""
    text = maps("/opt/conda/lib/libiomp5.so", "/usr/lib/libc.so.6")
    real = native.openmp_runtimes
    monkeypatch.setattr(native, "openmp_runtimes", lambda m=None: real(text if m is None else m))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_build", lambda *a: pytest.fail("built beside libiomp5"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [native.load(k) for k in ("gelu", "xent", "rope")] == [None] * 3
    (w,) = caught
    assert "libiomp5.so" in str(w.message) and "uses PyTorch's ops" in str(w.message)
    assert native.kernel("gelu", "gelu_fwd_f32", "STRUCTLM_GELU") is None


def test_no_compiler_warns_once_for_all_kernels(monkeypatch):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.setattr(native, "openmp_runtimes", lambda maps=None: set())
    monkeypatch.setattr(native, "_loaded", {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning given is recorded, repeats included
        assert [native.load(k) for k in ("gelu", "xent", "rope", "shuffle")] == [None] * 4
    (w,) = caught
    assert "(gelu.c) could not be built: no C compiler" in str(w.message)
    assert "PyTorch's ops" in str(w.message)


@pytest.mark.parametrize("how", ["below-a-file", "chmod"])
def test_an_unwritable_cache_builds_in_a_temporary_folder(how, monkeypatch, tmp_path):
    """A cache path below a plain file cannot be made, as root too (where chmod stops nothing)."""
    if how == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root writes through chmod 0o500; below-a-file covers it")
        cache = tmp_path / "cache"
        cache.mkdir()
        cache.chmod(0o500)
    else:
        (tmp_path / "file").write_text("")
        cache = tmp_path / "file" / "cache"
    monkeypatch.setenv("STRUCTLM_CACHE", str(cache))
    monkeypatch.setattr(native, "_loaded", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lib = native.load("gelu")
    assert lib is not None and hasattr(lib, "gelu_fwd_f32")
    built = Path(lib._name)
    assert built.parent == native._scratch() and built.is_relative_to(tempfile.gettempdir())


def test_a_read_only_cache_is_read_but_not_written(monkeypatch, tmp_path):
    """A kernel already in a read-only cache is loaded from it; a missing one is built aside."""
    monkeypatch.setenv("STRUCTLM_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    assert native.load("gelu") is not None
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_build_dir", native._scratch)  # as where writes fail
    assert Path(native.load("gelu")._name).parent == tmp_path
    assert Path(native.load("xent")._name).parent == native._scratch()


@pytest.mark.parametrize(("machine", "flags"), [
    ("x86_64", ("-march=native", "-mprefer-vector-width=512")),
    ("AMD64", ("-march=native", "-mprefer-vector-width=512")),
    ("aarch64", ("-mcpu=native",)),
    ("arm64", ("-mcpu=native",)),
    ("riscv64", ()),
    ("ppc64le", ()),
])
def test_flags_follow_the_architecture(machine, flags):
    assert native.arch_flags(machine) == flags
    assert native.compile_flags(machine) == ("-O3", *flags, "-fno-math-errno", "-shared", "-fPIC")


def test_the_cache_key_has_the_flags(monkeypatch, tmp_path):
    """The same source built with another architecture's flags is another file."""
    def run(cmd, **kwargs):  # the compiler's part: write the -o file
        Path(cmd[cmd.index("-o") + 1]).write_bytes(b"")
    monkeypatch.setattr(native, "subprocess", type("Sub", (), {"run": staticmethod(run)}))
    monkeypatch.setenv("STRUCTLM_CACHE", str(tmp_path))
    built = set()
    for machine in ("x86_64", "aarch64", "riscv64", "x86_64"):
        monkeypatch.setattr(native, "FLAGS", native.compile_flags(machine))
        built.add(native._build(native.CSRC / "gelu.c", "cc"))
    assert len(built) == 3 and {p.parent for p in built} == {tmp_path}


AARCH64_CC = "aarch64-linux-gnu-gcc"


@pytest.mark.skipif(shutil.which(AARCH64_CC) is None,
                    reason=f"no {AARCH64_CC} on PATH (Debian: apt-get install "
                           f"gcc-aarch64-linux-gnu)")
@pytest.mark.parametrize("cpu", ["-mcpu=generic", "-march=armv8.2-a+bf16"])
@pytest.mark.parametrize("src", sorted(native.CSRC.glob("*.c")), ids=lambda p: p.name)
def test_every_kernel_compiles_for_aarch64(src, cpu, tmp_path):
    """The aarch64 flags, with a named CPU for -mcpu=native (a cross build cannot probe one);
    -Werror, so an x86 intrinsic outside its guard (an implicit declaration) fails here."""
    flags = [cpu if f == "-mcpu=native" else f for f in native.compile_flags("aarch64")]
    assert cpu in flags and not any(f.startswith(("-march=native", "-mprefer")) for f in flags)
    flags.remove("-shared")
    r = subprocess.run([AARCH64_CC, *flags, native.OPENMP, "-Werror", "-c", "-o",
                        str(tmp_path / f"{src.stem}.o"), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / f"{src.stem}.o").stat().st_size > 0


@pytest.mark.parametrize(("before", "after"), [
    (set(), {"/usr/lib/libgomp.so.1"}),  # PyTorch without OpenMP: ours is the only runtime
    ({TORCH_GOMP}, {TORCH_GOMP}),  # the usual case: the same copy
])
def test_one_runtime_is_quiet(before, after):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        native.warn_second_runtime(before, after, "gelu")
