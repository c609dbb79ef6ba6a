"""A dense structlm model as one Llama-architecture GGUF file, for llama.cpp, ollama and LM Studio,
written with the `gguf` package (an optional extra, imported where a file is written).

    write_gguf(path, sd, cfg, tokenizer_path, dtype="f32", bos_id=..., eos_id=...)

The weights go through the Llama mapping of `families.to_hf`, then under llama.cpp's tensor names
(`gguf.get_tensor_name_map`), the Q and K rows permuted from transformers' rotate-half order to
llama.cpp's interleaved pairs (transformers' GGUF reader undoes exactly this). The hyperparameters
go under `llama.*`; the byte-level BPE tokenizer under `tokenizer.ggml.*` (model "gpt2": tokens
padded to the model's vocabulary, token types, merges, bos/eos, the chat template). Only what
transformers' GGUF reader gives back exactly is written: `check_gguf_config` refuses the rest.
No transformers here; reading the file back is the exporter's check.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from torch import Tensor

from structlm.config import ModelConfig
from structlm.hf.families import Unsupported, family_for, to_hf

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # gguf.TokenType

# tokenizer.json pre-tokenizer splits llama.cpp knows by name (`tokenizer.ggml.pre`)
SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def check_gguf_config(cfg: ModelConfig) -> None:
    """Refuse, naming the feature, a dense model the Llama GGUF does not carry exactly (as read
    back by transformers, and so by `structlm import`)."""
    family = family_for(cfg)  # refuses structured layers and what no native class computes
    why = {"gpt2": "transformers' GPT-2 GGUF reader ignores the context length and FFN width",
           "gpt_neox": "transformers reads no GPT-NeoX GGUF"}
    if family != "llama":
        raise Unsupported(f"GGUF export writes the Llama architecture (RMSNorm + SwiGLU + RoPE); "
                          f"this model is {family} ({cfg.norm} + {cfg.act}), and {why[family]}, "
                          "so the file could not be checked against structlm")
    if cfg.bias:
        raise Unsupported("bias=True: transformers' GGUF reader builds Llama without biases")
    if cfg.rope_scale != 1.0:
        raise Unsupported(f"rope_scale={cfg.rope_scale}: transformers' GGUF reader ignores "
                          "llama.rope.scaling")


@dataclass(frozen=True)
class GGUFTokenizer:
    """The `tokenizer.ggml.*` metadata of a byte-level BPE tokenizer.json."""

    tokens: list[str]  # one per embedding row: [PAD<i>] where the tokenizer has no token
    types: list[int]
    merges: list[str]  # "a b"
    pre: str  # llama.cpp's name for the pre-tokenizer's split
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def read_tokenizer(tokenizer_path: Path, vocab_size: int) -> GGUFTokenizer:
    """The GGUF form of a tokenizer.json (and the chat template beside it); refuses what is not a
    byte-level BPE that llama.cpp can split the same way."""
    tj = json.loads(Path(tokenizer_path).read_text())
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        decoder = (tj.get("decoder") or {}).get("type")
        raise Unsupported(f"{tokenizer_path}: GGUF export writes byte-level BPE tokenizers; this "
                          f"one is {model.get('type')} with a {decoder} decoder")
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    by_id = {i: t for t, i in model["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    if max(by_id) >= vocab_size:
        raise Unsupported(f"{tokenizer_path} has token id {max(by_id)}, past the model's "
                          f"vocabulary of {vocab_size}")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [UNUSED if i not in by_id else NORMAL if i not in added else
             CONTROL if added[i].get("special") else USER_DEFINED for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    tok = Tokenizer.from_file(str(tokenizer_path))
    plain, full = tok.encode("a", add_special_tokens=False).ids, tok.encode("a").ids
    start = full.index(plain[0]) if plain and plain[0] in full else 0
    return GGUFTokenizer(tokens, types, merges, _pre_tokenizer(tj, tokenizer_path),
                         add_bos=start > 0, add_eos=len(full) > start + len(plain),
                         chat_template=chat_template(Path(tokenizer_path).parent))


def _pre_tokenizer(tj: dict, path: Path) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for the tokenizer.json's pre-tokenizer."""
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if any(p.get("type") == "ByteLevel" and p.get("add_prefix_space") for p in parts):
        raise Unsupported(f"{path}: a ByteLevel pre-tokenizer with add_prefix_space=True "
                          "(llama.cpp adds no prefix space to a BPE vocabulary)")
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and \
            parts[1].get("use_regex", True):
        return "smollm"  # each digit alone, then GPT-2's split
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        name = next((n for n, r in SPLITS.items() if r == regex), None)
        if name is not None:
            return name
    raise Unsupported(f"{path}: its pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is "
                      "not one GGUF export knows llama.cpp's name for (GPT-2's, Llama 3's, "
                      "Qwen2's, SmolLM's)")


