"""The GPT: pre-LN blocks of attention and an FFN whose linear maps come from linear.build_linear.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from structlm.config import ModelConfig
from structlm.linear import build_linear
from structlm.model.cache import KVCache, SlotCache
from structlm.model.sampling import check_sampling, sample
from structlm.ops.attention import causal_attention
from structlm.ops.gelu import gelu_tanh
from structlm.ops.rope import _qkv_fused, _QkvRopeFn, apply_rope
from structlm.ops.xent import cross_entropy


def rope_angles(cfg: ModelConfig, start: int, T: int, device) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (T, head_dim) for positions start..start+T-1 (docs/method.md §3.3, Megatron
    layout)."""
    return rope_angles_at(cfg, torch.arange(start, start + T, device=device))


def rope_angles_at(cfg: ModelConfig, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (*positions.shape, head_dim) for integer positions of any shape."""
    hd = cfg.head_dim
    exponents = torch.arange(0, hd, 2, device=positions.device, dtype=torch.float32) / hd
    inv_freq = 1.0 / cfg.rope_base**exponents
    pos = positions.to(torch.float32) / cfg.rope_scale
    freqs = pos[..., None] * inv_freq  # (..., hd/2)
    if cfg.rope_interleaved:
        emb = freqs.repeat_interleave(2, dim=-1)  # (T, hd): f0 f0 f1 f1 ...
    else:
        emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd): f0 f1 ... f0 f1 ...
    return emb.cos(), emb.sin()


class CausalSelfAttention(nn.Module):
    """Fused QKV projection, RoPE, causal SDPA with grouped-query heads, output projection."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        hd, nq, nkv = cfg.head_dim, cfg.n_head, cfg.kv_heads
        # rows: [Q: nq*hd | K: nkv*hd | V: nkv*hd]
        self.qkv = nn.Linear(cfg.d_model, (nq + 2 * nkv) * hd, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.attention_dim, cfg.d_model, bias=cfg.bias)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, cache: KVCache | None
    ) -> Tensor:
        B, T, _ = x.shape
        cfg = self.cfg
        hd, nq, nkv = cfg.head_dim, cfg.n_head, cfg.kv_heads
        h = self.qkv(x)  # (B, T, (nq + 2 nkv) hs)
        fused = None
        if rope is not None and not cfg.rope_interleaved:  # a SlotCache's per-row angles: None
            fused = _qkv_fused(h, *rope)
        if fused is not None:
            q, k, v = _QkvRopeFn.apply(h, *rope, nq, nkv, fused)  # contiguous, q, k rotated
        else:
            q, k, v = h.split([nq * hd, nkv * hd, nkv * hd], dim=-1)
            q = q.view(B, T, nq, hd).transpose(1, 2)  # (B, nq, T, hs)
            k = k.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hs)
            v = v.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hs)
            if rope is not None:
                q = apply_rope(q, *rope, cfg.rope_interleaved)
                k = apply_rope(k, *rope, cfg.rope_interleaved)
        g = nq // nkv  # query heads per K/V head (GQA); query head h reads K/V head h // g
        if isinstance(cache, SlotCache):  # continuous batching: each row its own length
            k, v, mask = cache.update(self.layer, k, v)  # (B, nkv, L, hs), mask (B, 1, T, L)
            k, v = k.to(q.dtype).repeat_interleave(g, 1), v.to(q.dtype).repeat_interleave(g, 1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=cfg.attn_scale)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, nq * hd))
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.update(self.layer, k, v)  # (B, nkv, start+T, hs)
        k, v = k.to(q.dtype), v.to(q.dtype)
        if start == 0:  # training and prefill
            if g > 1:
                k = k.repeat_interleave(g, dim=1)
                v = v.repeat_interleave(g, dim=1)
            y = causal_attention(q, k, v, cfg.attn_scale)  # (B, nq, T, hs)
        else:
            # decoding with a cache: fold each group's query heads into the query axis,
            # (B, nkv, g*T, hs), so every K/V head is read once instead of copying the cache g times
            mask = None  # one new query attends to every cached key, itself included
            if T > 1:  # query t sits at position start+t and sees keys 0..start+t
                keys = torch.arange(start + T, device=x.device)
                queries = (start + torch.arange(T, device=x.device)).repeat(g)  # row i*T+t: t
                mask = keys[None, :] <= queries[:, None]  # (g*T, start+T)
            qg = q.reshape(B, nkv, g * T, hd)
            y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=cfg.attn_scale)
            y = y.view(B, nq, T, hd)
        y = y.transpose(1, 2).reshape(B, T, nq * hd)  # (B, T, attn_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    """fc2(act(fc1(x))): GELU (tanh, in fp32) or SwiGLU; fc1/fc2 of the block's structured kind."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.act = cfg.act
        (_, d_in1, d_out1), (_, d_in2, d_out2) = cfg.ffn_shapes()
        self.fc1 = build_linear(cfg.linear_spec(layer, "fc1"), d_in1, d_out1, bias=cfg.bias,
                                init_std=cfg.init_std)
        self.fc2 = build_linear(cfg.linear_spec(layer, "fc2"), d_in2, d_out2, bias=cfg.bias,
                                init_std=cfg.init_std)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)  # (B, T, d_ff) or (B, T, 2*d_ff) for swiglu
        if self.act == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            # the paper's tanh-GELU in fp32, rounded once to h's dtype, in one pass (activation.py)
            h = gelu_tanh(h)
        return self.fc2(h)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg, layer)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, cache: KVCache | None
    ) -> Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), rope, cache))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.pos_emb == "absolute" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_dense(cfg.init_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    @torch.no_grad()
    def _init_dense(self, std: float) -> None:
        """docs/method.md §3.5: nn.Linear and embeddings N(0, std^2), biases 0, norms 1/0; no depth
        scaling. Structured FFN layers initialised themselves at construction (§1.6)."""
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()

    def hidden(self, idx: Tensor, kv_cache: KVCache | SlotCache | None = None) -> Tensor:
        """Final-norm hidden states (B, T, d_model) for tokens idx: (B, T)."""
        B, T = idx.shape
        if isinstance(kv_cache, SlotCache):
            pos = kv_cache.positions(T, idx.device)  # (B, T): every row its own
        else:
            start = kv_cache.length if kv_cache is not None else 0
            pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        if self.wpe is not None and int(pos.max()) >= self.cfg.block_size:
            raise ValueError(
                f"sequence of {int(pos.max()) + 1} tokens exceeds block_size={self.cfg.block_size}"
                " (absolute position embeddings); crop the input"
            )
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos)
        else:
            cos, sin = rope_angles_at(self.cfg, pos)  # (T, hd) or (B, T, hd)
            rope = (cos, sin) if pos.dim() == 1 else (cos[:, None], sin[:, None])
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, kv_cache)
        if isinstance(kv_cache, SlotCache):
            kv_cache.advance(T)
        elif kv_cache is not None:
            kv_cache.length += T
        return self.ln_f(x)

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, kv_cache: KVCache | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """logits (B, T, vocab) and, given targets (B, T), the mean next-token cross-entropy."""
        logits = self.logits(self.hidden(idx, kv_cache))
        loss = None
        if targets is not None:
            loss = cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    def logits(self, h: Tensor) -> Tensor:
        """(..., d_model) final hidden states -> (..., vocab) logits, times `logit_scale`
        (applied to h, the narrower tensor)."""
        s = self.cfg.logit_scale
        return self.lm_head(h if s == 1.0 else h * s)

    def make_cache(self, max_len: int | None = None) -> KVCache:
        return KVCache(self.cfg.n_layer, max_len or self.cfg.block_size)

    @torch.no_grad()
    def stream(
        self, idx: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
        top_k: int | None = None, top_p: float | None = None,
        generator: torch.Generator | None = None, use_cache: bool = True,
    ) -> Iterator[Tensor]:
        """Yield (B, 1) sampled tokens one at a time after the prompt idx: (B, T).

        temperature 0 is greedy. With the cache, a context that fills block_size is re-prefilled
        from its last block_size/2 tokens; without it, every step recomputes the last block_size
        tokens.
        """
        check_sampling(temperature, top_k, top_p)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        cache = self.make_cache() if use_cache else None
        ctx = idx
        logits = self._last_logits(ctx, cache)
        for _ in range(max_new_tokens):
            nxt = sample(logits, temperature, top_k, top_p, generator)  # (B, 1)
            yield nxt
            ctx = torch.cat([ctx, nxt], dim=1)
            if cache is None:
                logits = self._last_logits(ctx[:, -self.cfg.block_size :], None)
            elif cache.length + 1 > cache.max_len:
                cache = self.make_cache()
                logits = self._last_logits(ctx[:, -(self.cfg.block_size // 2) :], cache)
            else:
                logits = self._last_logits(nxt, cache)

    def _last_logits(self, idx: Tensor, cache: KVCache | None) -> Tensor:
        if cache is None or cache.length == 0:
            idx = idx[:, -self.cfg.block_size :]
        return self.logits(self.hidden(idx, cache)[:, -1]).float()  # (B, vocab)

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, **kw) -> Tensor:
        """The prompt followed by max_new_tokens sampled tokens: (B, T + max_new_tokens)."""
        return torch.cat([idx, *self.stream(idx, max_new_tokens, **kw)], dim=1)
