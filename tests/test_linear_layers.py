"""The StructuredLinear layers: dense equivalence, counting, structure, init, validation, registry
and budgets."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from linear_cases import layer_shapes, small_hparams

from structlm.config import LinearSpec
from structlm.linear import (
    LINEARS,
    StructuredLinear,
    build_linear,
    check_spec,
    choose_hparams,
    register,
    unregister,
)
from structlm.linear.blockdense import BlockDenseLinear
from structlm.linear.blockshuffle import BlockShuffleLinear
from structlm.linear.lowrank import LowRankLinear

KINDS = sorted(LINEARS)
PAPER_INIT = {"dense": "fixed", "lowrank": "svd", "blockdense": "ortho", "blockshuffle": "ortho"}


def _randomise_bias(layer: StructuredLinear, g: torch.Generator) -> None:
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g, dtype=layer.bias.dtype))


# --- the layer is the dense map it claims to be ---------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data(), bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_forward_equals_dense_matrix(kind, data, bias, seed):
    """layer(x) == x @ layer.to_dense().T + layer.bias, in float64."""
    d_in, d_out, hp = data.draw(layer_shapes(kind))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = LINEARS[kind](d_in, d_out, **hp, bias=bias, dtype=torch.float64)
    _randomise_bias(layer, g)
    x = torch.randn(3, 2, d_in, dtype=torch.float64, generator=g)
    w = layer.to_dense()
    assert w.shape == (d_out, d_in)
    expected = x @ w.T + (layer.bias if bias else 0)
    # float64 and at most two products of O(1) numbers: default float64 tolerances (rtol 1e-7)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d_in, d_out", [(16, 64), (64, 16)])  # fc1-like (expanding) and fc2-like
def test_to_dense_equals_identity_probe(kind, d_in, d_out):
    """Each kind's to_dense (some override it) equals the generic definition matmul(I).T."""
    layer = LINEARS[kind](d_in, d_out, **small_hparams(kind, d_in, d_out), dtype=torch.float64)
    eye = torch.eye(d_in, dtype=torch.float64)
    torch.testing.assert_close(layer.to_dense(), layer.matmul(eye).T)


# --- counting -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data(), bias=st.booleans())
def test_count_params_equals_numel(kind, data, bias):
    d_in, d_out, hp = data.draw(layer_shapes(kind))
    layer = LINEARS[kind](d_in, d_out, **hp, bias=bias)
    n = sum(p.numel() for p in layer.parameters())
    assert LINEARS[kind].count_params(d_in, d_out, bias=bias, **hp) == n
    assert layer.flops_per_token() == 2 * LINEARS[kind].count_params(d_in, d_out, bias=False, **hp)


