"""Data: every source type, determinism, reuse and refusal, errors, Batches, eval_batches."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import structlm.data.prepare as prep
import structlm.data.sources as sources
from structlm.config import DataConfig
from structlm.data.batches import Batches, eval_batches, load_meta, load_tokens
from structlm.data.prepare import prepare, resolve_data_dir, token_dtype
from structlm.data.tokenizer import encode_text_file, load_tokenizer
from structlm.utils.files import file_sha256

# isort: split
from conftest import doc_text  # the tests directory is on sys.path under pytest


def cfg_for(source, out, **kw) -> DataConfig:
    return DataConfig(
        source=str(source), data_dir=str(out), vocab_size=300, val_fraction=0.25, **kw
    )


def read_split(d, split) -> np.ndarray:
    return np.asarray(load_tokens(d, split))


def check_prepared(d, n_docs: int) -> dict:
    """The invariants every prepared directory satisfies."""
    meta = load_meta(d)
    tok = load_tokenizer(d)
    assert meta["n_docs"]["train"] + meta["n_docs"]["val"] == n_docs
    assert meta["n_docs"]["train"] >= 1 and meta["n_docs"]["val"] >= 1
    assert meta["vocab_size"] == tok.get_vocab_size() <= 300
    assert meta["dtype"] == "uint16" and meta["eot_id"] == tok.token_to_id("<|endoftext|>")
    for split in ("train", "val"):
        ids = read_split(d, split)
        assert len(ids) == meta[f"{split}_tokens"] > 0
        assert ids.max() < meta["vocab_size"]
        assert (ids == meta["eot_id"]).sum() == meta["n_docs"][split]  # one eot per document ...
        assert ids[-1] == meta["eot_id"]  # ... after each one
    return meta


# --- sources --------------------------------------------------------------------------------------


def test_prepare_text_file_splits_the_single_document(tmp_path):
    """One file is one document; it is cut into parts so both splits get text."""
    f = tmp_path / "play.txt"
    f.write_text("".join(doc_text(i) for i in range(8)))
    out = prepare(cfg_for(f, tmp_path / "out"), progress=False)
    n_docs = load_meta(out)["n_docs"]
    assert 50 <= n_docs["train"] + n_docs["val"] <= 100  # about prep._PARTS parts
    meta = check_prepared(out, n_docs=n_docs["train"] + n_docs["val"])
    assert meta["n_docs"]["val"] == round(0.25 * (n_docs["train"] + n_docs["val"]))
    decoded = load_tokenizer(out).decode(read_split(out, "train").tolist())
    assert "wherefore art thou Romeo" in decoded


def test_prepare_directory_takes_text_files_recursively(tmp_path):
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.txt", "b.md", "sub/c.rst", "sub/d.text"]):
        (src / name).write_text(doc_text(i))
    (src / "notes.csv").write_text("x,y\n1,2\n")  # not a text suffix: ignored
    (src / ".hidden.txt").write_text("secret\n")  # hidden: ignored
    (src / "empty.txt").write_text("  \n\n")  # whitespace only: skipped
    out = prepare(cfg_for(src, tmp_path / "out"), progress=False)
    check_prepared(out, n_docs=4)
    assert "secret" not in load_tokenizer(out).decode(read_split(out, "train").tolist())


def test_prepare_glob_pattern(tmp_path):
    for i in range(5):
        (tmp_path / f"doc{i}.txt").write_text(doc_text(i))
    (tmp_path / "other.md").write_text(doc_text(9))
    out = prepare(cfg_for(tmp_path / "doc*.txt", tmp_path / "out"), progress=False)
    meta = check_prepared(out, n_docs=5)
    assert "5 file(s)" in meta["source"]


def test_prepare_jsonl_one_document_per_line(tmp_path):
    f = tmp_path / "docs.jsonl"
    rows = [{"content": doc_text(i), "id": i} for i in range(6)] + [{"content": ""}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = prepare(cfg_for(f, tmp_path / "out", text_field="content"), progress=False)
    check_prepared(out, n_docs=6)  # the empty text and the blank line are skipped


def test_prepare_jsonl_missing_field_names_line_and_field(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"text": "a b c"}) + "\n" + json.dumps({"body": "d e f"}) + "\n")
    with pytest.raises(ValueError, match=r"line 2.*'text'.*--data.text_field"):
        prepare(cfg_for(f, tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_prepare_with_given_tokenizer_reproduces_ids(tmp_path):
    for i in range(4):
        (tmp_path / f"d{i}.txt").write_text(doc_text(i))
    first = prepare(cfg_for(tmp_path / "d*.txt", tmp_path / "a"), progress=False)
    cfg = DataConfig(source=str(tmp_path / "d*.txt"), tokenizer=str(first / "tokenizer.json"),
                     data_dir=str(tmp_path / "b"), val_fraction=0.25)
    second = prepare(cfg, progress=False)
    for split in ("train", "val"):
        np.testing.assert_array_equal(read_split(first, split), read_split(second, split))
    assert load_meta(second)["tokenizer_sha256"] == load_meta(first)["tokenizer_sha256"]


# --- determinism, reuse, refusal, errors ----------------------------------------------------------


def test_prepare_is_deterministic(fresh_corpus, tmp_path):
    a = prepare(cfg_for(fresh_corpus, tmp_path / "a"), progress=False)
    b = prepare(cfg_for(fresh_corpus, tmp_path / "b"), progress=False)
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert load_meta(a) == load_meta(b)


def test_prepare_reuses_matching_data_without_rewriting(fresh_corpus, tmp_path, capsys):
    out = prepare(cfg_for(fresh_corpus, tmp_path / "out"), progress=False)
    stamps = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    assert "prepared" in capsys.readouterr().out
    assert prepare(cfg_for(fresh_corpus, tmp_path / "out"), progress=False) == out
    assert "reusing prepared data at" in capsys.readouterr().out
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == stamps


def test_prepare_refuses_a_directory_holding_other_data(fresh_corpus, tmp_path):
    out = prepare(cfg_for(fresh_corpus, tmp_path / "out"), progress=False)
    before = (out / "train.bin").read_bytes()
    other = DataConfig(source=str(fresh_corpus), data_dir=str(out), vocab_size=280,
                       val_fraction=0.25)
    with pytest.raises(FileExistsError, match="something else.*--data.data_dir"):
        prepare(other, progress=False)
    (fresh_corpus / "doc0.txt").write_text(doc_text(7, 13))  # the source changed
    with pytest.raises(FileExistsError):
        prepare(cfg_for(fresh_corpus, out), progress=False)
    assert (out / "train.bin").read_bytes() == before


def test_source_none_uses_the_prepared_data_as_it_is(fresh_corpus, tmp_path, capsys):
    out = prepare(cfg_for(fresh_corpus, tmp_path / "out"), progress=False)
    stamps = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    (fresh_corpus / "doc0.txt").write_text(doc_text(7, 13))  # the source changed since: no matter
    assert prepare(DataConfig(source=None, data_dir=str(out), vocab_size=999)) == out
    assert f"using the data prepared in {out} (from {fresh_corpus}" in capsys.readouterr().out
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == stamps
    with pytest.raises(FileNotFoundError, match="no prepared data.*structlm prepare"):
        prepare(DataConfig(source=None, data_dir=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="no data.data_dir"):
        DataConfig(source=None)


def test_prepare_refuses_non_empty_directory_without_meta(fresh_corpus, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="no meta.json"):
        prepare(cfg_for(fresh_corpus, tmp_path / "out"), progress=False)
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"


def test_prepare_fills_an_empty_directory_and_leaves_no_temp(fresh_corpus, tmp_path):
    (tmp_path / "out").mkdir()
    prepare(cfg_for(fresh_corpus, tmp_path / "out"), progress=False)
    assert load_meta(tmp_path / "out")["n_docs"]["train"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda p: p / "missing.txt", FileNotFoundError, "not found"),
        (lambda p: p / "nothing*.txt", FileNotFoundError, "matches no files"),
        (lambda p: (p / "d").mkdir() or p / "d", FileNotFoundError, "no text files"),
        (lambda p: (p / "e.txt").write_text(" \n\t\n") and p / "e.txt", ValueError, "no text"),
        (lambda p: (p / "w.txt").write_text("word") and p / "w.txt", ValueError, "too short"),
    ],
    ids=["missing-file", "empty-glob", "dir-without-text", "whitespace-only", "one-word"],
)
def test_prepare_bad_corpus_fails_before_writing(tmp_path, make, error, match):
    source = make(tmp_path)
    out = tmp_path / "data" / "out"
    with pytest.raises(error, match=match):
        prepare(cfg_for(source, out), progress=False)
    assert not (tmp_path / "data").exists()


def test_load_meta_errors_name_path_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="structlm prepare"):
        load_meta(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json"):
        load_meta(tmp_path)


def test_load_tokens_checks_split_and_size(fresh_corpus, tmp_path):
    out = prepare(cfg_for(fresh_corpus, tmp_path / "out"), progress=False)
    with pytest.raises(ValueError, match="'train' or 'val'"):
        load_tokens(out, "test")
    ids = load_tokens(out, "val")
    assert isinstance(ids, np.memmap) and not ids.flags.writeable
    with open(out / "val.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="does not hold"):
        load_tokens(out, "val")


def test_token_dtype_widens_past_uint16():
    assert token_dtype(8192) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32
    assert token_dtype(128256) == np.uint32


def test_resolve_data_dir_names(tmp_path):
    assert resolve_data_dir(DataConfig()) == Path("data/shakespeare-bpe8192")
    assert resolve_data_dir(DataConfig(source="books/My Novel.txt", vocab_size=512)).name == (
        "My-Novel-bpe512"
    )
    pattern = str(tmp_path / "wiki" / "*.txt")
    assert resolve_data_dir(DataConfig(source=pattern)).name == "wiki-bpe8192"
    assert resolve_data_dir(DataConfig(data_dir="x/y")) == Path("x/y")
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    name = resolve_data_dir(DataConfig(source="shakespeare", tokenizer=str(tok))).name
    assert name == f"shakespeare-{file_sha256(tok)[:8]}"


def test_chunked_encoding_equals_whole_encoding():
    """_chunks cuts only where the byte-level pre-tokenizer splits anyway."""
    text = "".join(doc_text(i, 30) for i in range(10)) + "  trailing  \n\n\n  indented\nend it's"
    text += " 3.14, x\ty  z\n \n" * 20
    tok = prep._train_bpe(iter([text]), 400, progress=False)
    whole = tok.encode(text).ids
    for size in (1, 7, 50, 333):
        pieces = list(sources._chunks([text[i : i + 97] for i in range(0, len(text), 97)], size))
        assert "".join(pieces) == text and len(pieces) > 3
        assert sum((e.ids for e in tok.encode_batch(pieces)), []) == whole


def test_encode_text_file(fresh_corpus, tmp_path):
    out = prepare(cfg_for(fresh_corpus, tmp_path / "out"), progress=False)
    tok = load_tokenizer(out)
    ids = encode_text_file(fresh_corpus / "doc3.txt", tok)
    assert tok.decode(ids.tolist()) == doc_text(3)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no text"):
        encode_text_file(tmp_path / "empty.txt", tok)


def test_builtin_shakespeare_corpus(tmp_path):
    """All 38 plays are found, cleaned of markdown, split, and round-trip through the tokenizer."""
    cfg = DataConfig(source="shakespeare", data_dir=str(tmp_path / "shakespeare"), vocab_size=512)
    out = prepare(cfg, progress=False)
    meta = load_meta(out)
    assert meta["n_docs"] == {"train": 36, "val": 2} and meta["vocab_size"] == 512
    assert meta["train_tokens"] > 1_000_000 and meta["val_tokens"] > 10_000
    tok = load_tokenizer(out)
    snippet = "ROMEO:\nBut soft, what light through yonder window breaks?"
    assert tok.decode(tok.encode(snippet).ids) == snippet
    train = load_tokens(out, "train")
    assert train.max() < 512 and (np.asarray(train) == meta["eot_id"]).sum() == 36
    text = tok.decode(np.asarray(train[:3000]).tolist())
    assert "ACT I" in text and ":\n" in text
    assert not any(c in text for c in "*_#\\")


# --- Batches --------------------------------------------------------------------------------------


def arange_tokens(n: int) -> np.ndarray:
    """Token i = i, so a row's first token tells its window."""
    return np.arange(n, dtype=np.uint32)


