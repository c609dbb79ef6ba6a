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
"""

from structlm.bench import bench_decode, bench_ffn, bench_kernel, bench_train
from structlm.checkpoint import load_model
from structlm.config import (
    PRESETS,
    DataConfig,
    LinearSpec,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SGTConfig,
    TrainConfig,
    from_dict,
    to_dict,
)
from structlm.data import Batches, prepare
from structlm.evaluate import evaluate
from structlm.flops import flops_per_token, param_groups, tokens_for_budget, train_flops
from structlm.generate import Generator
from structlm.linear import (
    LINEARS,
    GuidedLinear,
    PreMergedLinear,
    StructuredLinear,
    build_linear,
    choose_hparams,
    merge_linears,
    premerge,
    register,
)
from structlm.model import GPT, KVCache
from structlm.train import Summary, train

__all__ = [
    "PRESETS", "RunConfig", "ModelConfig", "LinearSpec", "DataConfig", "OptimConfig", "TrainConfig",
    "SGTConfig", "to_dict", "from_dict",
    "LINEARS", "StructuredLinear", "register", "build_linear", "choose_hparams",
    "GuidedLinear", "PreMergedLinear", "merge_linears", "premerge",
    "GPT", "KVCache", "load_model", "Generator",
    "prepare", "Batches", "train", "Summary", "evaluate",
    "param_groups", "flops_per_token", "train_flops", "tokens_for_budget",
    "bench_kernel", "bench_ffn", "bench_train", "bench_decode",
]
