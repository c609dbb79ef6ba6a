"""Reading Hugging Face checkpoints (config.json + safetensors, or one GGUF file) as a ModelConfig
and structlm weights; no code from the checkpoint runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from structlm.config import ModelConfig
from structlm.hf.families import GELU_NAMES, Unsupported, from_hf
from structlm.model.gpt import GPT

FAMILIES = {"llama": "llama", "gpt2": "gpt2", "gpt_neox": "gpt_neox"}  # model_type -> family


def read_config(hf_dir: Path) -> tuple[ModelConfig, str, dict]:
    """(structlm ModelConfig, family, the raw config.json) of a transformers checkpoint."""
    path = Path(hf_dir) / "config.json"
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable transformers config.json ({e})") from None
    return config_from_dict(d, path)


def config_from_dict(d: dict, path: Path) -> tuple[ModelConfig, str, dict]:
    family = FAMILIES.get(d.get("model_type"))
    if family is None:
        raise Unsupported(f"{path}: model_type={d.get('model_type')!r} is not supported; structlm "
                          f"imports {sorted(FAMILIES)}")
    make = {"llama": _llama, "gpt2": _gpt2, "gpt_neox": _neox}[family]
    try:
        return make(d, path), family, d
    except KeyError as e:
        raise Unsupported(f"{path}: has no {e.args[0]!r}, which a {family} config needs "
                          "(is the file complete?)") from None


def _need(d: dict, key: str, ok, path: Path, why: str, default=None):
    v = d.get(key, default)
    if not ok(v):
        raise Unsupported(f"{path}: {key}={v!r} is not supported ({why})")
    return v


def _rope(d: dict, path: Path, frac: float = 1.0) -> tuple[float, float, float]:
    """(theta, linear scale, rotary fraction) from either transformers 5's rope_parameters or
    4.x's rope_theta / rope_scaling / rotary_pct keys; `frac`: the family's default fraction."""
    p = dict(d.get("rope_parameters") or {})
    scaling = d.get("rope_scaling") or {}
    kind = p.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind not in ("default", "linear"):
        raise Unsupported(f"{path}: rope type {kind!r} is not implemented by structlm (default "
                          "and linear are)")
    theta = p.get("rope_theta", d.get("rope_theta", d.get("rotary_emb_base", 10000.0)))
    factor = p.get("factor", scaling.get("factor", 1.0)) if kind == "linear" else 1.0
    frac = p.get("partial_rotary_factor", d.get("rotary_pct", d.get("partial_rotary_factor", frac)))
    return float(theta), float(factor), float(frac)


def _llama(d: dict, path: Path) -> ModelConfig:
    _need(d, "hidden_act", lambda v: v == "silu", path, "Llama's MLP is SwiGLU", "silu")
    bias = bool(d.get("attention_bias", False))
    _need(d, "mlp_bias", lambda v: bool(v) == bias, path,
          "structlm has one bias switch; attention_bias and mlp_bias must agree", False)
    theta, factor, frac = _rope(d, path)
    if frac != 1.0:
        raise Unsupported(f"{path}: partial_rotary_factor={frac} (structlm rotates every dim)")
    heads = d["num_attention_heads"]
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    kv = d.get("num_key_value_heads") or heads
    return ModelConfig(
        vocab_size=d["vocab_size"], block_size=d.get("max_position_embeddings", 2048),
        n_layer=d["num_hidden_layers"], n_head=heads, n_kv_head=kv if kv != heads else None,
        d_model=d["hidden_size"],
        attn_dim=heads * head_dim if heads * head_dim != d["hidden_size"] else None,
        d_ff=d["intermediate_size"], act="swiglu", norm="rmsnorm",
        norm_eps=d.get("rms_norm_eps", 1e-6), bias=bias,
        tie_embeddings=d.get("tie_word_embeddings", False), pos_emb="rope", rope_base=theta,
        rope_scale=factor,
    )


def _gpt2(d: dict, path: Path) -> ModelConfig:
    _need(d, "activation_function", lambda v: v in GELU_NAMES, path,
          "structlm's GELU is the tanh approximation", "gelu_new")
    _need(d, "scale_attn_weights", lambda v: v is True, path, "attention is scaled", True)
    _need(d, "scale_attn_by_inverse_layer_idx", lambda v: not v, path, "no per-layer scaling",
          False)
    n = d.get("n_embd", 768)
    return ModelConfig(
        vocab_size=d.get("vocab_size", 50257), block_size=d.get("n_positions", 1024),
        n_layer=d.get("n_layer", 12), n_head=d.get("n_head", 12), d_model=n,
        d_ff=d.get("n_inner") or 4 * n, act="gelu", norm="layernorm",
        norm_eps=d.get("layer_norm_epsilon", 1e-5), bias=True,
        tie_embeddings=d.get("tie_word_embeddings", True), pos_emb="absolute",
    )


def _neox(d: dict, path: Path) -> ModelConfig:
    _need(d, "use_parallel_residual", lambda v: v is False, path,
          "structlm's blocks add attention and MLP one after the other", True)
    _need(d, "hidden_act", lambda v: v in GELU_NAMES, path,
          "structlm's GELU is the tanh approximation", "gelu")
    theta, factor, frac = _rope(d, path, frac=0.25)  # transformers' GPT-NeoX default
    if frac != 1.0:
        raise Unsupported(f"{path}: partial rotary fraction {frac} (structlm rotates every dim)")
    return ModelConfig(
        vocab_size=d["vocab_size"], block_size=d.get("max_position_embeddings", 2048),
        n_layer=d["num_hidden_layers"], n_head=d["num_attention_heads"],
        d_model=d["hidden_size"], d_ff=d["intermediate_size"], act="gelu", norm="layernorm",
        norm_eps=d.get("layer_norm_eps", 1e-5), bias=bool(d.get("attention_bias", True)),
        tie_embeddings=d.get("tie_word_embeddings", False), pos_emb="rope", rope_base=theta,
        rope_scale=factor,
    )


def read_weights(hf_dir: Path) -> dict[str, Tensor]:
    """Every tensor of the safetensors file(s) of a checkpoint (sharded ones through their
    index); never a pickle."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").exists():  # not an adapter or a copy lying beside it
        files = ["model.safetensors"]
    else:
        files = [p.name for p in sorted(hf_dir.glob("*.safetensors"))]
    if not files:
        raise FileNotFoundError(f"{hf_dir} holds no .safetensors weights (pickled .bin files "
                                "are not read: they can run code); convert them to safetensors")
    out = {}
    for name in files:
        try:
            with safe_open(str(hf_dir / name), "pt") as f:
                for k in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    out[k] = f.get_tensor(k)
        except SafetensorError as e:
            raise ValueError(f"{hf_dir / name}: not a readable safetensors file ({e}); is the "
                             "download complete?") from None
    return out