def test_batches_shapes_and_shift():
    b = Batches(arange_tokens(1000), seq_len=16, batch_size=8, seed=0)
    x, y = b.rows(3, 0, 8)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    torch.testing.assert_close(y[:, :-1], x[:, 1:])
    torch.testing.assert_close(y[:, -1], x[:, -1] + 1)
    assert torch.all(x[:, 0] % 16 == 0)  # windows start on multiples of seq_len
    assert len(b) == (1000 - 1) // 16


def test_batches_are_a_pure_function_of_seed_step_row():
    tokens = arange_tokens(5000)
    a, b = Batches(tokens, 32, 8, seed=1), Batches(tokens, 32, 8, seed=1)
    for step in (0, 7, 100, 3):
        torch.testing.assert_close(a.rows(step, 0, 8), b.rows(step, 0, 8))
    assert not torch.equal(a.rows(5, 0, 8)[0], Batches(tokens, 32, 8, seed=2).rows(5, 0, 8)[0])
    assert not torch.equal(a.rows(5, 0, 8)[0], a.rows(6, 0, 8)[0])


@pytest.mark.parametrize("start, count", [(0, 3), (3, 5), (2, 1), (4, 4), (0, 12)])
def test_batches_rank_slices_match_the_full_batch(start, count):
    """A DDP rank reading rows start..start+count-1 gets exactly that slice of the global batch."""
    b = Batches(arange_tokens(3000), 16, 12, seed=5)
    for step in (0, 9, 31):  # 31 * 12 rows > 187 windows: crosses epochs
        full = b.rows(step, 0, 12)
        part = b.rows(step, start, count)
        torch.testing.assert_close(part[0], full[0][start : start + count])
        torch.testing.assert_close(part[1], full[1][start : start + count])


