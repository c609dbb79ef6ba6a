"""Tokenizers: training the byte-level BPE, finding a run's tokenizer and its special tokens,
encoding a file.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from structlm.data import sources
from structlm.data.sources import _chunks, _read_blocks

EOT = "<|endoftext|>"

EOT_CANDIDATES = (EOT, "</s>", "<|end_of_text|>", "<|eot_id|>", "<eos>")  # for --data.tokenizer


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


def load_tokenizer(data_dir_or_file: str | Path) -> Tokenizer:
    """The tokenizer.json of a prepared data dir or run dir (or the file), with no truncation."""
    path = _tokenizer_path(data_dir_or_file)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
        raise ValueError(f"{path} is not a readable tokenizer.json ({str(e)[:200]}); restore it "
                         "from where it came from (the prepared data directory, or the model's "
                         "files)") from None
    tok.no_truncation()
    tok.no_padding()
    return tok


def encode_text_file(path: str | Path, tokenizer: Tokenizer) -> np.ndarray:
    """The ids (uint32) of a text file, no special tokens added; for `structlm eval --text FILE`."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file {p} not found")
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    chunks = _chunks(_read_blocks(p), sources._CHUNK)
    ids = []
    while group := list(itertools.islice(chunks, 4)):
        ids += [np.asarray(e.ids, dtype=np.uint32) for e in encode(group, add_special_tokens=False)]
    if not ids or sum(a.size for a in ids) == 0:
        raise ValueError(f"{p} holds no text")
    return np.concatenate(ids)


# what travels with a tokenizer.json from an imported or converted model: its special tokens, chat
# template and generation settings (an instruct model's end of turn lives here)
SIDECARS = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
            "generation_config.json")


def copy_sidecars(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer's side files found in `src` into `dst`; returns their names."""
    found = [n for n in SIDECARS if (Path(src) / n).is_file()]
    for name in found:
        shutil.copyfile(Path(src) / name, Path(dst) / name)
    return found
