"""structlm export --format gguf: a Llama GGUF file (merged FFNs, tokenizer, chat template) that
transformers' own GGUF loader and `structlm import` read back to structlm's logits and greedy text;
the rest refused by name, before anything is written."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers import bpe_tokenizer, random_run, smollm2_file
from tokenizers import Tokenizer

from structlm.config import LinearSpec
from structlm.hf.families import Unsupported
from structlm.model.gpt import GPT
from structlm.runs.export import export_run
from structlm.runs.importer import import_hf
from structlm.runs.run import load_model

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

LLAMA = dict(norm="rmsnorm", act="swiglu", pos_emb="rope", bias=False)
CASES = {  # Llama-shaped structlm models with structured FFNs, merged by the export
    "gqa-lowrank-tied": dict(**LLAMA, n_kv_head=2, ffn=LinearSpec("lowrank", rank=8),
                             dense_ffn_layers=(0,)),
    "wide-untied-interleaved-blockshuffle": dict(
        **LLAMA, attn_dim=48, n_head=4, n_kv_head=2, tie_embeddings=False, rope_interleaved=True,
        rope_base=500.0, norm_eps=1e-6, ffn=LinearSpec("blockshuffle", nblocks=2)),
}
LOOSE = {"f16": 5e-3, "bf16": 5e-2, "q8_0": 1e-1}  # of the logits' scale; f32: 1e-4
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
TEXT = "To be, or not to be<|endoftext|> that is the question."


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A byte-level BPE of 300 tokens (the models have 320 rows: the GGUF pads the list)."""
    return bpe_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json",
                         ["To be, or not to be, that is the question."] * 50)


def export(run, tmp_path, dtype="f32"):
    """The run exported alone in a directory (transformers prefers a tokenizer.json beside it)."""
    return export_run(run, tmp_path / "gguf" / "model.gguf", format="gguf", dtype=dtype)


def load_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def close(got, ref, tol=1e-4):
    torch.testing.assert_close(got, ref, rtol=0, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_f32_gguf_reads_back_exactly_in_transformers_and_structlm(case, tmp_path,
                                                                      tokenizer_path):
    run, model = random_run(tmp_path, tokenizer_path, **CASES[case])
    out = export(run, tmp_path)
    hf = load_gguf(out)
    idx = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    prompt = idx[:1, :8]
    with torch.no_grad():
        ref = model(idx)[0]
        close(hf(idx).logits, ref)
        ours = model.generate(prompt, 24, temperature=0)
        assert torch.equal(ours, hf.generate(prompt, max_new_tokens=24, do_sample=False,
                                             min_new_tokens=24))
        again, cfg = load_model(import_hf(out, tmp_path / "back"))
        close(again(idx)[0], ref)
        assert torch.equal(again.generate(prompt, 24, temperature=0), ours)
    m = model.cfg
    assert (cfg.model.n_head, cfg.model.kv_heads, cfg.model.head_dim, cfg.model.tie_embeddings) \
        == (m.n_head, m.kv_heads, m.head_dim, m.tie_embeddings)
    assert cfg.model.ffn.kind == "dense"  # merged


@pytest.mark.parametrize("dtype", sorted(LOOSE))
def test_a_smaller_gguf_stays_close(dtype, tmp_path, tokenizer_path):
    run, model = random_run(tmp_path, tokenizer_path, **CASES["gqa-lowrank-tied"])
    out = export(run, tmp_path, dtype)
    f32 = export_run(run, tmp_path / "f32.gguf", format="gguf", dtype="f32")
    assert out.stat().st_size < 0.6 * f32.stat().st_size
    idx = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(idx)[0]
        close(load_gguf(out)(idx).logits, ref, LOOSE[dtype])
        again, _ = load_model(import_hf(out, tmp_path / "back"))
        close(again(idx)[0], ref, LOOSE[dtype])
    qtypes = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    want = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[dtype]
    assert qtypes["blk.0.attn_q.weight"] == qtypes["blk.1.ffn_down.weight"] == want
    assert qtypes["token_embd.weight"] == want and qtypes["output_norm.weight"] == "F32"


def test_the_tokenizer_eos_and_chat_template_come_along(tmp_path, tokenizer_path):
    """transformers' tokenizer from the GGUF alone encodes as the run's tokenizer.json does; the
    run's declared eos (an instruct model's end of turn) and chat template are the file's."""
    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(tmp_path / "chat.json"))
    run, _ = random_run(tmp_path, tmp_path / "chat.json", **CASES["gqa-lowrank-tied"])
    (run / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "chat_template": TEMPLATE}))
    out = export(run, tmp_path)
    t = transformers.AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    for text in (TEXT, "<|im_start|>To be<|im_end|>", " question,  not\n\nthat"):
        assert t(text)["input_ids"] == tok.encode(text).ids, text
    assert (t.eos_token, t.bos_token, t.chat_template) == ("<|im_end|>", "<|im_start|>", TEMPLATE)
    f = {k: v.contents() for k, v in gguf.GGUFReader(out).fields.items()}
    assert len(f["tokenizer.ggml.tokens"]) == 320 > tok.get_vocab_size()  # padded to the rows
    assert f["tokenizer.ggml.tokens"][-1] == "[PAD319]" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.eos_token_id"] == tok.token_to_id("<|im_end|>")
    assert f["tokenizer.ggml.token_type"][tok.token_to_id("<|im_end|>")] == 3  # CONTROL


