"""Configs: typed dataclasses, one per concern, validated when made.

`RunConfig` = `ModelConfig` (model.py) + `DataConfig` + `OptimConfig` + `TrainConfig` with its
`SGTConfig` (run.py); the presets are functions returning a RunConfig (presets.py); configs go to
and from JSON type-checked against their annotations (jsonio.py). Every CLI flag is one of these
fields. This package's names are importable from `structlm.config` itself.
"""

from structlm.config.jsonio import checked, from_dict, load_run_config, save_json, to_dict
from structlm.config.model import ModelConfig, mup_model, mup_scales
from structlm.config.presets import DEFAULT_PRESET, PRESETS
from structlm.config.run import DataConfig, OptimConfig, RunConfig, SGTConfig, TrainConfig
from structlm.linear.registry import LinearSpec

__all__ = [
    "LinearSpec", "ModelConfig", "DataConfig", "OptimConfig", "SGTConfig", "TrainConfig",
    "RunConfig", "PRESETS", "DEFAULT_PRESET", "to_dict", "from_dict", "save_json",
    "load_run_config", "checked", "mup_model", "mup_scales",
]