@pytest.mark.parametrize(
    "kind, hp, formula",
    [  # docs/method.md §1.5 (paper Fig. 2): params = MACs per token
        ("dense", {}, lambda n, m: n * m),
        ("lowrank", {"rank": 8}, lambda n, m: (n + m) * 8),
        ("blockshuffle", {"nblocks": 4}, lambda n, m: min(n, m) * (n + m) // 4),
        ("blockdense", {"rank": 8, "nblocks": 4}, lambda n, m: 8 * (m + n // 4)),
    ],
)
@pytest.mark.parametrize("n, m", [(16, 64), (64, 16), (32, 32)])
def test_weight_params_match_paper_formula(kind, hp, formula, n, m):
    assert LINEARS[kind].count_params(n, m, bias=False, **hp) == formula(n, m)


# --- structure ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lowrank", "blockdense"])
@given(data=st.data(), init=st.sampled_from(["default", "fixed", "xavier"]))
def test_to_dense_rank_at_most_rank(kind, data, init):
    """A bottleneck of size R: the dense matrix has rank <= R."""
    d_in, d_out, hp = data.draw(layer_shapes(kind))
    layer = LINEARS[kind](d_in, d_out, **hp, init=init, dtype=torch.float64)
    assert torch.linalg.matrix_rank(layer.to_dense()).item() <= hp["rank"]


def _perm_matrix(n: int, src_of) -> torch.Tensor:
    """P with (P v)[dst] = v[src_of(dst)]."""
    p = torch.zeros(n, n, dtype=torch.float64)
    for dst in range(n):
        p[dst, src_of(dst)] = 1.0
    return p


def _block_diag_by_loops(blocks: torch.Tensor) -> torch.Tensor:
    nb, r, c = blocks.shape
    out = torch.zeros(nb * r, nb * c, dtype=blocks.dtype)
    for k in range(nb):
        for i in range(r):
            for j in range(c):
                out[k * r + i, k * c + j] = blocks[k, i, j]
    return out


@given(data=st.data())
def test_blockshuffle_to_dense_equals_permutation_formula(data):
    """docs/method.md §1.4: W = P_out · blockdiag(blkdiag2) · P_mid · blockdiag(blkdiag1), with
    permutations from the index formulas (P_mid h)[j·q + i] = h[i·B + j] and
    y[i·B + j] = u[j·s + i]."""
    d_in, d_out, hp = data.draw(layer_shapes("blockshuffle"))
    layer = BlockShuffleLinear(d_in, d_out, **hp, init="fixed", dtype=torch.float64)
    B = hp["nblocks"]
    q, s = layer.blkdiag1.shape[1], layer.blkdiag2.shape[1]
    assert (q, s) == (min(d_in, d_out) // B, d_out // B)  # square block on the smaller side
    p_mid = _perm_matrix(B * q, lambda dst: (dst % q) * B + dst // q)  # dst = j*q + i <- i*B + j
    p_out = _perm_matrix(B * s, lambda dst: (dst % B) * s + dst // B)  # dst = i*B + j <- j*s + i
    w = (
        p_out
        @ _block_diag_by_loops(layer.blkdiag2.detach())
        @ p_mid
        @ _block_diag_by_loops(layer.blkdiag1.detach())
    )
    torch.testing.assert_close(layer.to_dense(), w)  # float64, exact up to summation order


def test_blockshuffle_mixes_every_input_block_into_every_output_block():
    """With B | q every output channel depends on every input block (the shuffle mixes globally)."""
    layer = BlockShuffleLinear(16, 64, nblocks=2, init="fixed", dtype=torch.float64)
    w = layer.to_dense()  # (64, 16); input blocks are contiguous chunks of 8 columns
    for blk in range(2):
        assert (w[:, blk * 8 : (blk + 1) * 8].abs().sum(dim=1) > 0).all()


@given(data=st.data())
def test_blockdense_to_dense_equals_up_times_blockdiag(data):
    """docs/method.md §1.3: W = up · blockdiag(blkdiag), contiguous input chunks, no shuffle."""
    d_in, d_out, hp = data.draw(layer_shapes("blockdense"))
    layer = BlockDenseLinear(d_in, d_out, **hp, init="fixed", dtype=torch.float64)
    assert layer.blkdiag.shape == (
        hp["nblocks"],
        hp["rank"] // hp["nblocks"],
        d_in // hp["nblocks"],
    )
    w = layer.up.detach() @ _block_diag_by_loops(layer.blkdiag.detach())
    torch.testing.assert_close(layer.to_dense(), w)


def test_lowrank_shapes_and_names():
    layer = LowRankLinear(16, 64, rank=4)
    assert layer.down.shape == (4, 16) and layer.up.shape == (64, 4)
    assert [n for n, _ in layer.named_parameters()] == ["bias", "down", "up"]


# --- initialisation -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_init_fixed_std(kind):
    """'fixed': every weight ~ N(0, init_std^2), bias 0."""
    layer = LINEARS[kind](256, 512, **small_hparams(kind, 256, 512), init="fixed", init_std=0.02)
    assert not layer.bias.any()
    for w in layer.weights():
        # >= 32k samples: the sample std is within ~0.4% of 0.02 (1 sigma); 5% is > 10 sigma
        assert w.std().item() == pytest.approx(0.02, rel=0.05)
        assert abs(w.mean().item()) < 0.02 * 0.05


@pytest.mark.parametrize("kind", KINDS)
def test_init_xavier_std(kind):
    """'xavier': every weight ~ N(0, 1/fan_in), fan_in = the tensor's last dimension
    (docs/method.md §1.6)."""
    layer = LINEARS[kind](256, 512, **small_hparams(kind, 256, 512), init="xavier")
    for w in layer.weights():
        # >= 32k samples per tensor: 5% relative is > 10 sigma of the sample std
        assert w.std().item() == pytest.approx(1 / math.sqrt(w.shape[-1]), rel=0.05)


@pytest.mark.parametrize("kind", sorted(PAPER_INIT))  # BTT is not the paper's: ortho by choice
def test_init_default_is_the_papers(kind):
    """init='default' is the paper's per-kind init: fixed (dense), svd (lowrank), ortho (blocks)."""
    hp = small_hparams(kind, 32, 64)
    torch.manual_seed(7)
    a = LINEARS[kind](32, 64, **hp)
    torch.manual_seed(7)
    b = LINEARS[kind](32, 64, **hp, init=PAPER_INIT[kind])
    for wa, wb in zip(a.weights(), b.weights(), strict=True):
        torch.testing.assert_close(wa, wb, rtol=0, atol=0)


@pytest.mark.parametrize("d_in, d_out, rank", [(32, 96, 8), (96, 32, 16), (48, 48, 48)])
def test_lowrank_svd_init_is_best_rank_r_approximation(d_in, d_out, rank):
    """docs/method.md §1.6: down/up are the balanced truncated SVD of a N(0, 0.02^2) draw W0, made
    right after the plain draw of the factors; re-seeding reproduces W0."""
    torch.manual_seed(123)
    layer = LowRankLinear(d_in, d_out, rank=rank, init="svd", init_std=0.02)
    torch.manual_seed(123)  # replay the layer's draws: down, up (overwritten), then W0
    torch.empty(rank, d_in).normal_(0.0, 0.02)
    torch.empty(d_out, rank).normal_(0.0, 0.02)
    w0 = torch.randn(d_out, d_in) * 0.02
    u, s, vh = torch.linalg.svd(w0.double(), full_matrices=False)
    best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    w = layer.to_dense().double()
    # float32 SVD of a matrix with singular values ~0.02*(sqrt(M) +- sqrt(N)) ~ 0.1-0.3: ~1e-6
    # absolute error
    torch.testing.assert_close(torch.linalg.svdvals(w)[:rank], s[:rank], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w, best, rtol=1e-4, atol=1e-6)
    # balanced split: down down^T = up^T up = diag(S_R)
    down, up = layer.down.detach().double(), layer.up.detach().double()
    torch.testing.assert_close(down @ down.T, torch.diag(s[:rank]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(up.T @ up, torch.diag(s[:rank]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "cls, hp",
    [(BlockShuffleLinear, {"nblocks": 4}), (BlockDenseLinear, {"rank": 16, "nblocks": 4})],
)
@pytest.mark.parametrize("d_in, d_out", [(32, 64), (64, 32)])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_ortho_init_singular_values_are_one(cls, hp, d_in, d_out, dtype, atol):
    """'ortho': every block (and BlockDense's dense `up`) is its polar factor U V^T: all singular
    values 1."""
    layer = cls(d_in, d_out, **hp, init="ortho", dtype=dtype)
    for w in layer.weights():
        sv = torch.linalg.svdvals(w.detach().double())  # (..., min(m, n)), blocks and matrices
        # the polar factor is computed and stored in the layer's dtype: a few ulp of fp32 / fp64
        torch.testing.assert_close(sv, torch.ones_like(sv), rtol=0, atol=atol)


@pytest.mark.parametrize("kind", KINDS)
def test_reset_parameters_zeroes_bias(kind):
    layer = LINEARS[kind](32, 64, **small_hparams(kind, 32, 64))
    with torch.no_grad():
        layer.bias.fill_(1.0)
    layer.reset_parameters("fixed")
    assert not layer.bias.any()


# --- validation -----------------------------------------------------------------------------------

INVALID = [  # (kind, d_in, d_out, hp, message)
    ("lowrank", 8, 16, {"rank": 9}, r"rank=9 is larger than min\(d_in, d_out\)=8"),
    ("lowrank", 16, 8, {"rank": 9}, r"rank=9 is larger than min\(d_in, d_out\)=8"),
    ("blockdense", 8, 16, {"rank": 12, "nblocks": 4}, r"rank=12 is larger than min"),
    ("blockdense", 10, 16, {"rank": 4, "nblocks": 4}, r"d_in=10 is not divisible by nblocks=4"),
    ("blockdense", 8, 16, {"rank": 6, "nblocks": 4}, r"rank=6 is not divisible by nblocks=4"),
    ("blockshuffle", 10, 16, {"nblocks": 4}, r"d_in=10 is not divisible by nblocks=4"),
    ("blockshuffle", 8, 18, {"nblocks": 4}, r"d_out=18 is not divisible by nblocks=4"),
    ("blockshuffle", 4, 8, {"nblocks": 8}, r"d_in=4 is not divisible by nblocks=8"),
    ("lowrank", 8, 16, {"rank": 0}, r"rank=0 must be a positive integer"),
    ("lowrank", 8, 16, {"rank": -2}, r"rank=-2 must be a positive integer"),
    ("lowrank", 8, 16, {"rank": 2.5}, r"rank=2.5 must be a positive integer"),
    ("blockshuffle", 8, 16, {"nblocks": 0}, r"nblocks=0 must be a positive integer"),
    ("blockdense", 8, 16, {"rank": 4, "nblocks": -1}, r"nblocks=-1 must be a positive integer"),
    *[(k, 0, 16, small_hparams(k, 8, 16), r"d_in=0 must be a positive integer") for k in KINDS],
    *[(k, 8, -4, small_hparams(k, 8, 16), r"d_out=-4 must be a positive integer") for k in KINDS],
]


def _forbid_allocation(monkeypatch) -> None:
    def no_alloc(*args, **kwargs):
        raise AssertionError("allocated a tensor before validating the hyper-parameters")

    for name in ("empty", "zeros", "randn", "eye"):
        monkeypatch.setattr(torch, name, no_alloc)


@pytest.mark.parametrize("kind, d_in, d_out, hp, match", INVALID)
def test_invalid_hparams_raise_before_allocation(kind, d_in, d_out, hp, match, monkeypatch):
    """The constructor validates before allocating: with tensor factories disabled, ValueError still
    wins."""
    _forbid_allocation(monkeypatch)
    with pytest.raises(ValueError, match=match):
        LINEARS[kind](d_in, d_out, **hp)


@pytest.mark.parametrize("kind", KINDS)
def test_valid_construction_allocates(kind, monkeypatch):
    """Sanity check of the test above: with tensor factories disabled no valid layer is built."""
    _forbid_allocation(monkeypatch)
    with pytest.raises(AssertionError, match="allocated a tensor"):
        LINEARS[kind](8, 16, **small_hparams(kind, 8, 16))


@pytest.mark.parametrize("kind, d_in, d_out, hp, match", INVALID)
def test_invalid_hparams_raise_in_build_and_count(kind, d_in, d_out, hp, match):
    spec = LinearSpec(kind, **hp)
    with pytest.raises(ValueError, match=match):
        build_linear(spec, d_in, d_out)
    with pytest.raises(ValueError, match=match):
        LINEARS[kind].count_params(d_in, d_out, bias=True, **hp)


@pytest.mark.parametrize(
    "spec, match",
    [
        (LinearSpec("lowrank"), r"kind 'lowrank' needs rank; set it \(e\.g\. --model\.ffn\.rank\)"),
        (LinearSpec("blockdense", rank=4), r"kind 'blockdense' needs nblocks"),
        (LinearSpec("blockdense", nblocks=4), r"kind 'blockdense' needs rank"),
        (LinearSpec("blockshuffle"), r"kind 'blockshuffle' needs nblocks"),
        (
            LinearSpec("lowrank", rank=4, nblocks=2),
            r"nblocks=2 is not used by kind 'lowrank'; remove it",
        ),
        (
            LinearSpec("blockshuffle", rank=4, nblocks=2),
            r"rank=4 is not used by kind 'blockshuffle'",
        ),
        (LinearSpec("dense", rank=4), r"rank=4 is not used by kind 'dense'"),
        (LinearSpec("butterfly"), r"unknown structured linear kind 'butterfly'; choose one of \["),
        (
            LinearSpec("lowrank", rank=4, init="ortho"),
            r"init='ortho' is not available for kind 'lowrank'",
        ),
        (LinearSpec("blockshuffle", nblocks=2, init="svd"), r"init='svd' is not available"),
        (
            LinearSpec("dense", init="bogus"),
            r"init='bogus' is not available for kind 'dense'; choose one",
        ),
    ],
)
def test_invalid_spec_raises_helpful_message(spec, match, monkeypatch):
    _forbid_allocation(monkeypatch)  # build_linear, too, validates before allocating
    with pytest.raises(ValueError, match=match):
        check_spec(spec, 8, 16)
    with pytest.raises(ValueError, match=match):
        build_linear(spec, 8, 16)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_init_in_constructor_raises(kind):
    with pytest.raises(ValueError, match="is not available for kind"):
        LINEARS[kind](8, 16, **small_hparams(kind, 8, 16), init="nope")


def test_blockdense_d_out_need_not_divide_nblocks():
    """BlockDense constrains only d_in and rank by nblocks (docs/method.md §1.3), not d_out."""
    layer = BlockDenseLinear(8, 10, rank=4, nblocks=4)
    assert layer(torch.randn(3, 8)).shape == (3, 10)


# --- registry -------------------------------------------------------------------------------------


def test_registry_holds_the_papers_kinds():
    assert {"dense", "lowrank", "blockshuffle", "blockdense"} <= set(LINEARS)
    for name, cls in LINEARS.items():
        assert cls.kind == name and issubclass(cls, StructuredLinear)


def test_duplicate_registration_raises():
    before = dict(LINEARS)

    class Impostor(StructuredLinear):
        kind = "lowrank"

    with pytest.raises(ValueError, match=r"kind 'lowrank' is already registered"):
        register(Impostor)
    assert before == LINEARS and LINEARS["lowrank"] is LowRankLinear


def test_register_new_kind_explicitly():
    assert "scaled" not in LINEARS

    class ScaledLinear(StructuredLinear):
        kind = "scaled"

    assert "scaled" not in LINEARS  # defining a class registers nothing: registration is a call
    try:
        assert register(ScaledLinear) is ScaledLinear and LINEARS["scaled"] is ScaledLinear
        register(ScaledLinear)  # registering the same class again is harmless
    finally:
        unregister("scaled")
    assert "scaled" not in LINEARS


def test_register_refuses_classes_without_a_kind_or_interface():
    class Nameless(StructuredLinear):
        pass

    with pytest.raises(ValueError, match="has no `kind`"):
        register(Nameless)
    with pytest.raises(TypeError, match="not a StructuredLinear subclass"):
        register(torch.nn.Linear)


# --- budgets (docs/method.md §2.1) ----------------------------------------------------------------

# d: {(kind, share): hparams}, from experiment/basic.sh
PAPER_HPARAMS = {
    768: {
        ("lowrank", 63): {"rank": 384},
        ("lowrank", 32): {"rank": 192},
        ("blockdense", 63): {"rank": 512, "nblocks": 2},
        ("blockdense", 32): {"rank": 256, "nblocks": 2},
        ("blockshuffle", 63): {"nblocks": 2},
        ("blockshuffle", 32): {"nblocks": 4},
    },
    1024: {
        ("lowrank", 63): {"rank": 512},
        ("lowrank", 32): {"rank": 256},
        ("blockdense", 63): {"rank": 768, "nblocks": 4},
        ("blockdense", 32): {"rank": 384, "nblocks": 4},
        ("blockshuffle", 63): {"nblocks": 2},
        ("blockshuffle", 32): {"nblocks": 4},
    },
    1536: {
        ("lowrank", 63): {"rank": 768},
        ("lowrank", 32): {"rank": 384},
        ("blockdense", 63): {"rank": 1024, "nblocks": 2},
        ("blockdense", 32): {"rank": 512, "nblocks": 2},
        ("blockshuffle", 63): {"nblocks": 2},
        ("blockshuffle", 32): {"nblocks": 4},
    },
    2048: {
        ("lowrank", 63): {"rank": 1024},
        ("lowrank", 32): {"rank": 512},
        ("blockdense", 63): {"rank": 1536, "nblocks": 4},
        ("blockdense", 32): {"rank": 768, "nblocks": 4},
        ("blockshuffle", 63): {"nblocks": 2},
        ("blockshuffle", 32): {"nblocks": 4},
    },
}
FRACTIONS = {63: (0.63, 0.625), 32: (0.32, 0.3125)}


@pytest.mark.parametrize("d", sorted(PAPER_HPARAMS))
@pytest.mark.parametrize("kind", ["lowrank", "blockdense", "blockshuffle"])
@pytest.mark.parametrize("share", [63, 32])
def test_choose_hparams_reproduces_paper_table(d, kind, share):
    for fraction in FRACTIONS[share]:
        spec = choose_hparams(kind, [(d, 4 * d), (4 * d, d)], fraction)
        assert spec.kind == kind
        assert spec.hparams() == PAPER_HPARAMS[d][(kind, share)], (d, kind, fraction)


def test_choose_hparams_dense_and_errors():
    assert choose_hparams("dense", [(8, 32)], 0.5) == LinearSpec("dense")
    with pytest.raises(ValueError, match=r"fraction=0 must be in \(0, 1\]"):
        choose_hparams("lowrank", [(8, 32)], 0)
    with pytest.raises(ValueError, match="shapes must name at least one"):
        choose_hparams("lowrank", [], 0.5)
    with pytest.raises(ValueError, match="unknown structured linear kind"):
        choose_hparams("butterfly", [(8, 32)], 0.5)


# --- low precision --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("d_in, d_out", [(32, 64), (64, 32)])
def test_bf16_autocast_forward(kind, bias, d_in, d_out):
    """Under CPU bf16 autocast the output is bf16 and close to fp32; backward gives fp32 grads."""
    g = torch.Generator().manual_seed(0)
    layer = LINEARS[kind](d_in, d_out, **small_hparams(kind, d_in, d_out), bias=bias)
    _randomise_bias(layer, g)
    x = torch.randn(4, 7, d_in, generator=g)
    ref = layer(x)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits (unit roundoff 2^-9 ~ 0.2%); two or three roundings (inputs,
    # intermediate, output) give ~0.3% relative error in norm; 2% leaves a wide margin
    assert ((y.float() - ref).norm() / ref.norm()).item() < 2e-2
    y.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())


@pytest.mark.parametrize("kind", sorted(LINEARS))
def test_bias_under_bf16_autocast_keeps_the_dtype_and_gets_its_gradient(kind):
    """Whether a kind folds the bias into its last GEMM or adds it after, the output stays bf16
    under autocast and the bias gradient is the summed output gradient."""
    layer = LINEARS[kind](16, 32, **small_hparams(kind, 16, 32))
    x = torch.randn(4, 16)
    with torch.autocast("cpu", torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(layer.bias.grad, g.float().sum(0), rtol=2e-2, atol=2e-2)
