"""Verbs about a run's configuration and training: info, prepare, train."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from structlm.cli.args import POSITIVE_FLOAT, ResumableSource, parse_run_config


@dataclass(frozen=True)
class InfoOptions:
    """Parameter and FLOP table of a preset plus overrides (the paper's accounting)."""

    # training tokens, for total training FLOPs
    tokens: Annotated[float | None, POSITIVE_FLOAT] = None
    json: bool = False  # print one JSON object instead of a table


def cmd_info(argv: list[str]) -> None:
    cfg, _, a = parse_run_config("structlm info", argv, InfoOptions,
                                 description=InfoOptions.__doc__)
    from structlm.studies.info import format_info, model_info

    info = model_info(cfg, a.tokens)
    print(json.dumps(info) if a.json else format_info(cfg, info))


def cmd_prepare(argv: list[str]) -> None:
    """Tokenize a corpus into data_dir (train.bin, val.bin, tokenizer.json, meta.json)."""
    cfg, _, _ = parse_run_config("structlm prepare", argv, description=cmd_prepare.__doc__)
    from structlm.data.prepare import prepare

    prepare(cfg.data)


def _only_the_data_dir(argv: list[str], data_dir: str | None) -> bool:
    """True when the command line names --data.data_dir, no other --data flag, and that directory
    holds prepared data: `structlm prepare ... --data.data_dir D` then `structlm train
    --data.data_dir D` trains on what prepare made, whatever source the preset or config names."""
    data_flags = {a.split("=")[0] for a in argv if a.startswith("--data.")}
    return (data_flags == {"--data.data_dir"} and data_dir is not None
            and (Path(data_dir).expanduser() / "meta.json").is_file())


def cmd_train(argv: list[str]) -> None:
    """Train (or resume) a run; prints the validation perplexity and how to generate from it."""
    cfg, src, _ = parse_run_config("structlm train", argv, source=ResumableSource,
                                   description=cmd_train.__doc__)
    from structlm.training import train
    from structlm.utils.device import dist_info
    from structlm.utils.units import amount

    if src.resume is None and _only_the_data_dir(argv, cfg.data.data_dir):
        cfg.data.source = None  # prepared by `structlm prepare`: trained on as it is
    s = train(cfg, override=src.override)
    if dist_info()[0] != 0:  # under torchrun, rank 0 says it once
        return
    print(
        f"\ndone: {s.steps} steps, {amount(s.tokens, 'tokens')} in {s.wall_time_s / 60:.1f} min | "
        f"val loss {s.final_val_loss:.4f} | val ppl {s.final_val_ppl:.2f}\n"
        f"run: {s.out_dir} (summary.json, metrics.jsonl, loss.png, checkpoints/)\n"
        f"generate: structlm generate {s.out_dir} --prompt \"ROMEO:\""
    )
