"""GPT invariants on tiny configs: shapes, causality, init loss, KV-cache decoding, sampling,
structure and bf16."""

import math

import pytest
import torch
from helpers import tiny_model

from structlm.linear import LINEARS
from structlm.linear.dense import DenseLinear
from structlm.model.cache import KVCache
from structlm.model.gpt import GPT, rope_angles
from structlm.model.sampling import sample, sample_rows
from structlm.ops.rope import apply_rope

KINDS = sorted(LINEARS)
VOCAB = 97

# attention / embedding / MLP variants; each is combined with every FFN kind
OPTIONS = {
    "mha-rope": {},
    "gqa": {"n_kv_head": 2},
    "mqa": {"n_kv_head": 1},
    "absolute": {"pos_emb": "absolute"},
    "rope-interleaved": {"rope_interleaved": True},
    "rope-scaled": {"rope_scale": 2.0, "rope_base": 500.0},
    "attn-dim": {"attn_dim": 48},  # head_dim 12 != d_model / n_head
    "gqa-attn-dim": {"n_kv_head": 2, "attn_dim": 64, "d_model": 48, "d_ff": 192},
    "swiglu-rmsnorm-nobias-untied": {
        "act": "swiglu",
        "norm": "rmsnorm",
        "bias": False,
        "tie_embeddings": False,
    },
}


def tiny_gpt(kind: str = "lowrank", dtype=torch.float64, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_model(kind, **kw)).to(dtype).eval()


