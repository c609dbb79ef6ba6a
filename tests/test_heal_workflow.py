"""A model converted from an instruct model and healed keeps what makes it chat: its tokenizer's
special tokens, chat template and end of turn travel through convert, prepare, train and export;
a healing run evaluates a small share, not 65,536 tokens."""

import json

import pytest
from helpers import bpe_tokenizer, random_run

from structlm.config import load_run_config
from structlm.runs.convert import convert_run
from structlm.runs.run import Run
from structlm.training import train

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"


@pytest.fixture
def instruct_run(tmp_path):
    """A random dense run whose tokenizer files are an instruct model's: <|im_end|> ends a turn."""
    bpe_tokenizer(tmp_path / "tokenizer.json", ["To be, or not to be, that is the question."] * 50,
                  specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    run, _ = random_run(tmp_path, tmp_path / "tokenizer.json", norm="layernorm", act="gelu",
                        pos_emb="rope", dense_ffn_layers=(0,))
    (run / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "chat_template": TEMPLATE}))
    return run


def test_convert_then_heal_keeps_the_chat_template_and_end_of_turn(instruct_run, corpus,
                                                                     tmp_path):
    out, _ = convert_run(instruct_run, tmp_path / "lr", "lowrank", 0.32)
    cfg = load_run_config(str(out / "config.json"))
    assert cfg.train.eval_tokens == 8192
    cfg.data.source, cfg.data.tokenizer = str(corpus), str(out / "tokenizer.json")
    cfg.data.data_dir = str(tmp_path / "data")
    cfg.data.val_fraction, cfg.data.workers = 0.2, 1
    cfg.train.init_from, cfg.train.out_dir = str(out), str(tmp_path / "healed")
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.micro_batch_size = 2, 2, 2
    cfg.train.seq_len, cfg.train.eval_interval, cfg.train.dtype = 32, 0, "fp32"
    train(cfg)
    healed = Run.open(tmp_path / "healed")
    assert healed.chat_template() == TEMPLATE
    tok = healed.tokenizer()
    assert healed.stop_id(tok) == tok.token_to_id("<|im_end|>")
    assert (tmp_path / "data" / "tokenizer_config.json").exists()  # prepare kept it too
    pytest.importorskip("transformers")
    from structlm.runs.export import export_run

    hf = export_run(tmp_path / "healed", tmp_path / "hf", format="hf-merged")
    gen = json.loads((hf / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.token_to_id("<|im_end|>")
    assert json.loads((hf / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