def test_batches_visit_every_window_once_per_epoch():
    seq, bs = 8, 6
    b = Batches(arange_tokens(8 * 25 + 1), seq, bs, seed=3)
    n = len(b)
    assert n == 25
    starts = torch.cat([b.rows(s, 0, bs)[0][:, 0] for s in range(3 * n // bs + 1)]) // seq
    for e in range(3):
        epoch = starts[e * n : (e + 1) * n]
        assert sorted(epoch.tolist()) == list(range(n))
        expected = np.random.default_rng([3, e]).permutation(n)
        assert epoch.tolist() == expected.tolist()
    assert starts[:n].tolist() != starts[n : 2 * n].tolist()  # each epoch has its own order


def test_batches_reject_too_short_split_and_bad_rows():
    with pytest.raises(ValueError, match="fewer than seq_len"):
        Batches(arange_tokens(16), seq_len=16, batch_size=4, seed=0)
    b = Batches(arange_tokens(17), seq_len=16, batch_size=4, seed=0)
    assert len(b) == 1 and b.rows(0, 0, 4)[0].shape == (4, 16)
    with pytest.raises(ValueError, match="outside a batch"):
        b.rows(0, 2, 3)


def test_batches_read_a_memmap(fresh_corpus, tmp_path):
    out = prepare(cfg_for(fresh_corpus, tmp_path / "out"), progress=False)
    tokens = load_tokens(out, "train")
    x, y = Batches(tokens, 8, 4, seed=0).rows(0, 0, 4)
    assert x.shape == (4, 8) and int(x.max()) < load_meta(out)["vocab_size"]


# --- eval_batches ---------------------------------------------------------------------------------


def test_eval_batches_cover_the_split_in_order():
    tokens = arange_tokens(16 * 10 + 5)
    batches = list(eval_batches(tokens, 16, 4))
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]  # last partial batch
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    torch.testing.assert_close(x.flatten(), torch.arange(160))
    torch.testing.assert_close(y.flatten(), torch.arange(1, 161))


@pytest.mark.parametrize("max_tokens, windows", [(64, 4), (70, 4), (16, 1), (5, 1), (10_000, 10)])
def test_eval_batches_respect_max_tokens(max_tokens, windows):
    batches = list(eval_batches(arange_tokens(16 * 10 + 5), 16, 3, max_tokens=max_tokens))
    assert sum(x.shape[0] for x, _ in batches) == windows
    assert batches[0][0][0, 0] == 0


def test_eval_batches_short_split_is_one_short_window():
    (x, y), = eval_batches(arange_tokens(10), 16, 4)
    assert x.shape == (1, 9)
    torch.testing.assert_close(y, x + 1)
    with pytest.raises(ValueError, match="at least 2"):
        eval_batches(arange_tokens(1), 16, 4)


def test_prepare_progress_bar_does_not_break(fresh_corpus, tmp_path, capsys):
    prepare(cfg_for(fresh_corpus, tmp_path / "out"), progress=True)
    captured = capsys.readouterr()
    assert "tokenizing" in captured.err and "prepared" in captured.out
    assert os.path.isfile(tmp_path / "out" / "meta.json")


# --- large corpora: tokenizer sample, progress lines, bounded memory ------------------------------


def test_tokenizer_chars_trains_on_a_deterministic_prefix_of_every_train_document(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    texts = [doc_text(i, 40) for i in range(12)]
    for i, t in enumerate(texts):
        (src / f"d{i:02}.txt").write_text(t)
    cfg = cfg_for(src, tmp_path / "a", tokenizer_chars=4000)
    a = prepare(cfg, progress=False)
    b = prepare(cfg_for(src, tmp_path / "b", tokenizer_chars=4000), progress=False)
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    meta = check_prepared(a, n_docs=12)
    assert meta["tokenizer_chars"] == 4000
    full = prepare(cfg_for(src, tmp_path / "full"), progress=False)
    assert meta["fingerprint"] != load_meta(full)["fingerprint"]
    assert "tokenizer_chars" not in load_meta(full)  # the default leaves meta.json as it was
    with pytest.raises(FileExistsError, match="something else"):  # another sample: not reused
        prepare(cfg_for(src, a, tokenizer_chars=5000), progress=False)

    # The sample itself: the leading share of each train document, cut between words.
    files, _ = sources._source_files(str(src))
    docs = sources._documents(files, False, "text")
    idx, chars = sources._scan(sources._documents(files, False, "text"))
    is_val = np.zeros(len(idx), dtype=bool)
    is_val[[1, 5, 8]] = True
    splits = prep._Splits(np.asarray(idx), is_val)
    ticker = sources._Ticker("x", None, enabled=False)
    pieces = list(prep._bpe_texts(docs, splits, chars, 0.25, ticker))
    train = [t for t, v in zip(texts, is_val, strict=True) if not v]
    assert len(pieces) == len(train)  # one piece per train document (each is < one chunk)
    for piece, text in zip(pieces, train, strict=True):
        assert text.startswith(piece) and 0.25 * len(text) <= len(piece) < 0.25 * len(text) + 80
        assert text[len(piece)] in " \n" and not piece[-1].isspace()  # no word is cut
    assert 0.25 * sum(map(len, train)) <= ticker.done < 0.26 * sum(map(len, train))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"tokenizer_chars": 999}, r"data.tokenizer_chars=999 .*at least 1000"),
        ({"tokenizer_chars": 0}, r"data.tokenizer_chars=0 "),
        ({"tokenizer_chars": 10_000, "tokenizer": "t.json"}, "leave one of them unset"),
    ],
)
def test_tokenizer_chars_bad_values_name_the_field_and_fix(kw, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kw)