def tokens(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


option_params = pytest.mark.parametrize("opts", list(OPTIONS.values()), ids=list(OPTIONS))
kind_params = pytest.mark.parametrize("kind", KINDS)


# --- shapes and structure -------------------------------------------------------------------------


@kind_params
@option_params
def test_output_shapes(kind, opts):
    model = tiny_gpt(kind, torch.float32, **opts)
    idx = tokens(3, 20)
    logits, loss = model(idx)
    assert logits.shape == (3, 20, VOCAB) and loss is None
    logits, loss = model(idx, tokens(3, 20, seed=1))
    assert loss.shape == () and torch.isfinite(loss)
    assert model.hidden(idx).shape == (3, 20, model.cfg.d_model)


@kind_params
@pytest.mark.parametrize("dense_layers", [(0,), (1, 2), (), (0, 1, 2)])
def test_dense_ffn_layers_structure(kind, dense_layers):
    """Blocks in dense_ffn_layers get DenseLinear FFNs, every other block the configured kind."""
    model = GPT(tiny_model(kind, n_layer=3, dense_ffn_layers=dense_layers))
    for i, block in enumerate(model.blocks):
        want = DenseLinear if i in dense_layers else LINEARS[kind]
        assert type(block.mlp.fc1) is want and type(block.mlp.fc2) is want
        assert (block.mlp.fc1.d_in, block.mlp.fc1.d_out) == (32, 128)
        assert (block.mlp.fc2.d_in, block.mlp.fc2.d_out) == (128, 32)


def test_swiglu_fc1_is_twice_as_wide():
    model = GPT(tiny_model("lowrank", act="swiglu"))
    assert model.blocks[1].mlp.fc1.d_out == 256 and model.blocks[1].mlp.fc2.d_in == 128


def test_attention_projection_shapes():
    model = GPT(tiny_model(n_head=4, n_kv_head=2, attn_dim=64, d_model=48, d_ff=192))
    attn = model.blocks[0].attn
    # rows [Q: 4 heads | K: 2 | V: 2] x head_dim 16
    assert attn.qkv.weight.shape == ((4 + 2 * 2) * 16, 48)
    assert attn.o_proj.weight.shape == (48, 64)


@pytest.mark.parametrize("tie", [True, False])
def test_dense_init(tie):
    """docs/method.md §3.5: linears and embeddings N(0, 0.02^2), biases 0, norms 1 / 0; tied
    lm_head."""
    model = GPT(tiny_model(tie_embeddings=tie, vocab_size=4096))
    assert (model.lm_head.weight is model.wte.weight) == tie
    # 131k samples: 5% relative is > 10 sigma of the sample std
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    if not tie:
        assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for block in model.blocks:
        assert not block.attn.qkv.bias.any() and not block.attn.o_proj.bias.any()
        assert not block.mlp.fc1.bias.any() and not block.mlp.fc2.bias.any()
        assert (block.ln_1.weight == 1).all() and not block.ln_1.bias.any()


@kind_params
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_gpt_builds_and_runs_on_the_meta_device(kind, norm):
    """GPT names no device: built under a default device, every tensor (cache too) follows it."""
    with torch.device("meta"):
        model = GPT(tiny_model(kind, norm=norm))
    assert all(p.device.type == "meta" for p in model.parameters())
    idx = torch.zeros(2, 8, dtype=torch.long, device="meta")
    cache = model.make_cache()
    model(idx[:, :5], kv_cache=cache)
    logits, _ = model(idx[:, 5:], kv_cache=cache)
    assert logits.device.type == "meta" and logits.shape == (2, 3, VOCAB)


# --- causality and the loss at init ---------------------------------------------------------------


@kind_params
@option_params
def test_causality(kind, opts):
    """Changing tokens after position t leaves the logits at positions <= t unchanged."""
    model = tiny_gpt(kind, **opts)
    idx = tokens(2, 24)
    logits, _ = model(idx)
    for t in (0, 7, 22):
        changed = idx.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % VOCAB
        logits2, _ = model(changed)
        # float64; earlier rows go through identical arithmetic, masked keys add exact zeros
        torch.testing.assert_close(logits2[:, : t + 1], logits[:, : t + 1])
        assert not torch.allclose(logits2[:, t + 1 :], logits[:, t + 1 :])


@kind_params
@pytest.mark.parametrize(
    "opts", [{}, OPTIONS["swiglu-rmsnorm-nobias-untied"], {"pos_emb": "absolute"}]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_at_init_is_log_vocab(kind, opts, seed):
    """With N(0, 0.02^2) embeddings the initial logits are nearly flat, so the loss on random
    targets is about ln(vocab) (measured within +-0.04 at vocab 97)."""
    model = tiny_gpt(kind, torch.float32, seed=seed, **opts)
    idx = tokens(8, 32, seed=seed)
    _, loss = model(idx[:, :-1], idx[:, 1:])
    assert abs(loss.item() - math.log(VOCAB)) < 0.15


def test_loss_is_mean_next_token_cross_entropy():
    model = tiny_gpt()
    idx, tgt = tokens(2, 10), tokens(2, 10, seed=1)
    logits, loss = model(idx, tgt)
    manual = -logits.log_softmax(-1).gather(-1, tgt[..., None]).mean()
    torch.testing.assert_close(loss, manual)


# --- KV cache -------------------------------------------------------------------------------------


@kind_params
@option_params
def test_kv_cache_decoding_equals_full_forward(kind, opts):
    """Prefill, then single tokens and multi-token chunks on a warm cache: the logits equal one full
    forward."""
    model = tiny_gpt(kind, **opts)
    idx = tokens(2, 30)
    full, _ = model(idx)
    cache = model.make_cache()
    pieces, pos = [], 0
    for n in (9, 1, 1, 1, 6, 1, 4, 1, 6):  # prefill 9; singles; chunks of 6, 4 and 6
        logits, _ = model(idx[:, pos : pos + n], kv_cache=cache)
        pieces.append(logits)
        pos += n
        assert cache.length == pos
    assert pos == 30
    # float64 end to end (only the RoPE angles are fp32, identical on both paths): 1e-9 leaves
    # slack for the different attention kernels (masked, unmasked, causal)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-9, atol=1e-9)


def test_kv_cache_fp32_matches_full_forward():
    model = tiny_gpt("blockshuffle", torch.float32, n_kv_head=2)
    idx = tokens(2, 20)
    full, _ = model(idx)
    cache = model.make_cache()
    got = [model(idx[:, :12], kv_cache=cache)[0]] + [
        model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(12, 20)
    ]
    # fp32: different attention kernels reorder sums over <= 20 keys; logits are O(0.1): 1e-5 is
    # ~100 ulp
    torch.testing.assert_close(torch.cat(got, dim=1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_overflow_raises():
    model = tiny_gpt()
    cache = model.make_cache(max_len=8)
    model(tokens(1, 6), kv_cache=cache)
    with pytest.raises(ValueError, match="KV cache holds 8 positions; 9 requested"):
        model(tokens(1, 3), kv_cache=cache)


def test_absolute_positions_beyond_block_size_raise():
    model = tiny_gpt(pos_emb="absolute")
    with pytest.raises(ValueError, match="exceeds block_size=32"):
        model(tokens(1, 33))


def test_kv_cache_is_a_plain_buffer():
    cache = KVCache(n_layer=2, max_len=16)
    k = torch.randn(1, 2, 3, 4)
    kc, vc = cache.update(0, k, -k)
    assert kc.shape == (1, 2, 3, 4) and cache.k[0].shape == (1, 2, 16, 4)
    torch.testing.assert_close(vc, -k, rtol=0, atol=0)


# --- generation and sampling ----------------------------------------------------------------------


@kind_params
@pytest.mark.parametrize(
    "opts",
    [{}, {"pos_emb": "absolute"}, {"n_kv_head": 1, "rope_interleaved": True}],
    ids=["rope", "absolute", "mqa-interleaved"],
)
def test_greedy_generate_with_cache_equals_without(kind, opts):
    model = tiny_gpt(kind, **opts)
    prompt = tokens(2, 5)
    with_cache = model.generate(prompt, 25, temperature=0.0)
    without = model.generate(prompt, 25, temperature=0.0, use_cache=False)
    assert with_cache.shape == (2, 30)
    assert torch.equal(with_cache[:, :5], prompt)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("opts", [{}, {"pos_emb": "absolute"}], ids=["rope", "absolute"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_past_block_size(opts, use_cache):
    """Generating past block_size slides the context (re-prefilling the cache), never fails."""
    model = tiny_gpt(**opts)
    out = model.generate(tokens(1, 30), 10, temperature=0.0, use_cache=use_cache)
    assert out.shape == (1, 40) and int(out.max()) < VOCAB


def test_generate_is_deterministic_under_a_generator():
    model = tiny_gpt(dtype=torch.float32)
    prompt = tokens(3, 4)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return model.generate(prompt, 12, temperature=1.0, top_k=20, top_p=0.9, generator=g)

    torch.manual_seed(1)  # the global RNG must not matter
    a = run(42)
    torch.manual_seed(2)
    b = run(42)
    assert torch.equal(a, b)
    assert not torch.equal(a, run(43))


def test_sample_greedy_is_argmax():
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, temperature=0.0), logits.argmax(-1, keepdim=True))


def test_sample_rows_draws_each_row_as_it_would_alone():
    """Greedy rows take the argmax; a sampled row's token depends on its logits, settings and its
    own generator only, not on the rows beside it."""
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    temps = torch.tensor([0.0, 0.7, 1.0, 1.3, 0.0, 0.9])
    top_p = torch.tensor([1.0, 0.9, 1.0, 0.5, 0.3, 1.0])
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    alone_gens = [torch.Generator().manual_seed(i) for i in range(6)]
    for _ in range(20):
        together = sample_rows(logits, temps, top_p, gens)
        alone = torch.cat([sample_rows(logits[i:i + 1], temps[i:i + 1], top_p[i:i + 1],
                                       [alone_gens[i]]) for i in (5, 4, 3, 2, 1, 0)])
        assert torch.equal(together, alone.flip(0))
        assert together[0] == logits[0].argmax() and together[4] == logits[4].argmax()


@pytest.mark.parametrize("top_p", [1.0, 0.85])
def test_sample_rows_follows_the_distribution(top_p):
    """20,000 draws: each token's frequency is its (nucleus-renormalised) probability."""
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    perm = torch.tensor([3, 0, 4, 1, 2])  # shuffled, so the sort matters
    logits = torch.empty(5).scatter_(0, perm, (probs.log() * 2.0)).expand(20000, 5)
    n = logits.shape[0]
    got = sample_rows(logits, torch.full((n,), 2.0), torch.full((n,), top_p),
                      [None] * n)  # the global generator
    torch.manual_seed(0)
    want = probs.clone() if top_p == 1.0 else torch.tensor([0.5, 0.3, 0.1, 0.0, 0.0])
    want = want / want.sum()
    freq = torch.bincount(got, minlength=5).float() / n
    torch.testing.assert_close(freq[perm], want, atol=0.015, rtol=0)


@pytest.mark.parametrize("top_k", [1, 3, 10])
def test_sample_respects_top_k(top_k):
    g = torch.Generator().manual_seed(0)
    row = torch.randn(VOCAB, generator=g)
    logits = row.expand(4000, VOCAB)
    drawn = set(sample(logits, temperature=1.5, top_k=top_k, generator=g).flatten().tolist())
    allowed = set(row.topk(top_k).indices.tolist())
    # never outside the top k, and with 4000 draws every one of them appears
    assert drawn == allowed


@pytest.mark.parametrize(
    "top_p, allowed", [(0.4, {0}), (0.7, {0, 1}), (0.85, {0, 1, 2}), (0.99, {0, 1, 2, 3, 4})]
)
def test_sample_respects_top_p(top_p, allowed):
    """Nucleus sampling keeps the smallest prefix of the sorted distribution with mass >= top_p."""
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    perm = torch.tensor([3, 0, 4, 1, 2])  # shuffle the vocabulary so sorting matters
    logits = torch.empty(5).scatter_(0, perm, probs.log()).expand(4000, 5)
    g = torch.Generator().manual_seed(0)
    drawn = set(sample(logits, top_p=top_p, generator=g).flatten().tolist())
    assert drawn == {perm[i].item() for i in allowed}


def test_sample_top_k_and_top_p_combined():
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    logits = probs.log().expand(4000, 5)
    drawn = set(
        sample(logits, top_k=2, top_p=0.99, generator=torch.Generator().manual_seed(0))
        .flatten()
        .tolist()
    )
    assert drawn == {0, 1}


# --- attention details ----------------------------------------------------------------------------


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_scores_depend_on_relative_position_only(interleaved):
    """<R_m q, R_n k> depends on m - n only: shifting both positions by 5 keeps the scores."""
    cfg = tiny_model(rope_interleaved=interleaved)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 6, cfg.head_dim, generator=g)
    k = torch.randn(1, 1, 6, cfg.head_dim, generator=g)

    def scores(start):
        cos, sin = rope_angles(cfg, start, 6, "cpu")
        return apply_rope(q, cos, sin, interleaved) @ apply_rope(
            k, cos, sin, interleaved
        ).transpose(-1, -2)

    # fp32 trigonometry at positions < 12 with O(1) inputs: ~1e-6 absolute error
    torch.testing.assert_close(scores(5), scores(0), rtol=1e-5, atol=1e-5)
    cos, sin = rope_angles(cfg, 0, 1, "cpu")
    at_zero = apply_rope(q[:, :, :1], cos, sin, interleaved)
    torch.testing.assert_close(at_zero, q[:, :, :1])  # position 0: the identity


def test_rope_interleaved_is_half_layout_under_a_permutation():
    """Interleaved rotates pairs (2i, 2i+1), the half layout (i, i + hd/2): the same map on permuted
    dimensions."""
    cfg_half, cfg_inter = tiny_model(), tiny_model(rope_interleaved=True)
    hd = cfg_half.head_dim
    perm = torch.arange(hd).view(2, hd // 2).T.reshape(-1)  # interleaved position -> half position
    x = torch.randn(2, 3, 7, hd)
    inter = apply_rope(x, *rope_angles(cfg_inter, 3, 7, "cpu"), True)
    x_half = torch.empty_like(x)
    x_half[..., perm] = x
    half = apply_rope(x_half, *rope_angles(cfg_half, 3, 7, "cpu"), False)
    torch.testing.assert_close(half[..., perm], inter)  # same fp32 operations, reordered


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [{}, {"n_kv_head": 2}, {"n_kv_head": 1, "attn_dim": 48}])
def test_fused_qkv_rope_matches_the_torch_ops(dtype, options, monkeypatch):
    """csrc/rope.c's split + head transpose + RoPE (and its inverse in the backward) against the
    split, transposes and `apply_rope` of torch ops: same loss and gradients (the same fp32
    arithmetic, rounded once)."""
    import structlm.ops.rope as M

    torch.manual_seed(0)
    model = tiny_gpt("dense", dtype=dtype, **options)
    idx = torch.randint(0, VOCAB, (3, 13))
    if M._qkv_kernel("fwd", dtype) is None:
        pytest.skip("no C compiler: the kernel is not built")
    out = []
    for choice in ("native", "aten"):
        monkeypatch.setenv(M.ROPE_ENV, choice)
        model.zero_grad()
        _, loss = model(idx, idx)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    # bf16: assert_close's bf16 tolerance (equal on the machine this was written on; a compiler
    # that contracts differently may round a product once more); fp32: a few ulps
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(out[0][0], out[1][0], **tol)
    for a, b in zip(out[0][1], out[1][1], strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_fused_qkv_rope_backward_without_the_kernel(monkeypatch):
    """A forward through the kernel whose backward finds it switched off (or traced by compiled
    autograd) falls back to the torch ops: the same gradient."""
    import structlm.ops.rope as M

    h = torch.randn(2, 5, 3 * 8, requires_grad=True)
    cos, sin = rope_angles(tiny_model(n_head=2, d_model=8), 0, 5, "cpu")
    if (fused := M._qkv_fused(h, cos, sin)) is None:
        pytest.skip("no C compiler: the kernel is not built")
    w = [torch.randn(2, 2, 5, 4) for _ in range(3)]
    grads = []
    for backward_env in ("native", "aten"):
        monkeypatch.setenv(M.ROPE_ENV, "native")
        outs = M._QkvRopeFn.apply(h, cos, sin, 2, 2, fused)
        loss = sum((o * wi).sum() for o, wi in zip(outs, w, strict=True))
        monkeypatch.setenv(M.ROPE_ENV, backward_env)
        grads.append(torch.autograd.grad(loss, h)[0])
    torch.testing.assert_close(*grads, rtol=1e-6, atol=1e-6)


def test_fused_qkv_rope_double_backward():
    """backward(create_graph=True) through the fused split-and-rotate: differentiable ops, the
    same second derivatives as the composed path (fp64 takes the torch ops, so compare fp32)."""
    import structlm.ops.rope as M

    h = torch.randn(2, 5, 3 * 8, requires_grad=True)
    cos, sin = rope_angles(tiny_model(n_head=2, d_model=8), 0, 5, "cpu")
    if (fused := M._qkv_fused(h, cos, sin)) is None:
        pytest.skip("no C compiler: the kernel is not built")
    def composed(h):
        q, k, v = (t.view(2, 5, 2, 4).transpose(1, 2) for t in h.split(8, dim=-1))
        return apply_rope(q, cos, sin, False), apply_rope(k, cos, sin, False), v
    w = [torch.randn(2, 2, 5, 4) for _ in range(3)]
    hvps = []
    for fn in (lambda h: M._QkvRopeFn.apply(h, cos, sin, 2, 2, fused), composed):
        loss = sum((o * o * wi).sum() for o, wi in zip(fn(h), w, strict=True))
        (g,) = torch.autograd.grad(loss, h, create_graph=True)
        hvps.append(torch.autograd.grad(g.square().sum(), h)[0])
    torch.testing.assert_close(*hvps, rtol=1e-5, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    """Query head h of a GQA model reads KV head h // (n_head / n_kv_head): copying those K/V rows
    into an MHA model gives the same logits."""
    gqa = tiny_gpt("lowrank", n_kv_head=2)
    mha = tiny_gpt("lowrank")
    state = gqa.state_dict()
    hd, nq, nkv = 8, 4, 2
    for i in range(2):
        for name in ("weight", "bias"):
            w = state[f"blocks.{i}.attn.qkv.{name}"]
            q, k, v = w.split([nq * hd, nkv * hd, nkv * hd])
            rep = [h // (nq // nkv) for h in range(nq)]
            k = torch.cat([k[r * hd : (r + 1) * hd] for r in rep])
            v = torch.cat([v[r * hd : (r + 1) * hd] for r in rep])
            state[f"blocks.{i}.attn.qkv.{name}"] = torch.cat([q, k, v])
    mha.load_state_dict(state)
    idx = tokens(2, 16)
    # float64, the same math up to summation order: default float64 tolerances
    torch.testing.assert_close(mha(idx)[0], gqa(idx)[0])


def test_dropout_only_in_train_mode():
    model = tiny_gpt(dtype=torch.float32, dropout=0.5)
    idx = tokens(2, 10)
    torch.testing.assert_close(model(idx)[0], model(idx)[0], rtol=0, atol=0)  # eval: deterministic
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])


# --- low precision --------------------------------------------------------------------------------


@kind_params
@pytest.mark.parametrize(
    "opts", [{}, OPTIONS["swiglu-rmsnorm-nobias-untied"], OPTIONS["gqa-attn-dim"]]
)
def test_bf16_autocast_forward(kind, opts):
    """Under CPU bf16 autocast the logits are bf16 and close to fp32; loss and backward work."""
    model = tiny_gpt(kind, torch.float32, **opts)
    idx, tgt = tokens(2, 32), tokens(2, 32, seed=1)
    ref, ref_loss = model(idx, tgt)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, tgt)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    # bf16 unit roundoff 2^-9 ~ 0.2%, compounded over ~10 matmuls in 2 blocks: measured <= 0.8% in
    # norm
    assert ((logits.float() - ref).norm() / ref.norm()).item() < 3e-2
    # the loss is ~4.6 and insensitive to sub-percent logit errors of O(0.1) logits
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-2)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mlp_gelu_in_half_precision_equals_the_fp32_computation(dtype):
    """PyTorch's bf16/fp16 GELU computes in fp32 and rounds once, so forward and backward are
    bit-identical to upcasting (the paper's fp32 GELU) and rounding; the MLP's gelu_tanh does the
    same in its own kernel (test_activation.py) and falls back to PyTorch's for fp16."""
    import torch.nn.functional as F

    from structlm.model.gpt import MLP
    from structlm.ops.gelu import gelu_tanh

    mlp = MLP(tiny_model("dense"), layer=0)
    h = (torch.randn(64, 128) * 3).to(dtype).requires_grad_()
    fast = F.gelu(h, approximate="tanh")
    ref = F.gelu(h.float(), approximate="tanh").to(dtype)
    assert torch.equal(fast, ref)
    g = torch.randn_like(fast)
    assert torch.equal(*(torch.autograd.grad(y, h, g)[0] for y in (fast, ref)))
    # and the module takes that path: its output under autocast equals fc2(ref GELU(fc1(x)))
    x = torch.randn(3, 5, 32)
    with torch.autocast("cpu", dtype):
        out = mlp(x)
        want = mlp.fc2(gelu_tanh(mlp.fc1(x).float()).to(dtype))
    assert torch.equal(out, want)
