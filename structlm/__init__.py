"""structlm: GPT language models with structured feed-forward layers (LowRank, BlockShuffle,
BlockDense), self-guided training and pre-merge; a re-implementation of "Building on Efficient
Foundations" (arXiv 2406.16450).

The Python API (every CLI subcommand calls one of these):

    cfg = structlm.PRESETS["small"]()
    cfg.model.ffn = structlm.LinearSpec("blockdense", rank=128, nblocks=4)
    model = structlm.GPT(cfg.model)
    structlm.param_groups(cfg.model), structlm.flops_per_token(cfg.model)
"""

from structlm.config import (
    PRESETS,
    DataConfig,
    LinearSpec,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    from_dict,
    to_dict,
)
from structlm.flops import flops_per_token, param_groups, tokens_for_budget, train_flops
from structlm.linear import LINEARS, StructuredLinear, build_linear, choose_hparams, register
from structlm.model import GPT, KVCache

__all__ = [
    "PRESETS", "RunConfig", "ModelConfig", "LinearSpec", "DataConfig", "OptimConfig", "TrainConfig",
    "to_dict", "from_dict",
    "LINEARS", "StructuredLinear", "register", "build_linear", "choose_hparams",
    "GPT", "KVCache",
    "param_groups", "flops_per_token", "train_flops", "tokens_for_budget",
]
