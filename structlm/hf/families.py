"""The transformers architectures a dense structlm model maps onto exactly, both ways: the config
keys and the weight names, layouts and transposes of each. Pure dicts and tensors; no transformers
import here (reading a checkpoint never needs it).

    Llama    RMSNorm + SwiGLU + RoPE       (GQA, head_dim != d/heads, biases, untied, rope scaling)
    GPT-2    LayerNorm + GELU + absolute    (Conv1D weights are stored transposed: (in, out))
    GPT-NeoX LayerNorm + GELU + RoPE        (sequential residual; fused QKV interleaved per head)

`family_for(cfg)` picks the family of a structlm ModelConfig, or refuses naming the feature no
native class has. Every function here is the exact inverse of its partner, which the round-trip
tests check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from structlm.config import ModelConfig
from structlm.linear.registry import DENSE

GELU_TANH = "gelu_pytorch_tanh"  # transformers' name for F.gelu(approximate="tanh")
GELU_NAMES = (GELU_TANH, "gelu_new", "gelu_fast")  # the tanh approximation, in any spelling


class Unsupported(ValueError):
    """A model or checkpoint feature the other side cannot represent exactly."""


def family_for(cfg: ModelConfig) -> str:
    """"llama", "gpt2" or "gpt_neox": the native class that computes exactly what `cfg` does."""
    if any(cfg.ffn_spec(i).kind != DENSE for i in range(cfg.n_layer)):
        raise Unsupported("the model has structured FFN layers; merge them first (export does)")
    if cfg.norm == "rmsnorm" and cfg.act == "swiglu" and cfg.pos_emb == "rope":
        return "llama"
    if cfg.norm == "layernorm" and cfg.act == "gelu":
        fam = "gpt2" if cfg.pos_emb == "absolute" else "gpt_neox"
        if cfg.kv_heads != cfg.n_head:
            raise Unsupported(f"grouped-query attention (n_kv_head={cfg.n_kv_head}) with "
                              f"LayerNorm + GELU: {fam} has no GQA")
        if cfg.attention_dim != cfg.d_model:
            raise Unsupported(f"attn_dim={cfg.attn_dim} != d_model={cfg.d_model}: {fam} ties the "
                              "attention width to the model width")
        if fam == "gpt2" and cfg.rope_scale != 1.0:
            raise Unsupported("rope_scale with absolute positions has no meaning")
        return fam
    raise Unsupported(
        f"norm={cfg.norm} with act={cfg.act} and pos_emb={cfg.pos_emb}: no native transformers "
        "class computes it (Llama is RMSNorm + SwiGLU + RoPE, GPT-2 LayerNorm + GELU + absolute, "
        "GPT-NeoX LayerNorm + GELU + RoPE)"
    )


# --- configs --------------------------------------------------------------------------------------


def _rope(cfg: ModelConfig, partial: float | None = None) -> dict:
    p = {"rope_theta": cfg.rope_base, "rope_type": "default"}
    if cfg.rope_scale != 1.0:
        p.update(rope_type="linear", factor=cfg.rope_scale)
    if partial is not None:
        p["partial_rotary_factor"] = partial
    return p


def hf_config(cfg: ModelConfig, family: str) -> dict:
    """The kwargs of the transformers config class of `family` for `cfg`."""
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "use_cache": True}
    if family == "llama":
        return {**common, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
                "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
                "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
                "hidden_act": "silu", "max_position_embeddings": cfg.block_size,
                "rms_norm_eps": cfg.norm_eps, "rope_parameters": _rope(cfg),
                "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "attention_dropout": 0.0}
    if family == "gpt2":
        return {**common, "n_embd": cfg.d_model, "n_inner": cfg.d_ff, "n_layer": cfg.n_layer,
                "n_head": cfg.n_head, "n_positions": cfg.block_size,
                "activation_function": GELU_TANH, "layer_norm_epsilon": cfg.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    return {**common, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "hidden_act": GELU_TANH, "max_position_embeddings": cfg.block_size,
            "layer_norm_eps": cfg.norm_eps, "rope_parameters": _rope(cfg, 1.0),
            "use_parallel_residual": False, "attention_bias": cfg.bias,
            "attention_dropout": 0.0, "hidden_dropout": 0.0}


# --- weights: structlm names <-> transformers names ------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where the pieces of one structlm block live in a transformers checkpoint."""

    prefix: str  # of block i: prefix.format(i=i)
    ln_1: str
    ln_2: str
    qkv: tuple[str, ...]  # one fused name, or q, k, v
    o: str
    fc1: tuple[str, ...]  # one name, or gate, up (SwiGLU)
    fc2: str
    embed: str
    pos: str | None
    final_norm: str
    transposed: bool = False  # GPT-2's Conv1D: weights stored (in, out)


