"""structlm: GPT language models with structured feed-forward layers (LowRank, BlockShuffle,
BlockDense), self-guided training and pre-merge; a re-implementation of "Building on Efficient
Foundations" (arXiv 2406.16450).

The Python API (every CLI subcommand calls one of these):

    cfg = structlm.PRESETS["small"]()
    cfg.model.ffn = structlm.LinearSpec("blockdense", rank=128, nblocks=4)
    cfg.train.out_dir = "runs/bd"
    summary = structlm.train(cfg)                       # also runs/bd/summary.json
    model, cfg = structlm.load_model("runs/bd")
    text = structlm.Generator.load("runs/bd").generate("ROMEO:", max_new_tokens=50)
    structlm.param_groups(cfg.model), structlm.flops_per_token(cfg.model)

`import structlm` is light: each name is imported from its module on first use, so the training
loop, the benchmarks and matplotlib load only when something needs them.
"""

from __future__ import annotations

import importlib

from structlm._version import __version__ as __version__

_EXPORTS = {  # public name -> the module that defines it
    "structlm.config": ("PRESETS", "RunConfig", "ModelConfig", "DataConfig", "OptimConfig",
                        "TrainConfig", "SGTConfig", "to_dict", "from_dict"),
    "structlm.linear": ("LinearSpec", "LINEARS", "StructuredLinear", "register", "unregister",
                        "build_linear", "choose_hparams", "GuidedLinear", "PreMergedLinear",
                        "wrap_guided", "unwrap_guided", "merge_linears", "premerge", "unmerge",
                        "replace_modules", "structure"),
    "structlm.model.gpt": ("GPT",),
    "structlm.model.cache": ("KVCache",),
    "structlm.runs.run": ("load_model", "Run"),
    "structlm.runs.generate": ("Generator",),
    "structlm.data.prepare": ("prepare",),
    "structlm.data.batches": ("Batches",),
    "structlm.training": ("train", "Summary", "SelfGuided"),
    "structlm.runs.evaluate": ("evaluate",),
    "structlm.model.flops": ("param_groups", "flops_per_token", "train_flops", "tokens_for_budget"),
    "structlm.bench.kernels": ("bench_kernel", "bench_ffn"),
    "structlm.bench.train": ("bench_train",),
    "structlm.bench.decode": ("bench_decode",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [*_WHERE, "__version__"]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'structlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
