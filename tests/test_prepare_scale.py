"""Preparation at scale: compressed JSONL and Parquet corpora, worker processes, sharded token files
read as one sequence, and resuming an interrupted preparation; each gives exactly the tokens of
the plain one-process preparation."""

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest

from structlm.config import DataConfig
from structlm.data.batches import Batches, load_meta, load_tokens
from structlm.data.prepare import prepare

# isort: split
from conftest import doc_text  # the tests directory is on sys.path under pytest

N_DOCS = 12


def cfg_for(source, out, **kw) -> DataConfig:
    return DataConfig(source=str(source), data_dir=str(out), vocab_size=300, val_fraction=0.25,
                      tokenizer=kw.pop("tokenizer", None), **kw)


def tokens(d, split="train") -> np.ndarray:
    return np.asarray(load_tokens(d, split)[:])


@pytest.fixture(scope="module")
def texts():
    return [doc_text(i, 30) for i in range(N_DOCS)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, texts):
    """The texts as one .txt file per document, prepared by one process."""
    src = tmp_path_factory.mktemp("txt")
    for i, t in enumerate(texts):
        (src / f"d{i:02d}.txt").write_text(t)
    return src, prepare(cfg_for(src, src.parent / "txt-prepared", workers=1), progress=False)


def test_jsonl_gz_zst_and_parquet_give_the_tokens_of_text_files(tmp_path, texts, reference):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    zstandard = pytest.importorskip("zstandard")
    tok = str(reference[1] / "tokenizer.json")  # the same BPE, so only the reading differs
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    (tmp_path / "c.jsonl").write_text(lines)
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    pq.write_table(pa.table({"text": texts, "id": list(range(N_DOCS))}), tmp_path / "c.parquet",
                   row_group_size=5)
    ref_tok = prepare(cfg_for(reference[0], tmp_path / "ref", tokenizer=tok), progress=False)
    for name in ("c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.parquet"):
        out = prepare(cfg_for(tmp_path / name, tmp_path / f"out-{name}", tokenizer=tok),
                      progress=False)
        for split in ("train", "val"):
            assert np.array_equal(tokens(out, split), tokens(ref_tok, split)), (name, split)


def test_parquet_without_the_text_column_is_refused(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": ["a b c"] * 4}), tmp_path / "c.parquet")
    with pytest.raises(ValueError, match=r"no column 'text'.*--data.text_field"):
        prepare(cfg_for(tmp_path / "c.parquet", tmp_path / "out"), progress=False)


def test_workers_and_shards_change_files_not_tokens(tmp_path, reference):
    src, ref = reference
    out = prepare(cfg_for(src, tmp_path / "two", workers=2, shard_tokens=2000), progress=False)
    meta = load_meta(out)
    assert len(meta["shards"]["train"]) > 2 and (out / "train-00000.bin").exists()
    assert not (out / "train.bin").exists()
    for split in ("train", "val"):
        assert np.array_equal(tokens(out, split), tokens(ref, split))
    assert (out / "tokenizer.json").read_bytes() == (ref / "tokenizer.json").read_bytes()
    sharded, whole = load_tokens(out, "train"), tokens(ref)
    a, b = Batches(sharded, 64, 8, seed=3), Batches(whole, 64, 8, seed=3)
    for step in range(12):  # windows straddling shard boundaries included
        xa, ya = a.rows(step, 0, 8)
        xb, yb = b.rows(step, 0, 8)
        assert xa.equal(xb) and ya.equal(yb)


KILLED = """
import os, signal, sys
import structlm.data.prepare as prep
from structlm.config import DataConfig
real, done = prep._encode_task, []
def counted(*args, **kw):
    if len(done) == int(sys.argv[3]):  # that many files tokenized and published: killed
        os.kill(os.getpid(), signal.SIGKILL)
    done.append(1)
    return real(*args, **kw)
prep._encode_task = counted
prep.prepare(DataConfig(source=sys.argv[1], data_dir=sys.argv[2], vocab_size=300,
                        val_fraction=0.25, workers=1), progress=False)
print(f"encoded {len(done)} files")
"""


def test_an_interrupted_preparation_resumes_with_what_it_finished(tmp_path, reference):
    src, ref = reference
    out = tmp_path / "out"
    run = lambda kill_after: subprocess.run(  # noqa: E731
        [sys.executable, "-c", KILLED, str(src), str(out), str(kill_after)], capture_output=True,
        text=True, timeout=300)
    r = run(3)
    assert r.returncode == -9, r.stderr[-2000:]
    work = tmp_path / ".out.partial"
    assert not out.exists() and len(list(work.glob("train-*.bin"))) == 3
    r = run(-1)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming the preparation" in r.stdout and "training a byte-level BPE" not in r.stdout
    assert f"encoded {N_DOCS - 3} files" in r.stdout  # the three finished files are not redone
    assert not work.exists()
    for split in ("train", "val"):
        assert np.array_equal(tokens(out, split), tokens(ref, split))


def test_prepare_takes_workers_and_shard_size_from_the_command_line(tmp_path, reference):
    r = subprocess.run([sys.executable, "-m", "structlm", "prepare", "--data.source",
                        str(reference[0]), "--data.data_dir", str(tmp_path / "o"),
                        "--data.vocab_size", "300", "--data.val_fraction", "0.25",
                        "--data.workers", "2", "--data.shard_tokens", "3000"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(2 worker(s))" in r.stdout and len(load_meta(tmp_path / "o")["shards"]["train"]) > 1
    assert np.array_equal(tokens(tmp_path / "o"), tokens(reference[1]))