LAYOUTS = {
    "llama": Layout("model.layers.{i}.", "input_layernorm", "post_attention_layernorm",
                    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                    "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj",
                    "model.embed_tokens", None, "model.norm"),
    "gpt2": Layout("transformer.h.{i}.", "ln_1", "ln_2", ("attn.c_attn",), "attn.c_proj",
                   ("mlp.c_fc",), "mlp.c_proj", "transformer.wte", "transformer.wpe",
                   "transformer.ln_f", transposed=True),
    "gpt_neox": Layout("gpt_neox.layers.{i}.", "input_layernorm", "post_attention_layernorm",
                       ("attention.query_key_value",), "attention.dense",
                       ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h", "gpt_neox.embed_in", None,
                       "gpt_neox.final_layer_norm"),
}


def _qkv_sizes(cfg: ModelConfig) -> list[int]:
    return [cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim]


def _neox_interleave(t: Tensor, cfg: ModelConfig, inverse: bool = False) -> Tensor:
    """[Q | K | V] rows (structlm) <-> per-head [q_h | k_h | v_h] rows (GPT-NeoX)."""
    nh, hd = cfg.n_head, cfg.head_dim
    rest = t.shape[1:]
    if inverse:
        return t.reshape(nh, 3, hd, *rest).transpose(0, 1).reshape(3 * nh * hd, *rest)
    return t.reshape(3, nh, hd, *rest).transpose(0, 1).reshape(3 * nh * hd, *rest)


def _rope_perm(cfg: ModelConfig) -> Tensor:
    """Row order that turns interleaved-pair RoPE (2j, 2j+1) into rotate-half RoPE (j, j + hd/2)
    within each head: applied to the Q and K rows, attention scores are unchanged."""
    hd = cfg.head_dim
    return torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])


def _permute_heads(t: Tensor, heads: int, cfg: ModelConfig, inverse: bool) -> Tensor:
    perm = _rope_perm(cfg)
    if inverse:
        perm = torch.argsort(perm)
    rest = t.shape[1:]
    return t.reshape(heads, cfg.head_dim, *rest)[:, perm].reshape(heads * cfg.head_dim, *rest)


def to_hf(sd: dict[str, Tensor], cfg: ModelConfig, family: str) -> dict[str, Tensor]:
    """A dense structlm state dict as the `family` checkpoint (every tensor a fresh copy)."""
    lay, out = LAYOUTS[family], {}
    def put(name: str, t: Tensor, linear: bool = False) -> None:
        out[name] = (t.T if linear and lay.transposed and t.dim() == 2 else t).contiguous()

    put(f"{lay.embed}.weight", sd["wte.weight"])
    if lay.pos:
        put(f"{lay.pos}.weight", sd["wpe.weight"])
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}.", lay.prefix.format(i=i)
        for a, b in (("ln_1", lay.ln_1), ("ln_2", lay.ln_2)):
            for p in ("weight", "bias"):
                if f"{src}{a}.{p}" in sd:
                    put(f"{dst}{b}.{p}", sd[f"{src}{a}.{p}"])
        for p in ("weight", "bias"):
            for a, names, split in ((f"{src}attn.qkv.{p}", lay.qkv, _qkv_sizes(cfg)),
                                    (f"{src}attn.o_proj.{p}", (lay.o,), None),
                                    (f"{src}mlp.fc1.{p}", lay.fc1, [cfg.d_ff] * len(lay.fc1)),
                                    (f"{src}mlp.fc2.{p}", (lay.fc2,), None)):
                t = sd.get(a, _zero_bias(sd, a, cfg, family))
                if t is None:
                    continue
                if a.endswith(f"qkv.{p}"):
                    t = _rope_rows(t, cfg, inverse=False)
                    if family == "gpt_neox":
                        t = _neox_interleave(t, cfg)
                parts = t.split(split) if len(names) > 1 else (t,)
                for n, part in zip(names, parts, strict=True):
                    put(f"{dst}{n}.{p}", part, linear=True)
    for p in ("weight", "bias"):
        if f"ln_f.{p}" in sd:
            put(f"{lay.final_norm}.{p}", sd[f"ln_f.{p}"])
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"].contiguous()
    return out


