"""Dense -> structured for any model: `structure(model, spec_or_fraction)` replaces the chosen
`nn.Linear` layers (and transformers' GPT-2 `Conv1D`) by structured layers whose factors are
projected from the dense weights, through the converter seam (`replace_modules`).

Projections (each the best approximation its structure allows, in the Frobenius norm):

    lowrank       truncated SVD, sqrt(S) split into both factors (Eckart-Young optimal)
    blockshuffle  per (output block, input block) pair, the truncated SVD of W's sub-matrix: the
                  pairs use disjoint columns of blkdiag2 and rows of blkdiag1 (optimal; any shape)
    blockdense    per input block, the truncated SVD of W's columns: `up`'s column slices serve
                  one block each, so the problem splits (optimal)

With `calib` (token ids run through the model), every kind minimises ||(W - W^) X|| instead:
LowRank by the SVD of W L with L the Cholesky factor of the layer's input covariance (as SVD-LLM
does), the block kinds by weighted alternating least squares from the plain projection
(`factors.weighted_refine`).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from tqdm import tqdm

from structlm.linear.allocate import Spectrum, allocate_ranks, spectrum
from structlm.linear.base import StructuredLinear
from structlm.linear.factors import damped
from structlm.linear.registry import (
    DENSE,
    LinearSpec,
    build_linear,
    choose_hparams,
    linear_class,
)
from structlm.linear.replace import Patterns, named_modules, replace_modules

# every FFN linear of every block (structlm, Llama, GPT-2, NeoX, a module tree with an `mlp`)
DEFAULT_INCLUDE = ("*.mlp.*", "mlp.*")
DEFAULT_EXCLUDE = ("*.0.mlp.*", "0.mlp.*")  # block 0's FFN stays dense, as in the paper


def _dense_weight(m: nn.Module) -> Tensor | None:
    """(d_out, d_in) of a dense layer: nn.Linear, structlm's dense kind, or a transformers Conv1D
    (stored (d_in, d_out)); None for anything else."""
    if isinstance(m, StructuredLinear):
        return m.weight if m.kind == DENSE else None
    if isinstance(m, nn.Linear):
        return m.weight
    if type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None:
        return m.weight.T
    return None


def structure(
    model: nn.Module, spec_or_fraction: LinearSpec | float, *, kind: str = "lowrank",
    include: Patterns = DEFAULT_INCLUDE, exclude: Patterns = DEFAULT_EXCLUDE,
    init: str = "project", calib: Tensor | None = None, progress: bool = False,
    allocate: str = "uniform",
) -> tuple[nn.Module, list[dict]]:
    """Replace the matching dense linear layers of `model`, in place, by structured layers of
    `spec_or_fraction` (a LinearSpec, or a share of each layer's parameters for `kind`, by the
    paper's budget rule per shape); returns (model, a report row per layer). Under a fraction, a
    layer that no structure of `kind` makes smaller (a 32 -> 1 gate) stays dense: its row has
    kind "dense" and says why under "kept". `allocate="error"` (LowRank, a fraction) spends the
    fraction of all matching layers' weights where it removes the most activation-weighted error
    (`linear.allocate`): uneven ranks instead of one share per layer; "sensitivity" (needs
    `calib`) weighs each layer's error by what truncating that layer alone does to the model's
    outputs (one forward per layer). `progress`: a bar over the
    layers (the activation-aware block projections take seconds each)."""
    if init not in ("project", "paper"):
        raise ValueError(f"init={init!r}: choose project (from the dense weights) or paper")
    covs = input_covariances(model, calib, include, exclude) if calib is not None else {}
    n_tokens = None if calib is None else calib.numel()
    ranks = _allocated(model, spec_or_fraction, kind, allocate, covs, include, exclude, calib,
                       progress)
    report: list[dict] = []
    total = sum(_dense_weight(m) is not None for _, m, _, _ in named_modules(model, include,
                                                                              exclude))
    bar = tqdm(total=total, desc="structure", unit="layer", disable=not progress)

    def convert(name: str, m: nn.Module) -> nn.Module | None:
        w = _dense_weight(m)
        if w is None:
            return None
        d_out, d_in = w.shape
        spec = spec_or_fraction
        if ranks is not None:
            spec = LinearSpec("lowrank", rank=ranks[name])
        elif not isinstance(spec, LinearSpec):
            spec, why = _budget(kind, d_in, d_out, float(spec_or_fraction))
            if why:  # e.g. a 32 -> 1 gate: nothing to save
                report.append(_kept(name, d_in, d_out, why))
                bar.update(1)
                return None
        bias = getattr(m, "bias", None)
        layer = build_linear(spec, d_in, d_out, bias=bias is not None, device=w.device,
                             dtype=w.dtype)
        with torch.no_grad():
            if init == "project":
                project_(layer, w.detach(), covs.get(name), n_tokens)
            if bias is not None:
                layer.bias.copy_(bias)
        report.append(_row(name, w.detach(), layer, covs.get(name), init == "project"))
        bar.update(1)
        return layer

    try:
        replace_modules(model, convert, include, exclude)
    finally:
        bar.close()
    if calib is not None:
        _warn_short_calibration(report, calib.numel())
    if not any(r["kind"] != DENSE for r in report):
        if report:
            raise ValueError(f"no matching layer can be structured at fraction="
                             f"{spec_or_fraction} ({', '.join(r['name'] for r in report)}; "
                             f"{report[0]['kept']}); give other include patterns or a spec")
        raise ValueError(f"no nn.Linear matches include={include} exclude={exclude}; name the "
                         "layers to structure with fnmatch patterns of their qualified names")
    return model, report


def _allocated(model: nn.Module, spec_or_fraction, kind: str, allocate: str, covs: dict,
               include: Patterns, exclude: Patterns, calib: Tensor | None,
               progress: bool = False) -> dict[str, int] | None:
    """Per-layer ranks under allocate="error" or "sensitivity", None under "uniform"."""
    if allocate == "uniform":
        return None
    if allocate not in ("error", "sensitivity"):
        raise ValueError(f"allocate={allocate!r}: choose uniform, error or sensitivity")
    if kind != "lowrank" or isinstance(spec_or_fraction, LinearSpec):
        raise ValueError(f"allocate={allocate!r} splits a fraction into LowRank ranks: give a "
                         "fraction and kind='lowrank' (the block kinds allocate uniformly for now)")
    if allocate == "sensitivity" and calib is None:
        raise ValueError("allocate='sensitivity' measures each layer's effect on the model's "
                         "outputs: give calib (token ids)")
    fraction = float(spec_or_fraction)
    weights = {name: w.detach() for name, m, _, _ in named_modules(model, include, exclude)
               if (w := _dense_weight(m)) is not None}
    spectra = [spectrum(name, w, covs.get(name)) for name, w in weights.items()]
    if allocate == "sensitivity":
        spectra = _weighed(model, spectra, weights, fraction, covs, calib, progress)
    return allocate_ranks(spectra, fraction)


@torch.no_grad()
def _weighed(model: nn.Module, spectra: list[Spectrum], weights: dict[str, Tensor],
             fraction: float, covs: dict, calib: Tensor, progress: bool) -> list[Spectrum]:
    """Each spectrum scaled so that its truncation error at the uniform rank equals what that
    truncation alone costs the model: KL(dense outputs || outputs with only this layer
    projected) on the calibration tokens. A first-order exchange rate from each layer's local
    error to the model's, so that the greedy trades layers by their effect on the outputs."""
    ref = _log_probs(model, calib)  # (..., vocab)
    out = []
    for s in tqdm(spectra, desc="sensitivity", unit="layer", disable=not progress):
        w = weights[s.name]  # a view of the model's weight: written in place, then restored
        rank = min(s.max_rank, choose_hparams("lowrank", [(s.d_in, s.d_out)], fraction).rank)
        layer = build_linear(LinearSpec("lowrank", rank=rank), s.d_in, s.d_out, bias=False,
                             dtype=torch.float64)
        project_(layer, w, covs.get(s.name), calib.numel())
        saved = w.clone()
        w.copy_(layer.to_dense().to(w.dtype))
        kl = (ref.exp() * (ref - _log_probs(model, calib))).sum(-1).mean().item()
        w.copy_(saved)
        rate = max(kl, 1e-12) / max(float(s.energy[rank:].sum()), 1e-300)
        out.append(Spectrum(s.name, s.d_in, s.d_out, s.energy * rate))
    return out


@torch.no_grad()
def _log_probs(model: nn.Module, tokens: Tensor) -> Tensor:
    """log-softmax of the model's logits (a structlm GPT's first output, a transformers model's
    .logits, or the output itself), in float32."""
    out = model(tokens)
    out = out[0] if isinstance(out, tuple) else getattr(out, "logits", out)
    return out.float().log_softmax(-1)


def _warn_short_calibration(report: list[dict], tokens: int) -> None:
    """Fewer calibration tokens than a layer has inputs leave its covariance singular: the
    projection then fits the calibration text better and other text worse (a ridge limits it)."""
    short = [r["name"] for r in report if r["kind"] != DENSE and r["d_in"] > tokens]
    if short:
        warnings.warn(f"{tokens} calibration tokens for layers with more inputs ({short[0]}"
                      f"{f' and {len(short) - 1} more' if len(short) > 1 else ''}): their "
                      "activation-aware projection may do worse than the plain one on other "
                      "text; give at least as many tokens as the widest layer has inputs",
                      stacklevel=3)


def _budget(kind: str, d_in: int, d_out: int, fraction: float) -> tuple[LinearSpec | None, str]:
    """The kind's spec for one shape at `fraction`, or (None, why the layer stays dense): no
    valid spec of this kind for the shape, or none with fewer weights than dense."""
    try:
        spec = choose_hparams(kind, [(d_in, d_out)], fraction)
    except ValueError as e:
        return None, f"no {kind} layer fits {d_in} -> {d_out}: {e}"
    if linear_class(kind).weight_params(d_in, d_out, **spec.hparams()) >= d_in * d_out:
        return None, f"{kind} at fraction={fraction} would not have fewer weights than dense"
    return spec, ""


def _kept(name: str, d_in: int, d_out: int, why: str) -> dict:
    """The report row of a matching layer left dense."""
    return {"name": name, "d_in": d_in, "d_out": d_out, "kind": DENSE,
            "params_before": d_in * d_out, "params_after": d_in * d_out, "rel_error": 0.0,
            "kept": why}


def _row(name: str, w: Tensor, layer: StructuredLinear, cov: Tensor | None,
         measured: bool) -> dict:
    """The report row of a replaced layer; its errors only when `measured` (projected from real
    weights: a paper-init or meta-device skeleton has no error to report)."""
    row = {"name": name, "d_in": layer.d_in, "d_out": layer.d_out, "kind": layer.kind,
           **layer.hp, "params_before": w.numel(), "params_after": layer.weight_params(
               layer.d_in, layer.d_out, **layer.hp)}
    if not measured or w.is_meta:
        return row
    approx = layer.to_dense().to(w.dtype)
    row["rel_error"] = ((w - approx).norm() / w.norm()).item()
    if cov is not None:
        row["weighted_error"] = weighted_error(w, approx, cov)
    return row


def weighted_error(w: Tensor, approx: Tensor, cov: Tensor) -> float:
    """||(W - W^) X|| / ||W X|| from the input covariance C = X X^T / n."""
    d = (w - approx).double()
    return (torch.trace(d @ cov @ d.T) / torch.trace(w.double() @ cov @ w.double().T)).sqrt().item()


@torch.no_grad()
def input_covariances(
    model: nn.Module, calib: Tensor, include: Patterns, exclude: Patterns
) -> dict[str, Tensor]:
    """The input covariance (d_in, d_in), float64, of every matching linear layer over one forward
    of `model(calib)`."""
    covs, hooks = {}, []
    for name, m, _, _ in named_modules(model, include, exclude):
        if _dense_weight(m) is None:
            continue

        def hook(mod, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            covs[name] = covs.get(name, 0) + x.T @ x / x.shape[0]
        hooks.append(m.register_forward_pre_hook(hook))
    try:
        model(calib)
    finally:
        for h in hooks:
            h.remove()
    return covs


# --- the projections: each kind declares its own (StructuredLinear.project) -----------------------


SHORT_RIDGE = 1e-2  # added to a covariance from fewer tokens than inputs (docs/method.md §9)


@torch.no_grad()
def project_(layer: StructuredLinear, w: Tensor, cov: Tensor | None = None,
             tokens: int | None = None) -> None:
    """Set `layer`'s factors to the best approximation of the dense `w` (d_out, d_in) its kind
    allows, computed in float64. `tokens`: how many inputs `cov` came from; fewer than d_in
    make it singular, and a ridge then keeps the projection from fitting only those."""
    if cov is not None:
        cov = cov.double()
        if tokens is not None and tokens < layer.d_in:
            cov = damped(cov, SHORT_RIDGE)
    layer.project(w.double(), cov)
