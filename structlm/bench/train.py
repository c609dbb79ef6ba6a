"""A whole training step against nanoGPT's model.py at the same shapes."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import statistics
import sys
from pathlib import Path

import torch

from structlm.bench.kernels import compile_variants
from structlm.config import ModelConfig, OptimConfig
from structlm.linear.registry import LinearSpec
from structlm.model.flops import flops_per_token
from structlm.model.gpt import GPT
from structlm.training.optim import make_optimizer
from structlm.utils.device import autocast
from structlm.utils.timing import context, median_ms, time_interleaved


def load_nanogpt(path: Path, cfg: ModelConfig, seq: int, device: torch.device) -> tuple:
    """(model, optimizer) of nanoGPT's GPT from the user's model.py, at cfg's shapes, with its own
    `configure_optimizers` (AdamW, fused on CUDA): what nanoGPT's train.py steps."""
    if not path.is_file():
        raise FileNotFoundError(f"--against {path}: no such file (nanoGPT's model.py)")
    if cfg.act != "gelu" or cfg.d_ff != 4 * cfg.d_model or cfg.n_kv_head not in (None, cfg.n_head):
        raise ValueError(f"--against: nanoGPT's block is a GELU MLP of 4*d_model with full "
                         f"attention; this model has act={cfg.act}, d_ff={cfg.d_ff}, "
                         f"n_kv_head={cfg.n_kv_head} (use --model.act gelu --model.d_ff "
                         f"{4 * cfg.d_model} and no --model.n_kv_head)")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not (hasattr(mod, "GPT") and hasattr(mod, "GPTConfig")):
        raise ValueError(f"--against {path}: defines no GPT and GPTConfig (is it nanoGPT's "
                         "model.py?)")
    conf = mod.GPTConfig(block_size=seq, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                         n_head=cfg.n_head, n_embd=cfg.d_model, dropout=0.0, bias=cfg.bias)
    with contextlib.redirect_stdout(sys.stderr):  # it prints its parameter count
        model = mod.GPT(conf).to(device)
        opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device.type)
    return model, opt


def _train_variants(cfg: ModelConfig, device: torch.device, seq: int, kinds: tuple[str, ...],
                    against: Path | None) -> dict[str, tuple]:
    """name -> (model, optimizer, config for the FLOP count): structlm's dense and structured
    models with the trainer's own optimizer, and nanoGPT's model when `against` is given."""
    cfgs = {"dense": dataclasses.replace(cfg, ffn=LinearSpec()), "structured": cfg}
    out = {}
    if against is not None:
        out["nanogpt"] = (*load_nanogpt(against, cfg, seq, device), cfgs["dense"])
    for k in kinds:
        model = GPT(cfgs[k]).to(device)
        out[k] = (model, make_optimizer(model, OptimConfig(lr=1e-4)), cfgs[k])
    return out


def bench_train(
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None, batch: int = 8,
    seq: int = 256, steps: int = 5, peak: float | None = None,
    kinds: tuple[str, ...] = ("dense", "structured"), compile: bool = False,
    against: Path | None = None,
) -> list[dict]:
    """Training-step throughput (forward, backward, gradient clipping at 1.0, AdamW) of the dense
    and the structured model, and of nanoGPT's GPT at the same shapes when `against` names its
    model.py, interleaved step by step; speed-ups against the first (nanoGPT where given). MFU
    against `peak` GFLOP/s (paper FLOP convention, flops.py). compile=True times
    torch.compile'd models (compiled during the warm-up step)."""
    variants = _train_variants(cfg, device, seq, kinds, against)
    models = {k: v[0] for k, v in variants.items()}
    models = compile_variants(models) if compile else models
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    idx, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()  # nanoGPT .view()s the targets

    def step(k):
        opt = variants[k][1]

        def go():
            with autocast(device, dtype):
                _, loss = models[k](idx, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(variants[k][0].parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return go

    t = time_interleaved({k: step(k) for k in variants}, device, reps=steps, min_time=0.0,
                         warmup=1)
    base = statistics.median(next(iter(t.values())))
    rows = []
    for k, ts in t.items():
        ms, lo, hi = median_ms(ts)
        fpt = 3 * flops_per_token(variants[k][2], seq)["total"]
        achieved = fpt * batch * seq / (ms * 1e-3) / 1e9
        rows.append({"bench": "train", **context(device, dtype), "compiled": compile,
                     "variant": k, "kind": variants[k][2].ffn.kind, "d_model": cfg.d_model,
                     "n_layer": cfg.n_layer, "params": sum(p.numel() for p in
                                                           variants[k][0].parameters()),
                     "batch": batch, "seq": seq, "ms": ms, "ms_min": lo, "ms_max": hi,
                     "tokens_per_s": batch * seq / (ms * 1e-3), "gflops": achieved,
                     "mfu": achieved / peak if peak else None, "speedup": base / (ms * 1e-3)})
    return rows