def test_the_q_and_k_rows_are_llama_cpps_interleaved_rope_layout(tmp_path, tokenizer_path):
    """Read with the gguf package alone, no transformers: the file's tensors, put into a structlm
    model with interleaved (pairwise) RoPE, which is what llama.cpp computes for LLaMA, give the
    exported model's logits."""
    run, model = random_run(tmp_path, tokenizer_path, **CASES["gqa-lowrank-tied"])
    out = export(run, tmp_path)
    t = {x.name: torch.from_numpy(np.array(x.data)) for x in gguf.GGUFReader(out).tensors}
    m = dataclasses.replace(model.cfg, ffn=LinearSpec(), rope_interleaved=True)
    sd = {"wte.weight": t["token_embd.weight"], "ln_f.weight": t["output_norm.weight"]}
    sd["lm_head.weight"] = t.get("output.weight", sd["wte.weight"])
    for i in range(m.n_layer):
        b = f"blk.{i}."
        sd |= {f"blocks.{i}.ln_1.weight": t[b + "attn_norm.weight"],
               f"blocks.{i}.ln_2.weight": t[b + "ffn_norm.weight"],
               f"blocks.{i}.attn.qkv.weight": torch.cat([t[b + f"attn_{x}.weight"] for x in "qkv"]),
               f"blocks.{i}.attn.o_proj.weight": t[b + "attn_output.weight"],
               f"blocks.{i}.mlp.fc1.weight": torch.cat([t[b + "ffn_gate.weight"],
                                                        t[b + "ffn_up.weight"]]),
               f"blocks.{i}.mlp.fc2.weight": t[b + "ffn_down.weight"]}
    pairwise = GPT(m).eval()
    pairwise.load_state_dict(sd, strict=True)
    idx = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        close(pairwise(idx)[0], model(idx)[0])


@pytest.mark.parametrize("case", sorted(CASES))
def test_llama_cpp_runs_the_gguf_as_structlm_does(case, tmp_path, tokenizer_path):
    """llama.cpp itself (llama-cpp-python, where installed: it builds llama.cpp from source),
    with an f32 KV cache: structlm's logits, greedy text and token ids."""
    llama_cpp = pytest.importorskip("llama_cpp")
    run, model = random_run(tmp_path, tokenizer_path, **CASES[case])
    out = export(run, tmp_path)
    llm = llama_cpp.Llama(str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=1,
                          type_k=0, type_v=0)  # 0: GGML_TYPE_F32
    idx = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(4))
    llm.eval(idx[0].tolist())
    with torch.no_grad():
        close(torch.tensor(np.array(llm.scores[:12]), dtype=torch.float32), model(idx)[0][0])
        want = model.generate(idx[:, :8], 16, temperature=0)[0, 8:].tolist()
    llm.reset()
    got = []
    for t in llm.generate(idx[0, :8].tolist(), temp=0.0, top_k=1):
        got.append(t)
        if len(got) == len(want):
            break
    assert got == want
    ids = Tokenizer.from_file(str(tokenizer_path)).encode(TEXT).ids
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == ids