def _zero_bias(sd: dict, name: str, cfg: ModelConfig, family: str) -> Tensor | None:
    """GPT-2 and GPT-NeoX's MLP always have biases: a bias-free structlm layer exports zeros."""
    if not name.endswith(".bias") or cfg.bias:
        return None
    always = family == "gpt2" or (family == "gpt_neox" and ".mlp." in name)
    if not always:
        return None
    w = sd[name[: -len("bias")] + "weight"]
    return torch.zeros(w.shape[0], dtype=w.dtype)


def _rope_rows(t: Tensor, cfg: ModelConfig, inverse: bool) -> Tensor:
    """Q and K rows of a fused qkv tensor in rotate-half order (a no-op without interleaving)."""
    if not cfg.rope_interleaved or cfg.pos_emb != "rope":
        return t
    q, k, v = t.split(_qkv_sizes(cfg))
    return torch.cat([_permute_heads(q, cfg.n_head, cfg, inverse),
                      _permute_heads(k, cfg.kv_heads, cfg, inverse), v])


def from_hf(hf: dict[str, Tensor], cfg: ModelConfig, family: str) -> dict[str, Tensor]:
    """A `family` checkpoint's tensors as a structlm state dict for `cfg` (the inverse of to_hf);
    refuses non-zero biases that the structlm model would drop."""
    lay, sd = LAYOUTS[family], {}
    def get(name: str, linear: bool = False) -> Tensor:
        return hf[name].T if linear and lay.transposed and hf[name].dim() == 2 else hf[name]

    sd["wte.weight"] = get(f"{lay.embed}.weight")
    if lay.pos:
        sd["wpe.weight"] = get(f"{lay.pos}.weight")
    for i in range(cfg.n_layer):
        src, dst = lay.prefix.format(i=i), f"blocks.{i}."
        for a, b in (("ln_1", lay.ln_1), ("ln_2", lay.ln_2)):
            for p in ("weight", "bias") if cfg.norm == "layernorm" else ("weight",):
                sd[f"{dst}{a}.{p}"] = get(f"{src}{b}.{p}")
        for p in ("weight", "bias"):
            for a, names in ((f"{dst}attn.qkv.{p}", lay.qkv), (f"{dst}attn.o_proj.{p}", (lay.o,)),
                             (f"{dst}mlp.fc1.{p}", lay.fc1), (f"{dst}mlp.fc2.{p}", (lay.fc2,))):
                keys = [f"{src}{n}.{p}" for n in names]
                if not all(k in hf for k in keys):
                    if p == "weight" or cfg.bias:
                        raise Unsupported(f"the checkpoint has no {keys[0]}")
                    continue
                t = torch.cat([get(k, True) for k in keys]) if len(keys) > 1 else get(keys[0], True)
                if p == "bias" and not cfg.bias:
                    if t.abs().max() > 0:
                        raise Unsupported(f"{keys[0]} is a non-zero bias in a model without biases")
                    continue
                if a.endswith(f"qkv.{p}"):
                    if family == "gpt_neox":
                        t = _neox_interleave(t, cfg, inverse=True)
                    t = _rope_rows(t, cfg, inverse=True)
                sd[a] = t
    for p in ("weight", "bias") if cfg.norm == "layernorm" else ("weight",):
        sd[f"ln_f.{p}"] = get(f"{lay.final_norm}.{p}")
    # tied: the one embedding matrix under both names, as GPT's own state dict has it; GPT-NeoX
    # checkpoints name an untied head embed_out
    head = next((k for k in ("lm_head.weight", "embed_out.weight") if k in hf), None)
    if not cfg.tie_embeddings and head is None:
        raise Unsupported("the checkpoint has untied embeddings but no lm_head.weight")
    sd["lm_head.weight"] = sd["wte.weight"] if cfg.tie_embeddings else hf[head]
    return {k: v.contiguous() for k, v in sd.items()}