def chat_template(tokenizer_dir: Path) -> str | None:
    """The chat template of the tokenizer files in `tokenizer_dir`: chat_template.jinja, or
    tokenizer_config.json's chat_template (the default one of a list of named templates)."""
    if (tokenizer_dir / "chat_template.jinja").exists():
        return (tokenizer_dir / "chat_template.jinja").read_text()
    try:
        t = json.loads((tokenizer_dir / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    if isinstance(t, list):
        t = next((d.get("template") for d in t if d.get("name") == "default"), None)
    return t if isinstance(t, str) and t else None


def llama_cpp_rows(t: Tensor, heads: int) -> Tensor:
    """Q or K rows (weight or bias) from transformers' rotate-half order within each head
    (j, j + hd/2) to llama.cpp's interleaved pairs (2j, 2j + 1)."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(
        t.shape)


def gguf_tensors(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """A dense structlm state dict under llama.cpp's tensor names, fp32, in its layouts."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layer)
    out = {}
    for hf_name, t in to_hf(sd, cfg, "llama").items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise RuntimeError(f"GGUF export has no llama.cpp name for {hf_name} (please report)")
        if ".self_attn.q_proj." in hf_name:
            t = llama_cpp_rows(t, cfg.n_head)
        elif ".self_attn.k_proj." in hf_name:
            t = llama_cpp_rows(t, cfg.kv_heads)
        out[name] = t.detach().float().contiguous()
    return out


def encode(t: Tensor, dtype: str):
    """(array, gguf quantization type) of one tensor at `dtype`: 1-D tensors (norms) stay f32,
    as llama.cpp keeps them; q8_0 falls back to f16 for rows not a multiple of its block."""
    import gguf

    a = t.numpy().astype(np.float32)
    Q = gguf.GGMLQuantizationType
    if a.ndim < 2 or dtype == "f32":
        return a, Q.F32
    if dtype == "q8_0" and a.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return gguf.quants.quantize(a, Q.Q8_0), Q.Q8_0
    if dtype == "bf16":
        return gguf.quants.quantize(a, Q.BF16), Q.BF16
    return a.astype(np.float16), Q.F16


def write_gguf(path: str | Path, sd: dict[str, Tensor], cfg: ModelConfig,
               tokenizer_path: str | Path, dtype: str = "f32", bos_id: int | None = None,
               eos_id: int | None = None, name: str = "structlm") -> Path:
    """Write the dense model `sd` (structlm names; structured layers merged first) of `cfg` with
    its tokenizer as a Llama GGUF file at `path`; refuses what check_gguf_config refuses."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"GGUF dtype {dtype!r}: choose one of {list(GGUF_DTYPES)}")
    check_gguf_config(cfg)
    tok = read_tokenizer(Path(tokenizer_path), cfg.vocab_size)
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _write_hparams(w, cfg, dtype, name)
    _write_tokenizer(w, tok, bos_id, eos_id)
    for tname, t in gguf_tensors(sd, cfg).items():
        array, qtype = encode(t, dtype)
        w.add_tensor(tname, array, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def _write_hparams(w, cfg: ModelConfig, dtype: str, name: str) -> None:
    """general.* and llama.*: what llama.cpp and transformers' GGUF reader build the model from."""
    import gguf

    files = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    w.add_name(name)
    w.add_file_type(int(files[dtype]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_key_length(cfg.head_dim)  # llama.cpp's head size where it is not d_model / n_head
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)  # every dimension rotates
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.norm_eps)


def _write_tokenizer(w, tok: GGUFTokenizer, bos_id: int | None, eos_id: int | None) -> None:
    """tokenizer.ggml.* and tokenizer.chat_template."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok.pre)
    w.add_token_list(tok.tokens)
    w.add_token_types(tok.types)
    w.add_token_merges(tok.merges)
    if bos_id is not None:
        w.add_bos_token_id(bos_id)
    if eos_id is not None:
        w.add_eos_token_id(eos_id)
    w.add_add_bos_token(tok.add_bos)
    w.add_add_eos_token(tok.add_eos)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