@pytest.mark.parametrize("overrides, match, other", [
    (dict(norm="layernorm", act="gelu", pos_emb="absolute"), "this model is gpt2", "hf-merged"),
    (dict(norm="layernorm", act="gelu", pos_emb="rope"), "this model is gpt_neox", "hf-merged"),
    (dict(**{**LLAMA, "bias": True}), "bias=True", "hf-merged"),
    (dict(**LLAMA, rope_scale=2.0), "rope_scale=2.0", "hf-merged"),
    (dict(norm="rmsnorm", act="gelu", pos_emb="rope"), "no native transformers class", "hf"),
])
def test_what_the_gguf_cannot_carry_is_refused_before_writing(tmp_path, tokenizer_path,
                                                              overrides, match, other):
    run, _ = random_run(tmp_path, tokenizer_path, **overrides)
    with pytest.raises(Unsupported, match=match) as e:
        export(run, tmp_path)
    assert f"--format {other} " in str(e.value)
    assert not (tmp_path / "gguf").exists() or not any((tmp_path / "gguf").iterdir())


def test_gguf_options_and_paths_are_checked(tmp_path, tokenizer_path):
    tok = json.loads(tokenizer_path.read_text())
    tok["pre_tokenizer"] = {"type": "Whitespace"}
    (tmp_path / "whitespace.json").write_text(json.dumps(tok))
    run, _ = random_run(tmp_path, tmp_path / "whitespace.json", **CASES["gqa-lowrank-tied"])
    with pytest.raises(ValueError, match="name it OUT.gguf"):
        export_run(run, tmp_path / "model", format="gguf")
    with pytest.raises(ValueError, match="q8_0 is a GGUF quantization"):
        export_run(run, tmp_path / "hf", format="hf-merged", dtype="q8_0")
    (tmp_path / "mine.gguf").write_text("keep")
    with pytest.raises(FileExistsError, match="exists"):
        export_run(run, tmp_path / "mine.gguf", format="gguf")
    assert (tmp_path / "mine.gguf").read_text() == "keep"
    with pytest.raises(Unsupported, match="pre-tokenizer"):
        export(run, tmp_path)
    assert not (tmp_path / "gguf" / "model.gguf").exists()
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == []  # no temporary left behind


@pytest.mark.slow
def test_smollm2_round_trips_through_gguf(tmp_path):
    """A real model (SmolLM2-135M-Instruct, imported from its GGUF): exported as an f32 GGUF, it
    reads back in transformers to the run's logits and greedy text; its 49k-token tokenizer
    encodes as the run's, and its chat template comes along."""
    run = import_hf(smollm2_file(), tmp_path / "run")
    model, _ = load_model(run)
    out = export(run, tmp_path)
    tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    t = transformers.AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    text = "The capital of France is Paris; its 2 rivers aren't\n\n  big."
    assert t(text)["input_ids"] == tok.encode(text).ids
    assert t.chat_template == (run / "chat_template.jinja").read_text()  # as import wrote it
    idx = torch.tensor([tok.encode("The capital of France is").ids])
    with torch.no_grad():
        hf = load_gguf(out)
        close(hf(idx).logits, model(idx)[0])
        assert torch.equal(model.generate(idx, 16, temperature=0),
                           hf.generate(idx, max_new_tokens=16, do_sample=False, min_new_tokens=16))


def test_structlm_export_to_a_gguf_path_writes_one(tmp_path, tokenizer_path):
    """The command line: an OUT ending in .gguf picks --format gguf; a dense GPT-NeoX-shaped run
    is refused naming --format hf-merged, with exit 2."""
    import subprocess
    import sys

    run, _ = random_run(tmp_path, tokenizer_path, **CASES["gqa-lowrank-tied"])
    out = tmp_path / "cli" / "model.gguf"
    r = subprocess.run([sys.executable, "-m", "structlm", "export", str(run), str(out), "--dtype",
                        "q8_0"], capture_output=True, text=True)
    assert r.returncode == 0 and "as gguf" in r.stdout and out.is_file(), r.stderr[-2000:]
    neox, _ = random_run(tmp_path / "neox", tokenizer_path, norm="layernorm", act="gelu",
                         pos_emb="rope")
    r = subprocess.run([sys.executable, "-m", "structlm", "export", str(neox),
                        str(tmp_path / "neox.gguf")], capture_output=True, text=True)
    assert r.returncode == 2 and "hf-merged" in r.stderr and "Traceback" not in r.stderr
