"""The GPT model: a pre-LN decoder-only transformer whose FFN linears are structured
(docs/method.md §3).

    idx -> wte (+ wpe) -> [ Block x n_layer ] -> ln_f -> lm_head (tied to wte) -> logits

    Block:  h = h + o_proj(attn(rope(q), rope(k), v))   attn: causal SDPA, GQA shares K/V heads
            h = h + fc2(act(fc1(ln_2(h))))               fc1, fc2: build_linear(cfg.ffn_spec(i))

The model is built structured from its config: `dense_ffn_layers` blocks get dense FFNs, the others
the `cfg.ffn` kind. It knows nothing of training, data or distribution; `KVCache` gives incremental
decoding whose logits equal those of full recomputation (the cache attends to keys 0..offset
inclusive, fixing docs/method.md §3.4's bug).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from structlm import native
from structlm.activation import gelu_tanh
from structlm.attention import causal_attention
from structlm.config import ModelConfig
from structlm.linear import build_linear
from structlm.linear.kernels import _needs_composable_ops
from structlm.loss import cross_entropy

# --- positions ------------------------------------------------------------------------------------


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


def at_least_fp32(x: Tensor) -> Tensor:
    """x in fp32 if it is narrower (bf16, fp16), else unchanged (fp32, fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _rotate_halves(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x rotated by the angles, halves layout: [x1 c - x2 s | x2 c + x1 s] with c, s the first half
    of cos, sin (the second repeats it); the products and sums in at least fp32, one rounding to
    x's dtype at the end. Three passes over each half (the composable form takes seven over the
    whole: upcast, negate, concatenate, two products, sum, cast)."""
    h = x.shape[-1] // 2
    c, s = cos[..., :h], sin[..., :h]
    x1, x2 = x[..., :h], x[..., h:]
    out = torch.empty_like(x)
    y1 = (x1 * c).addcmul_(x2, s, value=-1.0)  # fp32 (c is fp32), (..., hs/2)
    out[..., :h].copy_(y1)
    y2 = (x2 * c).addcmul_(x1, s)
    out[..., h:].copy_(y2)
    return out


class _RopeFn(torch.autograd.Function):
    """RoPE with its backward as the inverse rotation (angle -θ): nothing but cos and sin is saved,
    and the backward is as cheap as the forward. Differentiable ops inside, so double backward
    works."""

    @staticmethod
    def forward(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return _rotate_halves(x, cos, sin)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        ctx.save_for_backward(inputs[1], inputs[2])

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate_halves(dy, cos, -sin), None, None


ROPE_ENV = "STRUCTLM_ROPE"  # native (csrc/rope.c, CPU fp32/bf16) or aten


def _qkv_kernel(direction: str, dtype: torch.dtype):
    """csrc/rope.c's split-and-rotate ("fwd") or its inverse ("bwd") for fp32/bf16, or None."""
    return native.kernel("rope", f"qkv_rope_{direction}_{native.SUFFIX[dtype]}", ROPE_ENV)


def _qkv_fused(h: Tensor, cos: Tensor, sin: Tensor):
    """The forward kernel for the QKV output h (B, T, width) with fp32 angles (T, hs) without
    gradients, or None: CPU, fp32/bf16, contiguous, not under torch.func or torch.compile (which
    trace the torch ops instead)."""
    angles_ok = (cos.dim() == 2 and cos.shape == sin.shape and cos.shape[0] == h.shape[1]
                 and cos.dtype == sin.dtype == torch.float32
                 and not (cos.requires_grad or sin.requires_grad))
    if (h.device.type != "cpu" or h.dtype not in native.SUFFIX or not h.is_contiguous()
            or not angles_ok or _needs_composable_ops(h) or torch.compiler.is_compiling()):
        return None
    return _qkv_kernel("fwd", h.dtype)


class _QkvRopeFn(torch.autograd.Function):
    """h (B, T, (nq + 2 nkv) hs) -> q (B, nq, T, hs), k, v (B, nkv, T, hs), contiguous, q and k
    rotated: the split, the head transpose and RoPE in one pass each way (csrc/rope.c)."""

    @staticmethod
    def forward(ctx, h: Tensor, cos: Tensor, sin: Tensor, nq: int, nkv: int, kernel):
        B, T, _ = h.shape  # kernel: _qkv_fused(h, cos, sin)
        hs = cos.shape[-1]
        q, k, v = h.new_empty(B, nq, T, hs), h.new_empty(B, nkv, T, hs), h.new_empty(B, nkv, T, hs)
        cos, sin = cos.contiguous(), sin.contiguous()
        native.call(kernel, [h, q, k, v, cos, sin], B, T, nq, nkv, hs)
        ctx.save_for_backward(cos, sin)
        return q, k, v

    @staticmethod
    def backward(ctx, dq: Tensor, dk: Tensor, dv: Tensor):
        cos, sin = ctx.saved_tensors
        B, nq, T, hs = dq.shape  # unused outputs' gradients come as zeros (materialize_grads)
        compiled = torch.compiler.is_compiling()  # compiled autograd traces the torch ops
        kernel = None if torch.is_grad_enabled() or compiled else _qkv_kernel("bwd", dq.dtype)
        if kernel is None:  # also backward(create_graph=True): differentiable ops
            parts = [_rotate_halves(dq, cos, -sin), _rotate_halves(dk, cos, -sin), dv]
            return (torch.cat([t.transpose(1, 2).flatten(2) for t in parts], dim=-1),
                    None, None, None, None, None)
        dq, dk, dv = dq.contiguous(), dk.contiguous(), dv.contiguous()
        dh = dq.new_empty(B, T, (nq + 2 * dk.shape[1]) * hs)
        native.call(kernel, [dh, dq, dk, dv, cos, sin], B, T, nq, dk.shape[1], hs)
        return dh, None, None, None, None, None


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """Rotate x: (B, nh, T, hs) by the angles (T, hs); computed in at least fp32, returned in x's
    dtype. The halves layout takes the fast path (`_RopeFn`) unless torch.func transforms or
    forward AD are active (or the angles need gradients)."""
    if not interleaved and not cos.requires_grad and not sin.requires_grad \
            and not _needs_composable_ops(x):
        return _RopeFn.apply(x, cos, sin)
    xf = at_least_fp32(x)
    if interleaved:
        pairs = xf.unflatten(-1, (-1, 2))  # (B, nh, T, hs/2, 2)
        rot = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        rot = torch.cat([-x2, x1], dim=-1)  # rotate_half
    return (xf * cos + rot * sin).to(x.dtype)


# --- KV cache -------------------------------------------------------------------------------------


class KVCache:
    """Per-layer key/value buffers (B, n_kv_head, max_len, head_dim), allocated on first write.

    Keys are stored already rotated (RoPE of absolute positions), which equals rotating cached raw
    keys.
    `length` counts the positions written; `GPT.forward` advances it after each call.
    """

    def __init__(self, n_layer: int, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.k: list[Tensor | None] = [None] * n_layer
        self.v: list[Tensor | None] = [None] * n_layer

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v: (B, n_kv, T, hs) at [length, length+T); return keys/values 0..length+T-1."""
        B, nkv, T, hs = k.shape
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(B, nkv, self.max_len, hs)
            self.v[layer] = v.new_zeros(B, nkv, self.max_len, hs)
        kc, vc = self.k[layer], self.v[layer]
        kc[:, :, self.length : end] = k
        vc[:, :, self.length : end] = v
        return kc[:, :, :end], vc[:, :, :end]


class SlotCache:
    """The KV cache of continuous batching: `slots` independent sequences, each with its own
    length, in per-layer buffers (slots, n_kv_head, max_len, head_dim). A forward works on the
    slots `select`ed for it (its batch rows, in order): row b's T new tokens take positions
    lengths[slot_b] .. +T-1 and attend to that slot's keys up to their own position, so a sequence
    computes the same whichever others share the batch, and no row waits for the longest."""

    def __init__(self, n_layer: int, slots: int, max_len: int) -> None:
        self.max_len, self.slots = max_len, slots
        self.lengths = torch.zeros(slots, dtype=torch.long)
        self.rows = torch.zeros(0, dtype=torch.long)
        self.k: list[Tensor | None] = [None] * n_layer
        self.v: list[Tensor | None] = [None] * n_layer

    def select(self, slots: list[int]) -> None:
        """The slots the next forward's batch rows are (row b = slots[b])."""
        self.rows = torch.tensor(slots, dtype=torch.long)

    def positions(self, T: int, device) -> Tensor:
        """(B, T) absolute positions of the next forward's tokens."""
        return (self.lengths[self.rows][:, None] + torch.arange(T)).to(device)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Write k, v: (B, n_kv, T, hs) at each row's positions; return the rows' keys and values
        (B, n_kv, L, hs), L the longest row's length, and the mask (B, 1, T, L) of the keys each
        query may see."""
        B, nkv, T, hs = k.shape
        pos = self.positions(T, k.device)  # (B, T)
        if int(pos.max()) >= self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {int(pos.max()) + 1} "
                             "requested")
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(self.slots, nkv, self.max_len, hs)
            self.v[layer] = v.new_zeros(self.slots, nkv, self.max_len, hs)
        rows = self.rows.to(k.device)
        self.k[layer][rows[:, None], :, pos] = k.transpose(1, 2)  # (B, T, nkv, hs) at (row, pos)
        self.v[layer][rows[:, None], :, pos] = v.transpose(1, 2)
        L = int(pos.max()) + 1
        mask = torch.arange(L, device=k.device)[None, None, :] <= pos[:, :, None]  # (B, T, L)
        return self.k[layer][rows, :, :L], self.v[layer][rows, :, :L], mask[:, None]

    def advance(self, T: int) -> None:
        self.lengths[self.rows] += T


# --- layers ---------------------------------------------------------------------------------------


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
        if rope is not None and cache is None and not cfg.rope_interleaved:
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
        spec = cfg.ffn_spec(layer)
        (_, d_in1, d_out1), (_, d_in2, d_out2) = cfg.ffn_shapes()
        self.fc1 = build_linear(spec, d_in1, d_out1, bias=cfg.bias, init_std=cfg.init_std)
        self.fc2 = build_linear(spec, d_in2, d_out2, bias=cfg.bias, init_std=cfg.init_std)

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


# --- the model ------------------------------------------------------------------------------------


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


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse sampling settings that would silently do something else (ValueError, fix named)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature} must be a number >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or unset to keep every token)")
    if top_p is not None and not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p} must be in (0, 1] (or unset)")


def sample(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token per row of logits (B, vocab): greedy at temperature 0, else top-k then
    top-p."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # keep the smallest prefix reaching top_p
        drop = cum - sorted_logits.softmax(dim=-1) > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
