"""Pre-merge (docs/method.md §5): a structured map with no nonlinearity between its factors equals
one dense matrix W = f(I)^T, and for calls with few tokens (decoding) that one GEMM is often faster.

    premerge(model, thresholds)   structured layers -> PreMergedLinear (factors + merged W)
    unmerge(model)                the inverse
    merge_linears(model)          a copy with every structured layer an nn.Linear holding W
    thresholds_for(model, ...)    the token count below which each layer shape uses W: measured
                                  (`calibrate_layer`, cached per device/dtype/torch) or
                                  `default_threshold`

`PreMergedLinear` dispatches on the number of tokens in each call:

    tokens <  max_dense_tokens  ->  x W^T + b   (one GEMM: best when latency/memory bound)
    tokens >= max_dense_tokens  ->  f(x) + b    (fewer FLOPs: best for large batches)

The merged W is a non-persistent buffer (never saved in checkpoints), rebuilt whenever the factors
change: in place (an optimizer step or `load_state_dict` bumps a tensor's version counter) or by
swapping tensors (`load_state_dict(assign=True)`, `p.data = ...`: new storage). Whenever gradients
can reach the factors (grad mode on and a factor requiring grad, in train or eval mode) the call
takes the structured path. A wrapped layer's state_dict has the keys of the layer alone, so
checkpoints load with or without pre-merge.
"""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from structlm.linear.base import StructuredLinear
from structlm.linear.replace import Patterns, Wrapper, is_structured, replace_modules
from structlm.utils.device import autocast
from structlm.utils.files import cache_dir
from structlm.utils.timing import context, time_interleaved

# pre-merge below 16 tokens per call when uncalibrated (the paper's example)
DEFAULT_MAX_DENSE_TOKENS = 16
# the uncalibrated CPU rule for LowRank (`default_threshold`): a call costs its weight bytes at
# this bandwidth plus this much fixed time per GEMM. Both fitted to one layer timed alone on a
# 2-core AMD EPYC, fp32, where the weights sit in cache: conservative, since weights streamed
# from memory in a model make the bytes the factors save weigh more
CPU_BYTES_PER_US = 50e3
CALL_US = 6.0
TOKEN_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class PreMergedLinear(Wrapper):
    """A structured layer plus its merged dense matrix; dispatches on the token count of each
    call."""

    def __init__(self, structured: StructuredLinear, max_dense_tokens: int) -> None:
        super().__init__()
        self.structured = structured
        self.max_dense_tokens = max_dense_tokens
        self.register_buffer("merged", torch.empty(0), persistent=False)
        self._versions: tuple | None = None
        self.calls = {"merged": 0, "structured": 0}  # which path each call took (for serving)
        self.register_state_dict_post_hook(_drop_prefix)
        self.register_load_state_dict_pre_hook(_add_prefix)

    @torch.no_grad()
    def refresh(self) -> None:
        """Rebuild the merged matrix from the factors, in their dtype (never under autocast)."""
        w = self.structured.weights()[0]
        with torch.autocast(device_type=w.device.type, enabled=False):
            self.merged = self.structured.to_dense().detach()  # (d_out, d_in)
        self._versions = self._current_versions()

    def _factors(self):
        """The wrapped layer's parameters, looked up now (`load_state_dict(assign=True)` swaps
        them); its own dict directly when it has no submodules (a decode step calls this per
        layer, and `parameters()` costs microseconds)."""
        s = self.structured
        return s._parameters.values() if not s._modules else s.parameters()

    def _current_versions(self) -> tuple:
        """What identifies the factors' values: each tensor's storage, dtype and version."""
        return tuple((p.data_ptr(), p.dtype, p._version) for p in self._factors() if p is not None)

    def _learning(self) -> bool:
        return torch.is_grad_enabled() and any(
            p.requires_grad for p in self.structured.parameters())

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.numel() // x.shape[-1]
        if tokens >= self.max_dense_tokens or self._learning():
            self.calls["structured"] += 1
            return self.structured(x)  # large calls, and gradients must reach the factors
        # moving the model moves the factors (new storage, so new versions): no device check.
        # The dicts are read directly: nn.Module's attribute lookup costs a decode step
        # microseconds per layer, which would make the merged path slower than a dense layer
        if self._versions != self._current_versions():
            self.refresh()
        self.calls["merged"] += 1
        return F.linear(x, self._buffers["merged"], self.structured._parameters.get("bias"))

    def unwrap(self) -> StructuredLinear:
        return self.structured

    def extra_repr(self) -> str:
        return f"max_dense_tokens={self.max_dense_tokens}"


