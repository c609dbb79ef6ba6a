"""A structlm GPT for transformers (self-contained: torch and transformers only).

The module tree and parameter names are structlm's, under `model.` (the base model, StructlmModel)
with `lm_head` beside it, so the weights are the structured factors themselves: LowRank (down, up),
BlockDense (blkdiag, up), BlockShuffle (blkdiag1, blkdiag2) and BTT (core1, core2) keep their
parameter and FLOP savings. In evaluation, calls with fewer than `premerge_tokens` tokens (one
decoding step) use each layer's merged dense matrix instead, built once from the factors.

The base model follows transformers' attention interface, which is what lets serving engines
(vLLM's transformers backend) run it with their own attention kernels: attention is computed by
`ALL_ATTENTION_FUNCTIONS[config._attn_implementation]` (our own function for "eager"), every
module passes its keyword arguments down to it, and the classes declare
`_supports_attention_backend`. The mask is built here in the form each function takes.
"""

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_structlm import StructlmConfig

V5 = int(transformers.__version__.split(".")[0]) >= 5
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else (
    "past_key_values")  # transformers renamed the outputs' cache field
BASE_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else (
    "past_key_values")
MASKED_KERNELS = (None, "eager", "sdpa")  # take a 4-D mask; the others (flash, vLLM's) the 2-D one


# --- the structured linear maps: y = f(x) + b ------------------------------------------------


class Structured(nn.Module):
    def __init__(self, d_in, d_out, bias, premerge_tokens):
        super().__init__()
        self.d_in, self.d_out, self.premerge_tokens = d_in, d_out, premerge_tokens
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None
        self._merged = None

    def matmul(self, x):  # (..., d_in) -> (..., d_out), no bias
        raise NotImplementedError

    def forward(self, x):
        tokens = x.numel() // x.shape[-1]
        if not self.training and not torch.is_grad_enabled() and tokens < self.premerge_tokens:
            return F.linear(x, self.merged(x.device).to(x.dtype), self.bias)
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def merged(self, device):
        """The layer's dense matrix (d_out, d_in): the factors applied to the identity, once."""
        if self._merged is None or self._merged.device != device:
            w = next(p for n, p in self.named_parameters(recurse=False) if n != "bias")
            with torch.autocast(device.type, enabled=False):
                eye = torch.eye(self.d_in, device=device, dtype=w.dtype)
                self._merged = self.matmul(eye).T.contiguous()
        return self._merged

    def train(self, mode=True):
        self._merged = None  # the factors may change: merge again when next needed
        return super().train(mode)


class Dense(Structured):
    def __init__(self, d_in, d_out, bias, premerge_tokens, **hp):
        super().__init__(d_in, d_out, bias, premerge_tokens)
        self.weight = nn.Parameter(torch.empty(d_out, d_in))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class LowRank(Structured):
    def __init__(self, d_in, d_out, bias, premerge_tokens, rank, **hp):
        super().__init__(d_in, d_out, bias, premerge_tokens)
        self.down = nn.Parameter(torch.empty(rank, d_in))
        self.up = nn.Parameter(torch.empty(d_out, rank))

    def matmul(self, x):
        return F.linear(F.linear(x, self.down), self.up)