def gguf_file(path: Path) -> Path | None:
    """The GGUF file `path` names (a .gguf file, or a directory holding one and no safetensors)."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not list(path.glob("*.safetensors")):
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            names = [f.name for f in found]
            raise ValueError(f"{path} holds several GGUF files; name one of {names}")
        return found[0] if found else None
    return None


def read_gguf(path: Path, tokenizer_dir: Path | None = None) -> tuple[ModelConfig, dict, str]:
    """A GGUF checkpoint through transformers' GGUF reader (data only, dequantized to fp32):
    (ModelConfig, structlm state dict, family); its tokenizer saved into `tokenizer_dir`."""
    try:
        import transformers  # optional extra: only GGUF files need it
    except ImportError:
        raise ImportError("importing GGUF files needs transformers and gguf: pip install -e "
                          "\".[hf]\" gguf") from None
    kw = {"gguf_file": path.name}
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
    cfg, family, _ = config_from_dict(hf.config.to_dict(), path)
    check_finite(dict(hf.state_dict()), path)
    if tokenizer_dir is not None:
        transformers.AutoTokenizer.from_pretrained(path.parent, **kw).save_pretrained(tokenizer_dir)
    return cfg, from_hf(dict(hf.state_dict()), cfg, family), family


def read_hf(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """A transformers checkpoint as (structlm ModelConfig, structlm state dict), checked to load
    strictly into GPT(cfg). Safetensors are read directly; a GGUF file through transformers."""
    gguf = gguf_file(Path(hf_dir))
    if gguf is not None:
        cfg, sd, _ = read_gguf(gguf)
        return cfg, sd
    cfg, family, _ = read_config(Path(hf_dir))
    weights = read_weights(Path(hf_dir))
    check_finite(weights, hf_dir)  # named as the checkpoint names them
    try:
        sd = from_hf(weights, cfg, family)
    except KeyError as e:
        raise ValueError(f"{hf_dir}: the weights have no {e.args[0]!r}, which its config.json "
                         f"implies (n_layer={cfg.n_layer}): an incomplete checkpoint, or the "
                         "config of another model") from None
    with torch.device("meta"):  # names and shapes only: no memory, no init
        try:
            GPT(cfg).load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as e:
            wrong = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
            raise ValueError(f"{hf_dir}: the weights do not fit its config.json: "
                             f"{'; '.join(wrong[:3]) or e}") from None
    return cfg, sd


def check_finite(sd: dict[str, Tensor], source) -> None:
    """Refuse weights holding NaN or infinity, naming the first such tensor (a damaged or
    badly converted checkpoint would otherwise evaluate to `loss nan` and sample garbage)."""
    for name, t in sd.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{source}: the weight {name} holds {bad:,} non-finite value(s) "
                             "(NaN or infinity); the checkpoint is damaged or was converted "
                             "wrongly, so nothing was read from it")
