"""prepare(cfg): a corpus into a prepared directory, atomically, resumably, never overwriting other
data.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from structlm.config import DataConfig
from structlm.data import shards, sources
from structlm.data.sources import (
    _chunks,
    _documents,
    _file_documents,
    _scan,
    _scan_files,
    _source_files,
    _source_name,
    _Ticker,
)
from structlm.data.tokenizer import (
    EOT,
    EOT_CANDIDATES,
    _tokenizer_path,
    copy_sidecars,
    eot_id,
    load_tokenizer,
)
from structlm.utils.files import alive, atomic_write_text, file_sha256
from structlm.utils.locks import Busy, exclusive, lock_path

_BATCH = 1 << 19  # characters per encode_batch call (its chunks are encoded in parallel)
META_VERSION = 1  # bump when the prepared format or the preparation itself changes

_PARTS = 100  # a corpus of one document is cut into this many parts before the train/val split


def resolve_data_dir(cfg: DataConfig) -> Path:
    """cfg.data_dir, else data/<source>-bpe<vocab> (-<tokenizer hash[:8]> with --data.tokenizer)."""
    if cfg.data_dir:
        return Path(cfg.data_dir).expanduser()
    tag = f"bpe{cfg.vocab_size}"
    if cfg.tokenizer:
        tag = file_sha256(_tokenizer_path(cfg.tokenizer))[:8]
    return Path("data") / f"{_source_name(cfg.source)}-{tag}"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits comfortably (vocab <= 65535), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def prepare(cfg: DataConfig, *, progress: bool | None = None) -> Path:
    """Tokenize cfg.source into resolve_data_dir(cfg), or reuse it if it holds the same inputs.
    Resumes an interrupted preparation of the same inputs (its work directory, next to `out`).
    The data directory is locked for the whole preparation: a second prepare of it (same inputs
    or not) stops with a message naming the first, before it reads, deletes or writes anything."""
    if cfg.source is None:
        return _prepared(resolve_data_dir(cfg))
    t0 = time.time()
    progress = sys.stderr.isatty() if progress is None else progress
    files, builtin = _source_files(cfg.source)
    tok_path = _tokenizer_path(cfg.tokenizer) if cfg.tokenizer else None
    fingerprint = _fingerprint(cfg, files, builtin, tok_path)
    out = resolve_data_dir(cfg)
    if _matches(out, fingerprint):  # published data is only ever read: no lock needed
        print(f"reusing prepared data at {out}", flush=True)
        return out
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    fix = ("wait for it to finish (the same inputs are then reused), or give this one another "
           "--data.data_dir")
    try:
        with exclusive(lock_path(out), f"the data directory {out}", fix):
            if _matches(out, fingerprint):  # published while this process read the inputs
                print(f"reusing prepared data at {out}", flush=True)
                return out
            work = out.parent / f".{out.name}.partial"
            with _work_dir(work, fingerprint):
                _prepare_into(cfg, files, builtin, tok_path, fingerprint, out, work, progress, t0)
            shutil.rmtree(work, ignore_errors=True)
    except BaseException as e:
        if not isinstance(e, Busy):  # a preparation that failed early leaves no directories
            _remove_made(made)
        raise
    return out


def _prepared(out: Path) -> Path:
    """`out`, which must hold published prepared data (data.source=None: used as it is)."""
    meta = out / "meta.json"
    if not meta.is_file():
        raise FileNotFoundError(
            f"{out} holds no prepared data (no meta.json); prepare it first with `structlm prepare "
            f"--data.source TEXT --data.data_dir {out}`, or give --data.source to prepare it here")
    print(f"using the data prepared in {out} (from {json.loads(meta.read_text())['source']})",
          flush=True)
    return out


def _remove_made(made: list[Path]) -> None:
    """Remove the directories a failed prepare created."""
    for p in made:
        with contextlib.suppress(OSError):
            p.rmdir()


@contextlib.contextmanager
def _work_dir(work: Path, fingerprint: str):
    """The preparation's work directory (the caller holds the data directory's lock); one left by
    a preparation of other inputs is replaced, one of the same inputs resumed. Removed again when
    the preparation fails before it tokenized anything."""
    marker = work / "fingerprint"
    if work.exists() and (not marker.exists() or marker.read_text() != fingerprint):
        shutil.rmtree(work)
    work.mkdir(exist_ok=True)
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
        if tok_path is not None:  # an existing tokenizer: its chat template and special tokens
            copy_sidecars(tok_path.parent, tmp)
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
        if not pid.isdigit() or not alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


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
        for chunk in _chunks(doc, sources._CHUNK):
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
        for chunk in _chunks(doc, sources._CHUNK):
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
