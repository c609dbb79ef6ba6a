"""The `structlm` command: one small adapter per subcommand, each calling one public function.

    structlm info     [--preset P] [--config F] [--tokens N] [--json] [--model.* ...]
    structlm prepare  [--preset P] [--data.* ...]
    structlm train    [--preset P] [--config F] [--resume DIR] [--model.* --data.* --optim.* --train.* ...]
    structlm eval     RUN_DIR [--data DIR | --text FILE]
    structlm generate RUN_DIR --prompt "..." [--max_new_tokens N --temperature T --top_k K --top_p P]
    structlm sweep    [FILE.toml] [--sizes 2x128 4x256 --structures dense lowrank:0.32 --tokens_per_param R] [--dry-run]
    structlm scaling  RUNS... [--x train_flops|params] [--json F] [--plot F.png]
    structlm plan     --flops C [--target_loss L --max_params N --from RUNS... --extrapolate] [--json F]
    structlm report   RUNS... [--decode_batch B...] [--md F.md] [--csv F.csv]
    structlm export   RUN_DIR OUT_DIR [--format hf-merged] [--dtype fp32|bf16|fp16]
    structlm import   HF_DIR OUT_RUN_DIR
    structlm convert  RUN_OR_HF_DIR OUT_RUN_DIR [--model.ffn.kind K --fraction F --calib FILE]
    structlm serve    RUN_DIR [--host 127.0.0.1 --port 8000 --max_batch 32 --api_key KEY]
    structlm --version

Config flags are generated from the dataclasses in structlm.config by tyro, so `--help` lists every field with
its type, default and comment; unknown flags and bad types are refused before any work starts.
"""  # noqa: E501 -- printed verbatim by `structlm --help`; rewrapping would change that output

from __future__ import annotations

import errno
import importlib
import sys

from structlm._version import __version__

# verb -> the module of its adapter (cmd_<verb>): imported only when that verb runs, so
# `structlm generate` never loads the training loop, the benchmarks or matplotlib
COMMANDS: dict[str, str] = {
    "prepare": "train", "train": "train", "info": "train",
    "eval": "runs", "generate": "runs", "export": "runs", "import": "runs", "convert": "runs",
    "serve": "runs",
    "bench": "bench",
    "sweep": "studies", "scaling": "studies", "plan": "studies", "report": "studies",
}


def command(verb: str):
    """The adapter `cmd_<verb>(argv)` of a verb, from its module under structlm.cli."""
    return getattr(importlib.import_module(f"structlm.cli.{COMMANDS[verb]}"), f"cmd_{verb}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--version":
        print(f"structlm {__version__}")
        return
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("commands:", ", ".join(COMMANDS))
        return
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"structlm: unknown command {cmd!r}; choose one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        sys.exit(2)
    try:
        from structlm.utils.device import reuse_freed_memory

        reuse_freed_memory()
        command(cmd)(rest)
    except (ValueError, OSError, FloatingPointError, ImportError) as e:
        hint = ""
        if isinstance(e, PermissionError):
            hint = " (choose a directory you can write to, e.g. with --train.out_dir)"
        elif isinstance(e, OSError) and e.errno == errno.ENOSPC:
            hint = " (the disk is full: free some space and rerun; runs resume where they stopped)"
        print(f"structlm {cmd}: error: {e}{hint}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\nstructlm {cmd}: interrupted", file=sys.stderr)
        sys.exit(130)