INNER = "structured."  # the wrapped layer's attribute, hidden from state_dict keys


def _drop_prefix(module: nn.Module, state: dict, prefix: str, meta) -> None:
    for key in [k for k in state if k.startswith(prefix + INNER)]:
        state[prefix + key[len(prefix + INNER):]] = state.pop(key)


def _add_prefix(module: nn.Module, state: dict, prefix: str, *_) -> None:
    names = {n for n, _ in module.structured.named_parameters()} | {
        n for n, _ in module.structured.named_buffers()}
    for key in [k for k in state if k.startswith(prefix) and k[len(prefix):] in names]:
        state[prefix + INNER + key[len(prefix):]] = state.pop(key)


def layer_key(m: StructuredLinear) -> tuple:
    """What a pre-merge threshold depends on besides the device: the kind, the shape, the
    hyper-parameters."""
    return (m.kind, m.d_in, m.d_out, tuple(sorted(m.hp.items())))


def premerge(
    model: nn.Module, max_dense_tokens: int | dict[tuple, int], *,
    include: Patterns = None, exclude: Patterns = None,
) -> nn.Module:
    """Wrap every structured (non-dense) StructuredLinear in a PreMergedLinear, in place.
    `max_dense_tokens` is one threshold, or a dict keyed by `layer_key(layer)` (from
    `thresholds_for`); returns the model."""

    def wrap(_: str, m: nn.Module) -> nn.Module | None:
        if not is_structured(m):
            return None
        t = max_dense_tokens
        return PreMergedLinear(m, t if isinstance(t, int) else t[layer_key(m)])

    replace_modules(model, wrap, include, exclude)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `premerge`, in place."""
    replace_modules(model, lambda _, m: m.unwrap() if isinstance(m, PreMergedLinear) else None)
    return model


def merge_linears(
    model: nn.Module, *, include: Patterns = None, exclude: Patterns = None
) -> nn.Module:
    """A copy of `model` in which every structured (non-dense) StructuredLinear is an nn.Linear
    holding `to_dense()` (same dtype and device)."""
    model = copy.deepcopy(model)

    def to_linear(_: str, m: nn.Module) -> nn.Module | None:
        if isinstance(m, PreMergedLinear):
            m = m.unwrap()
        if not is_structured(m):
            return None
        w = m.weights()[0]
        lin = nn.Linear(m.d_in, m.d_out, bias=m.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(m.to_dense())
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        return lin

    replace_modules(model, to_linear, include, exclude)
    return model


# --- calibration: where the merged matrix stops paying off ----------------------------------------


def cache_path() -> Path:
    return cache_dir() / "premerge.json"


def crossover_key(layer: StructuredLinear, device: torch.device, dtype: torch.dtype | None) -> str:
    """Cache key: a threshold is valid only for this device, dtype, torch version, kind, shape and
    hp."""
    c = context(device, dtype)
    return json.dumps([c["device"], c["dtype"], c["torch"], *map(str, layer_key(layer))])


def load_cache() -> dict[str, int]:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def save_cache(cache: dict[str, int]) -> None:
    p = cache_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1))
    tmp.replace(p)


@torch.no_grad()
def calibrate_layer(
    layer: StructuredLinear, device: torch.device, dtype: torch.dtype | None,
    tokens: tuple[int, ...] = TOKEN_GRID, reps: int = 5,
) -> tuple[int, list[dict]]:
    """Time the structured path against the merged dense matrix at each token count; returns
    (threshold, rows): the merged path is used below `threshold` tokens (`choose_threshold`)."""
    layer = layer.to(device).eval()
    merged = layer.to_dense()
    bias = layer.bias
    rows = []
    for T in tokens:
        x = torch.randn(T, layer.d_in, device=device)
        with autocast(device, dtype):
            times = time_interleaved(
                {"structured": lambda x=x: layer(x),
                 "merged": lambda x=x: F.linear(x, merged, bias)},
                device, reps=reps, min_time=0.01,
            )
        s, m = statistics.median(times["structured"]), statistics.median(times["merged"])
        rows.append({"bench": "crossover", **context(device, dtype), "kind": layer.kind,
                     "d_in": layer.d_in, "d_out": layer.d_out, **layer.hp, "tokens": T,
                     "structured_ms": 1e3 * s, "merged_ms": 1e3 * m, "speedup": m / s})
    threshold = choose_threshold(tokens, [r["structured_ms"] for r in rows],
                                 [r["merged_ms"] for r in rows])
    return threshold, rows


# the factors must be measured at least this much faster than the merged matrix to be used: the
# merged matrix is the dense layer's own GEMM, so choosing it can never make the model slower than
# its dense parent, while a factor path chosen on a timing within noise (one layer alone, out of
# the model's caches) could
FACTORS_MARGIN = 0.9


def choose_threshold(tokens: tuple[int, ...] | list[int], structured_ms: list[float],
                     merged_ms: list[float], margin: float = FACTORS_MARGIN) -> int:
    """The smallest token count from which the structured path is clearly faster (structured <=
    margin x merged) at that and every larger measured count; one past the grid (merged always)
    when it is not clearly faster at the largest. Ties and near-ties go to the merged matrix."""
    threshold = tokens[-1] * 2
    for T, s, m in reversed(list(zip(tokens, structured_ms, merged_ms, strict=True))):
        if s > margin * m:
            break
        threshold = T
    return threshold


def default_threshold(layer: StructuredLinear, device: torch.device,
                      dtype: torch.dtype | None = None) -> int:
    """The threshold when nothing is measured. On a CPU a LowRank layer's two GEMMs read fewer
    weight bytes and do fewer FLOPs than its merged matrix at every token count, and a CPU has no
    kernel-launch latency to amortise: its factors are used from one token on (threshold 1)
    wherever the bytes they save outweigh a second call, by the FACTORS_MARGIN the calibration
    asks for. Everywhere else (block kinds, whose small batched GEMMs and permutations are slow at
    few tokens; GPUs, where two launches cost more than one) DEFAULT_MAX_DENSE_TOKENS."""
    if device.type != "cpu" or layer.kind != "lowrank":
        return DEFAULT_MAX_DENSE_TOKENS
    size = (dtype or layer.weights()[0].dtype).itemsize  # bytes per weight as computed
    factors = 2 * CALL_US + size * layer.weight_params(layer.d_in, layer.d_out, **layer.hp) \
        / CPU_BYTES_PER_US
    merged = CALL_US + size * layer.d_in * layer.d_out / CPU_BYTES_PER_US
    return 1 if factors <= FACTORS_MARGIN * merged else DEFAULT_MAX_DENSE_TOKENS


def thresholds_for(
    model: nn.Module, device: torch.device, dtype: torch.dtype | None, calibrate: bool = False,
    progress: bool = False,
) -> tuple[dict[tuple, int], list[dict]]:
    """Pre-merge thresholds for every distinct structured layer of `model`: from the cache, measured
    when `calibrate` (and cached), else `default_threshold`. Returns
    ({layer_key: threshold}, rows)."""
    cache = load_cache()
    out, rows, changed = {}, [], False
    layers = {layer_key(m): m for m in model.modules() if is_structured(m)}
    for key, layer in layers.items():
        ck = crossover_key(layer, device, dtype)
        if ck in cache and not calibrate:
            out[key] = cache[ck]
        elif calibrate:
            if progress:
                print(f"calibrating {layer.kind} {layer.d_in}->{layer.d_out} {layer.hp} ...",
                      flush=True)
            out[key], r = calibrate_layer(layer, device, dtype)
            rows += r
            cache[ck] = out[key]
            changed = True
        else:
            out[key] = default_threshold(layer, device, dtype)
    if changed:
        save_cache(cache)
    return out, rows