class BlockDense(Structured):
    def __init__(self, d_in, d_out, bias, premerge_tokens, rank, nblocks, **hp):
        super().__init__(d_in, d_out, bias, premerge_tokens)
        self.blkdiag = nn.Parameter(torch.empty(nblocks, rank // nblocks, d_in // nblocks))
        self.up = nn.Parameter(torch.empty(d_out, rank))

    def matmul(self, x):
        nb, r, p = self.blkdiag.shape
        h = torch.einsum("...kp,krp->...kr", x.unflatten(-1, (nb, p)), self.blkdiag)
        return F.linear(h.flatten(-2), self.up)


class BlockShuffle(Structured):
    """Monarch: blockdiag, a stride shuffle, blockdiag, the inverse interleave."""

    def __init__(self, d_in, d_out, bias, premerge_tokens, nblocks, **hp):
        super().__init__(d_in, d_out, bias, premerge_tokens)
        p, o = d_in // nblocks, d_out // nblocks
        q = min(p, o)
        self.blkdiag1 = nn.Parameter(torch.empty(nblocks, q, p))
        self.blkdiag2 = nn.Parameter(torch.empty(nblocks, o, q))

    def matmul(self, x):
        nb, q, p = self.blkdiag1.shape
        h = torch.einsum("...kp,kqp->...kq", x.unflatten(-1, (nb, p)), self.blkdiag1)
        z = h.flatten(-2).unflatten(-1, (q, nb)).transpose(-1, -2)  # z_j[i] = h[i*B + j]
        u = torch.einsum("...jq,jsq->...js", z, self.blkdiag2)  # (..., B, s)
        return u.transpose(-1, -2).flatten(-2)  # y[i*B + j] = u_j[i]


class BTT(Structured):
    """Two-core block tensor-train: core1[j] maps input block j to rank-r pieces for every
    output block, core2[i] gathers output block i's pieces from every input block."""

    def __init__(self, d_in, d_out, bias, premerge_tokens, rank, nblocks, **hp):
        super().__init__(d_in, d_out, bias, premerge_tokens)
        b = nblocks
        self.core1 = nn.Parameter(torch.empty(b, b * rank, d_in // b))
        self.core2 = nn.Parameter(torch.empty(b, d_out // b, b * rank))

    def matmul(self, x):
        nb, br, n = self.core1.shape
        h = torch.einsum("...jn,jan->...ja", x.unflatten(-1, (nb, n)), self.core1)
        h = h.unflatten(-1, (nb, br // nb))  # (..., input block j, output block i, rank a)
        y = torch.einsum("...jia,imja->...im", h, self.core2.unflatten(-1, (nb, br // nb)))
        return y.flatten(-2)  # y[i*m + s]


KINDS = {"dense": Dense, "lowrank": LowRank, "blockdense": BlockDense,
         "blockshuffle": BlockShuffle, "btt": BTT}


def build_linear(spec, d_in, d_out, bias, premerge_tokens):
    if spec["kind"] not in KINDS:
        raise ValueError(f"this exported model uses FFN kind {spec['kind']!r}, which "
                         f"modeling_structlm.py does not define ({sorted(KINDS)})")
    hp = {k: v for k, v in (("rank", spec.get("rank")), ("nblocks", spec.get("nblocks")))
          if v is not None}
    return KINDS[spec["kind"]](d_in, d_out, bias, premerge_tokens, **hp,
                               **spec.get("params", {}))


def linear_spec(m, layer, name):
    """Block `layer`'s FFN linear `name`: dense in a dense block, else the model's FFN kind with
    the hyper-parameters this linear overrides (an allocated conversion's uneven ranks)."""
    if layer in m["dense_ffn_layers"] or m["ffn"]["kind"] == "dense":
        return {"kind": "dense"}
    own = m.get("ffn_overrides", {}).get(f"{layer}.{name}", {})
    spec = {**m["ffn"], "params": dict(m["ffn"].get("params", {}))}
    for k, v in own.items():
        if k in ("rank", "nblocks"):
            spec[k] = v
        else:
            spec["params"][k] = v
    return spec


# --- the transformer ----------------------------------------------------------------------------


def rope(m, position_ids, device):
    """cos, sin: (B, 1, T, head_dim) for absolute positions position_ids (B, T)."""
    hd = (m["attn_dim"] or m["d_model"]) // m["n_head"]
    inv = 1.0 / m["rope_base"] ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd)
    freqs = position_ids.float()[..., None] / m["rope_scale"] * inv  # (B, T, hd/2)
    emb = freqs.repeat_interleave(2, -1) if m["rope_interleaved"] else torch.cat([freqs, freqs], -1)
    return emb.cos()[:, None], emb.sin()[:, None]


def apply_rope(x, cos, sin, interleaved):
    xf = x.float()
    if interleaved:
        pairs = xf.unflatten(-1, (-1, 2))
        rot = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        rot = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rot * sin).to(x.dtype)


def eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    **kwargs):
    """Attention written out, with the contract of transformers' attention functions: query
    (B, H, T, hd), key and value (B, H_kv, S, hd) with H a multiple of H_kv, a mask that is
    boolean (True: attend) or additive and broadcasts to (B, H, T, S), or None (no masking).
    Returns the output as (B, T, H, hd) and the attention probabilities (B, H, T, S)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1).to(query.dtype)
    value = value.repeat_interleave(groups, dim=1).to(query.dtype)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else (
            scores + mask)
    probs = F.dropout(scores.softmax(-1).to(value.dtype), p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def attention_function(name):
    """The attention function config._attn_implementation names: ours for "eager" (or none
    set), else the one registered in transformers' ALL_ATTENTION_FUNCTIONS (sdpa, flash
    attention, or a serving engine's own, e.g. vLLM's)."""
    return eager_attention if name in (None, "eager") else ALL_ATTENTION_FUNCTIONS[name]


class Attention(nn.Module):
    is_causal = True  # attention functions that apply causality themselves read this

    def __init__(self, config, layer):
        super().__init__()
        m = config.structlm
        self.config, self.m, self.layer_idx = config, m, layer
        ad = m["attn_dim"] or m["d_model"]
        self.nq, self.nkv = m["n_head"], m["n_kv_head"] or m["n_head"]
        self.hd = ad // self.nq
        self.num_key_value_groups = self.nq // self.nkv  # read by transformers' sdpa function
        self.scaling = self.hd ** -0.5
        self.qkv = nn.Linear(m["d_model"], (self.nq + 2 * self.nkv) * self.hd, bias=m["bias"])
        self.o_proj = nn.Linear(ad, m["d_model"], bias=m["bias"])

    def forward(self, x, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.nq * self.hd, self.nkv * self.hd, self.nkv * self.hd], -1)
        q = q.view(B, T, self.nq, self.hd).transpose(1, 2)
        k = k.view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)
        if position_embeddings is not None:  # RoPE; absolute positions were added to the input
            q = apply_rope(q, *position_embeddings, self.m["rope_interleaved"])
            k = apply_rope(k, *position_embeddings, self.m["rope_interleaved"])
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attend = attention_function(self.config._attn_implementation)
        y, _ = attend(self, q, k.to(q.dtype), v.to(q.dtype), attention_mask, dropout=0.0,
                      scaling=self.scaling, **kwargs)
        return self.o_proj(y.reshape(B, T, self.nq * self.hd))


class MLP(nn.Module):
    def __init__(self, m, layer, premerge_tokens):
        super().__init__()
        self.swiglu = m["act"] == "swiglu"
        out1 = 2 * m["d_ff"] if self.swiglu else m["d_ff"]
        self.fc1 = build_linear(linear_spec(m, layer, "fc1"), m["d_model"], out1, m["bias"],
                                premerge_tokens)
        self.fc2 = build_linear(linear_spec(m, layer, "fc2"), m["d_ff"], m["d_model"], m["bias"],
                                premerge_tokens)

    def forward(self, x):
        h = self.fc1(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.fc2(h)


def norm(m):
    if m["norm"] == "rmsnorm":
        return nn.RMSNorm(m["d_model"], eps=m.get("norm_eps", 1e-5))
    return nn.LayerNorm(m["d_model"], eps=m.get("norm_eps", 1e-5))


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        m = config.structlm
        self.ln_1, self.attn = norm(m), Attention(config, layer)
        self.ln_2, self.mlp = norm(m), MLP(m, layer, config.premerge_tokens)

    def forward(self, x, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        x = x + self.attn(self.ln_1(x), position_embeddings, attention_mask, cache, **kwargs)
        return x + self.mlp(self.ln_2(x))


class StructlmPreTrainedModel(PreTrainedModel):
    config_class = StructlmConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_sdpa = True
    _supports_attention_backend = True  # attention through ALL_ATTENTION_FUNCTIONS, kwargs passed

    def _init_weights(self, module):
        std = self.config.structlm.get("init_std", 0.02)
        for name, p in module.named_parameters(recurse=False):
            with torch.no_grad():
                if name == "bias":
                    p.zero_()
                elif isinstance(module, nn.LayerNorm | nn.RMSNorm):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std)


class StructlmModel(StructlmPreTrainedModel):
    """The transformer without its head: embeddings, blocks, final norm -> hidden states."""

    def __init__(self, config):
        super().__init__(config)
        m = config.structlm
        self.wte = nn.Embedding(m["vocab_size"], m["d_model"])
        self.wpe = nn.Embedding(m["block_size"], m["d_model"]) if m["pos_emb"] == "absolute" \
            else None
        self.blocks = nn.ModuleList(Block(config, i) for i in range(m["n_layer"]))
        self.ln_f = norm(m)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, return_dict=None,
                **kwargs):
        """Hidden states (B, T, d_model); every other keyword argument reaches the attention
        function (a serving engine's per-layer state, say)."""
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if position_ids is None:
            position_ids = (past + torch.arange(T, device=x.device)).expand(B, T)
        rope_cs = None
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        else:
            rope_cs = rope(self.config.structlm, position_ids, x.device)
        mask = mask_for(self.config._attn_implementation, attention_mask, B, T, past, x.device)
        for block in self.blocks:
            x = block(x, rope_cs, mask, cache, **kwargs)
        out = BaseModelOutputWithPast(last_hidden_state=self.ln_f(x),
                                      **{BASE_CACHE_FIELD: cache if use_cache else None})
        return out if return_dict is not False else out.to_tuple()


class StructlmForCausalLM(StructlmPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.wte.weight"} if V5 else ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = StructlmModel(config)
        m = config.structlm
        self.lm_head = nn.Linear(m["d_model"], m["vocab_size"], bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.wte

    def set_input_embeddings(self, value):
        self.model.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                logits_to_keep=0, return_dict=None, **kwargs):
        """Logits (and the next-token loss with `labels`); `logits_to_keep`: the last n positions
        (an int, 0 for all) or the positions themselves (a tensor of indices)."""
        cache = cache if cache is not None else past_key_values
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, return_dict=True, **kwargs)
        x = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            x = x[:, -logits_to_keep:] if logits_to_keep else x
        else:
            x = x[:, logits_to_keep]
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        res = CausalLMOutputWithPast(loss=loss, logits=logits,
                                     **{CACHE_FIELD: getattr(out, BASE_CACHE_FIELD)})
        return res if return_dict is not False else res.to_tuple()


def mask_for(implementation, attention_mask, B, T, past, device):
    """The mask in the form the attention function takes. eager and sdpa: the 4-D boolean of
    causal_mask, or None where plain causality is all there is (sdpa then uses its causal kernel;
    a square block or one query). Every other function (flash attention, a serving engine's
    kernel) applies causality itself and takes the (B, past + T) padding mask as given."""
    if implementation not in MASKED_KERNELS:
        return attention_mask
    if implementation == "sdpa" and attention_mask is None and (past == 0 or T == 1):
        return None
    return causal_mask(attention_mask, B, T, past, device)


def causal_mask(attention_mask, B, T, past, device):
    """(B, 1, T, past + T) booleans, True where a query may attend: keys up to its own position
    that the padding mask keeps. A query whose keys are all masked (a padded row) sees itself."""
    S = past + T
    keys = torch.arange(S, device=device)
    allowed = keys[None, :] <= (past + torch.arange(T, device=device))[:, None]  # (T, S)
    allowed = allowed[None, None].expand(B, 1, T, S)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, -S:].bool()
    own = torch.zeros_like(allowed)
    own[..., torch.arange(T, device=device), past + torch.arange(T, device=device)] = True
    return allowed | (own & ~allowed.any(-1, keepdim=True))