def test_prepare_prints_plain_progress_lines_without_a_tty(
    fresh_corpus, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(sources, "_TICK", 0.0)  # a line at every update
    prepare(cfg_for(fresh_corpus, tmp_path / "out"), progress=False)
    out = capsys.readouterr().out
    for phase in ("reading 6 file(s)", "6 documents", "training a byte-level BPE", "BPE trained",
                  "tokenizing 0.0M characters", "tokenized"):
        assert f"prepare: {phase}" in out, phase
    assert "\nprepared " in out
    assert "prepare: tokenizing: 100%" in out and "prepare: BPE input: 100%" in out


def _prepare_peak(tmp_path, name: str, doc_chars: int) -> int:
    """Peak Python heap (bytes) of preparing 8 documents of about doc_chars characters each."""
    import tracemalloc

    src = tmp_path / name
    src.mkdir()
    for i in range(8):
        (src / f"d{i}.txt").write_text((doc_text(i, 40) * (doc_chars // 2000 + 1))[:doc_chars])
    cfg = cfg_for(src, tmp_path / f"{name}-out", tokenizer_chars=20_000)
    tracemalloc.start()
    try:
        prepare(cfg, progress=False)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_prepare_memory_does_not_grow_with_corpus_size(tmp_path, monkeypatch):
    """Reading, sampling and encoding stream: 4x the text, about the same peak heap."""
    monkeypatch.setattr(sources, "_CHUNK", 1 << 12)  # small reads and batches, so that a
    monkeypatch.setattr(prep, "_BATCH", 1 << 15)  # corpus of a few MB spans many of them
    _prepare_peak(tmp_path, "warm-up", 20_000)  # one-time allocations (caches, lazy imports)
    small = _prepare_peak(tmp_path, "small", 100_000)  # 0.8 MB of text
    big = _prepare_peak(tmp_path, "big", 400_000)  # 3.2 MB
    # Both peaks are ~1.1 MB (mostly file_sha256's 1 MiB read buffer) and differ by ~10 kB;
    # keeping the text (or its ids) anywhere would add >= 2.4 MB.
    assert big - small < 400_000, (small, big)
