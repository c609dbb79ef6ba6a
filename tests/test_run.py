"""`Run.open`: one handle for a run, a checkpoint, a Hugging Face directory or a GGUF file; each
kind loads the same model, and what is wrong with a path is named."""

import json

import pytest
import torch
from helpers import bpe_tokenizer

from structlm.config import LinearSpec, ModelConfig, RunConfig, save_json
from structlm.model.gpt import GPT
from structlm.runs import checkpoint
from structlm.runs.generate import Generator
from structlm.runs.run import Run, load_model

CFG = ModelConfig(vocab_size=320, block_size=32, n_layer=2, n_head=2, d_model=32, d_ff=128,
                  norm="layernorm", act="gelu", pos_emb="rope",
                  ffn=LinearSpec("lowrank", rank=8), dense_ffn_layers=(0,))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run with two checkpoints (steps 1 and 2) and a BPE tokenizer."""
    root = tmp_path_factory.mktemp("run") / "run"
    cfg = RunConfig(model=CFG)
    torch.manual_seed(0)
    model = GPT(CFG)
    for step in (1, 2):
        with torch.no_grad():
            model.lm_head.weight.mul_(1.0 + 0.1 * step)  # two checkpoints, two models
        checkpoint.save(root, model, None, cfg, step, {})
    save_json(cfg, str(root / "config.json"))
    bpe_tokenizer(root / "tokenizer.json", ["To be, or not to be, that is the question."] * 50)
    return root


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(8).view(1, 8))[0]


def test_a_run_opens_at_its_newest_checkpoint(run_dir):
    run = Run.open(run_dir)
    assert (run.kind, run.ckpt.name, run.root) == ("run", "step_0000002", run_dir)
    assert run.structured and run.config.model == CFG
    model, cfg = run.load_model()
    assert cfg.model == CFG and not model.training
    assert run.tokenizer().get_vocab_size() <= CFG.vocab_size


def test_a_checkpoint_opens_with_its_runs_tokenizer(run_dir):
    step1 = run_dir / "checkpoints" / "step_0000001"
    run = Run.open(step1)
    assert (run.kind, run.ckpt, run.root) == ("checkpoint", step1, run_dir)
    assert run.tokenizer_path == run_dir / "tokenizer.json"
    assert not torch.equal(logits(run.load_model()[0]), logits(load_model(run_dir)[0]))


def test_a_hugging_face_export_opens_to_the_same_logits(run_dir, tmp_path):
    pytest.importorskip("transformers")
    from structlm.runs.export import export_run

    out = export_run(run_dir, tmp_path / "hf", format="hf-merged")
    run = Run.open(out)
    assert (run.kind, run.ckpt, run.root) == ("hf", None, out)
    assert not run.structured  # merged into dense matrices
    torch.testing.assert_close(logits(run.load_model()[0]), logits(load_model(run_dir)[0]),
                               rtol=1e-4, atol=1e-4)


def test_what_is_wrong_with_a_path_is_named(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Run.open(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="is a file"):
        Run.open(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no structlm run, Hugging Face model or GGUF"):
        Run.open(tmp_path / "empty")
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "config.json").write_text((run_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no complete checkpoint; train it first"):
        Run.open(tmp_path / "fresh")


def test_special_tokens_and_chat_template_come_from_the_tokenizer_files(run_dir, tmp_path):
    import shutil

    run_copy = tmp_path / "chat"
    shutil.copytree(run_dir, run_copy)
    conf = {"eos_token": {"content": "<|endoftext|>"}, "bos_token": "<|endoftext|>",
            "chat_template": [{"name": "default", "template": "{{ messages }}"}]}
    (run_copy / "tokenizer_config.json").write_text(json.dumps(conf))
    run = Run.open(run_copy)
    tok = run.tokenizer()
    assert run.special_token("eos_token") == "<|endoftext|>"
    assert run.stop_id(tok) == tok.token_to_id("<|endoftext|>")
    assert run.chat_template() == "{{ messages }}"
    assert Run.open(run_dir).chat_template() is None


def test_generator_loads_from_an_opened_run(run_dir):
    g = Generator.load(Run.open(run_dir), "cpu", "fp32", premerge=False)
    assert g.generate("To be", 4, temperature=0.0).startswith("To be")
