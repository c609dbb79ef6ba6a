"""Shared test setup: hypothesis profile, the gpu marker, seeded RNG, Triton's interpreter on CPU,
and the test corpus."""

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, max_examples=25, deadline=None)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, torch.get_num_threads()))
# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors (tests/test_triton.py).
# It is read when triton is first imported (by torch.utils.flop_counter, through structlm), so it is
# set before any test module imports structlm.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- the test corpus: small play-like documents that differ from each other --------------------

LINES = [
    "ROMEO: But soft, what light through yonder window breaks?",
    "JULIET: O Romeo, Romeo, wherefore art thou Romeo?",
    "MERCUTIO: A plague on both your houses, they have made worms' meat of me.",
    "HAMLET: To be, or not to be, that is the question.",
    "OPHELIA: There's rosemary, that's for remembrance.",
]


def doc_text(i: int, n_lines: int = 12) -> str:
    """A small document that differs from its siblings."""
    lines = (f"Scene {i}.{k}. {LINES[(i + k) % len(LINES)]}" for k in range(n_lines))
    return "\n\n".join(lines) + "\n"


def write_corpus(d: Path, n_docs: int = 6, n_lines: int = 12) -> Path:
    """A directory of `n_docs` text files (six: both splits get some)."""
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (d / f"doc{i}.txt").write_text(doc_text(i, n_lines))
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Documents long enough to train the tiny preset on; shared by a module's tests, which
    prepare them into `<corpus>-prepared` once."""
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs", n_lines=180)


@pytest.fixture
def fresh_corpus(tmp_path) -> Path:
    """Short documents in this test's own directory, for tests that change them."""
    return write_corpus(tmp_path / "corpus")
