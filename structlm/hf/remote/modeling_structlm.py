"""A structlm GPT for transformers (self-contained: torch and transformers only).

The module tree and parameter names are structlm's, so the weights are the structured factors
themselves: LowRank (down, up), BlockDense (blkdiag, up), BlockShuffle (blkdiag1, blkdiag2) and BTT
(core1, core2) keep their parameter and FLOP savings. In evaluation, calls with fewer than
`premerge_tokens` tokens (one decoding step) use each layer's merged dense matrix instead, built
once from the factors.
"""

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_structlm import StructlmConfig

V5 = int(transformers.__version__.split(".")[0]) >= 5
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else (
    "past_key_values")


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


class Attention(nn.Module):
    def __init__(self, m, layer):
        super().__init__()
        self.m, self.layer = m, layer
        ad = m["attn_dim"] or m["d_model"]
        self.nq, self.nkv = m["n_head"], m["n_kv_head"] or m["n_head"]
        self.hd = ad // self.nq
        self.qkv = nn.Linear(m["d_model"], (self.nq + 2 * self.nkv) * self.hd, bias=m["bias"])
        self.o_proj = nn.Linear(ad, m["d_model"], bias=m["bias"])

    def forward(self, x, rope_cs, mask, cache):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.nq * self.hd, self.nkv * self.hd, self.nkv * self.hd], -1)
        q = q.view(B, T, self.nq, self.hd).transpose(1, 2)
        k = k.view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)
        if rope_cs is not None:
            q = apply_rope(q, *rope_cs, self.m["rope_interleaved"])
            k = apply_rope(k, *rope_cs, self.m["rope_interleaved"])
        if cache is not None:
            k, v = cache.update(k, v, self.layer)
        g = self.nq // self.nkv
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nq * self.hd))


class MLP(nn.Module):
    def __init__(self, m, layer, premerge_tokens):
        super().__init__()
        spec = {"kind": "dense"} if layer in m["dense_ffn_layers"] else m["ffn"]
        self.swiglu = m["act"] == "swiglu"
        out1 = 2 * m["d_ff"] if self.swiglu else m["d_ff"]
        self.fc1 = build_linear(spec, m["d_model"], out1, m["bias"], premerge_tokens)
        self.fc2 = build_linear(spec, m["d_ff"], m["d_model"], m["bias"], premerge_tokens)

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
    def __init__(self, m, layer, premerge_tokens):
        super().__init__()
        self.ln_1, self.attn = norm(m), Attention(m, layer)
        self.ln_2, self.mlp = norm(m), MLP(m, layer, premerge_tokens)

    def forward(self, x, rope_cs, mask, cache):
        x = x + self.attn(self.ln_1(x), rope_cs, mask, cache)
        return x + self.mlp(self.ln_2(x))


class StructlmForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = StructlmConfig
    base_model_prefix = "structlm"
    _no_split_modules = ["Block"]
    _supports_sdpa = True
    _tied_weights_keys = {"lm_head.weight": "wte.weight"} if V5 else ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        m = config.structlm
        self.wte = nn.Embedding(m["vocab_size"], m["d_model"])
        self.wpe = nn.Embedding(m["block_size"], m["d_model"]) if m["pos_emb"] == "absolute" \
            else None
        self.blocks = nn.ModuleList(Block(m, i, config.premerge_tokens)
                                    for i in range(m["n_layer"]))
        self.ln_f = norm(m)
        self.lm_head = nn.Linear(m["d_model"], m["vocab_size"], bias=False)
        self.post_init()

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

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                past_key_values=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        m = self.config.structlm
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = (past + torch.arange(T, device=input_ids.device)).expand(B, T)
        x = self.wte(input_ids)
        rope_cs = None
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        else:
            rope_cs = rope(m, position_ids, input_ids.device)
        mask = causal_mask(attention_mask, B, T, past, input_ids.device)
        for block in self.blocks:
            x = block(x, rope_cs, mask, cache)
        x = self.ln_f(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{CACHE_FIELD: cache if use_cache else None})


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
