"""structlm import: a Hugging Face checkpoint or GGUF file as a structlm run directory."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tokenizers import Tokenizer

from structlm.config import ModelConfig, RunConfig, save_json
from structlm.data.tokenizer import copy_sidecars
from structlm.hf.reader import gguf_file, read_gguf, read_hf
from structlm.model.gpt import GPT
from structlm.runs import checkpoint
from structlm.utils.files import publish_dir, require_empty

# tokens each evaluation of a run started from an imported or converted model reads (a healing
# run of a few hundred steps would otherwise spend most of its time evaluating)
HEAL_EVAL_TOKENS = 8192


def import_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a structlm run directory (config.json, tokenizer.json, checkpoints/step_0000000) for
    a local transformers checkpoint; refuses to write into a non-empty directory."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    require_empty(out)
    _check_source(hf_dir)
    gguf = gguf_file(hf_dir)
    tok_dir = Path(tempfile.mkdtemp(prefix="structlm-tokenizer-")) if gguf else hf_dir
    try:
        if gguf is not None:
            model_cfg, sd, _ = read_gguf(gguf, tok_dir)
        else:
            model_cfg, sd = read_hf(hf_dir)
        tok = tok_dir / "tokenizer.json"
        if not tok.exists():
            raise FileNotFoundError(f"{hf_dir} has no tokenizer.json (a fast tokenizer); save "
                                    "one with the model's tokenizer.save_pretrained first")
        n = Tokenizer.from_file(str(tok)).get_vocab_size()
        if n > model_cfg.vocab_size:
            raise ValueError(f"{tok} has {n:,} tokens, the model's vocabulary "
                             f"{model_cfg.vocab_size:,}: this tokenizer belongs to another model")
        return _write_run(hf_dir, out, model_cfg, sd, tok_dir)
    finally:
        if gguf is not None:
            shutil.rmtree(tok_dir, ignore_errors=True)


def _check_source(path: Path) -> None:
    """A local checkpoint directory or .gguf file, or an error naming what was given instead."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give a local directory with config.json, "
                                "*.safetensors and tokenizer.json, or a .gguf file (a Hub id must "
                                "be downloaded first, e.g. huggingface-cli download ID "
                                "--local-dir DIR)")
    if path.is_file() and path.suffix != ".gguf":
        raise ValueError(f"{path} is a file; give the checkpoint's directory ({path.parent})")


def _write_run(hf_dir: Path, out: Path, model_cfg: ModelConfig, sd: dict, tok_dir: Path) -> Path:
    """The run directory: config.json, tokenizer files, checkpoints/step_0000000 (atomic)."""
    model = GPT(model_cfg)
    model.load_state_dict(sd, strict=True)
    cfg = RunConfig(model=model_cfg)
    cfg.data.tokenizer = str(out / "tokenizer.json")
    cfg.train.out_dir = str(out)
    cfg.train.eval_tokens = HEAL_EVAL_TOKENS  # a later healing run's evaluation, not 65,536 tokens

    def write(tmp: Path) -> None:
        shutil.copyfile(tok_dir / "tokenizer.json", tmp / "tokenizer.json")
        copy_sidecars(tok_dir, tmp)  # the chat template: tokenizer_config.json or .jinja
        checkpoint.save(tmp, model, None, cfg, 0, {"imported_from": str(hf_dir.resolve())})
        save_json(cfg, str(tmp / "config.json"))

    return publish_dir(out, write, "import")
