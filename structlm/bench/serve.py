"""The server under load: a real structlm serve process and the load generator's clients."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import torch

from structlm.config import DataConfig, ModelConfig, RunConfig, save_json
from structlm.data.prepare import prepare
from structlm.data.tokenizer import load_tokenizer
from structlm.linear.registry import LinearSpec
from structlm.model.gpt import GPT
from structlm.runs import checkpoint
from structlm.utils.timing import context


def bench_serve(
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None,
    concurrency: tuple[int, ...] = (1, 8, 32), prompt: int = 64, gen: int = 64, reps: int = 1,
) -> list[dict]:
    """structlm serve under load: the dense model, the structured one without and with pre-merge
    (random weights of the config, the built-in corpus's tokenizer), each in its own server on
    loopback; for each concurrency, 2 x concurrency streaming requests (at least 8) per server,
    the servers interleaved `reps` times."""
    from structlm.bench.load import run_load
    from structlm.serving.server import BackgroundServer, build

    tok = prepare(DataConfig()) / "tokenizer.json"
    cfg = dataclasses.replace(cfg, vocab_size=load_tokenizer(tok).get_vocab_size())
    variants = {"dense": (dataclasses.replace(cfg, ffn=LinearSpec()), False),
                "structured": (cfg, False), "structured+premerge": (cfg, True)}
    with tempfile.TemporaryDirectory() as tmp:
        servers = {}
        for name, (c, merge) in variants.items():
            run = random_run(Path(tmp) / name.replace("+", "-"), c, tok)
            app, engine = build(str(run), device=device.type, max_batch=max(concurrency),
                                dtype="fp32" if dtype is None else "bf16", premerge=merge,
                                max_tokens=2 * gen)
            servers[name] = BackgroundServer(app, engine)
        rows = []
        try:
            for conc in concurrency:
                for _ in range(reps):
                    for name, srv in servers.items():
                        r = run_load(srv.url, conc, max(8, 2 * conc), prompt, gen)
                        rows.append({"bench": "serve", **context(device, dtype), "variant": name,
                                     "kind": variants[name][0].ffn.kind,
                                     "d_model": cfg.d_model, "n_layer": cfg.n_layer, **r})
        finally:
            for srv in servers.values():
                srv.close()
    return rows


def random_run(out: Path, cfg: ModelConfig, tokenizer: Path) -> Path:
    """A run directory of a randomly initialised model (for speed measurements)."""
    torch.manual_seed(0)
    run_cfg = RunConfig(model=cfg)
    checkpoint.save(out, GPT(cfg), None, run_cfg, 0, {})
    save_json(run_cfg, str(out / "config.json"))
    shutil.copyfile(tokenizer, out / "tokenizer.json")
    return out
