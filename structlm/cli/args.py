"""Parsing shared by the verbs: argv -> a verb's options dataclass by tyro (a field's comment is its
--help, written once), checked numbers and output files, a RunConfig from a preset or file plus
overrides, row printing.

This module imports nothing heavy (no torch, no structlm library module at import time), so that
`structlm generate --help` or a refused flag costs tyro and nothing else.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import math
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import tyro
from tyro.constructors import PrimitiveConstructorSpec

T = TypeVar("T")

# a nested dataclass whose flags appear without its field's name (--flops, not --plan.flops)
FLAT = tyro.conf.arg(name="")
# how the verbs' own options read: booleans are plain switches (--json), None is no value
OPTIONS = (tyro.conf.FlagCreatePairsOff, tyro.conf.DisallowNone)


def parse(cls: type[T], argv: list[str], prog: str, default: Any = None) -> T:
    """argv -> cls (a dataclass of options) by tyro, then `ready()`. Bad flags and values exit 2
    with tyro's message naming the flag; -h/--help prints every field with its comment."""
    out = tyro.cli(cls, args=argv, prog=prog, use_underscores=True, config=OPTIONS,
                   **({} if default is None else {"default": default}))
    ready()
    return out


def draft(cls: type, argv: list[str]) -> Any | None:
    """argv parsed into a copy of the dataclass `cls` whose fields skip their checks (nested
    dataclasses without __post_init__), or None where argv does not parse (the real parse then
    says why) or asks for --help: a first pass for a value that decides the real parse's defaults
    (`structlm sweep FILE.toml` anywhere among the flags)."""
    try:
        return tyro.cli(_unchecked(cls), args=argv, use_underscores=True, config=OPTIONS,
                        console_outputs=False)
    except SystemExit:
        return None


def defaults(cls: type[T], **values: Any) -> T:
    """An instance of the dataclass `cls` holding `values` (the fields' own defaults elsewhere),
    made without __init__ and so unchecked: the `default` of a tyro parse, which checks what it
    returns by constructing `cls` from the merged values."""
    out = object.__new__(cls)
    for f in dataclasses.fields(cls):
        v = values[f.name] if f.name in values else (
            f.default if f.default_factory is dataclasses.MISSING else f.default_factory())
        object.__setattr__(out, f.name, v)
    return out


def _unchecked(cls: type) -> type:
    hints = typing.get_type_hints(cls, include_extras=True)

    def strip(t):
        if typing.get_origin(t) is Annotated:
            inner, *meta = typing.get_args(t)
            return Annotated[(strip(inner), *meta)]
        return _unchecked(t) if dataclasses.is_dataclass(t) else t
    return dataclasses.make_dataclass(cls.__name__, [
        (f.name, strip(hints[f.name]),
         dataclasses.field(default=f.default, default_factory=f.default_factory))
        for f in dataclasses.fields(cls)])


def ready() -> None:
    """What every verb does once its command line is accepted, before any work: the allocator
    setting (`reuse_freed_memory`), imported here so that --help and refused flags load no torch."""
    from structlm.utils.device import reuse_freed_memory

    reuse_freed_memory()


# --- checked values: a tyro constructor for each, with the message a bad value gets ---------------


def _checked(cast: Callable[[str], Any], test: Callable[[Any], bool], what: str):
    def parse_one(text: str):
        try:
            v = cast(text)
        except ValueError:
            v = None
        if v is None or not test(v):
            raise ValueError(f"{text!r} is not {what}")
        return v
    return parse_one


def _spec(parse_one: Callable[[str], Any], metavar: str, kind: type | tuple[type, ...],
          many: bool = False):
    """A tyro constructor: one value (or, many=True, a tuple of them) parsed by `parse_one`; None
    passes as a default (for `T | None` fields)."""
    if many:
        return PrimitiveConstructorSpec(
            nargs="+", metavar=f"{metavar} [{metavar} ...]",
            instance_from_str=lambda args: tuple(map(parse_one, args)),
            is_instance=lambda x: x is None or (isinstance(x, tuple)
                                                and all(isinstance(v, kind) for v in x)),
            str_from_instance=lambda x: ["None"] if x is None else [str(v) for v in x])
    return PrimitiveConstructorSpec(
        nargs=1, metavar=metavar, instance_from_str=lambda args: parse_one(args[0]),
        is_instance=lambda x: x is None or isinstance(x, kind),
        str_from_instance=lambda x: [str(x)])


positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
nonnegative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
port_number = _checked(int, lambda v: 0 <= v <= 65535, "a port number (0-65535)")


def output_path(text: str) -> str:
    """A file to write at the end of a command, checked before its work: its folder is made now
    (so a long benchmark does not lose its rows to a missing folder); a folder is refused."""
    path = Path(text)
    if path.is_dir():
        raise ValueError(f"{text!r} is a folder; give a file name in it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot make the folder of {text!r}: {e}") from e
    return text


# Annotated[int, POSITIVE_INT] (or Annotated[int | None, POSITIVE_INT]) in an options dataclass
POSITIVE_INT = _spec(positive_int, "INT", int)
POSITIVE_INTS = _spec(positive_int, "INT", int, many=True)
NONNEGATIVE_INT = _spec(nonnegative_int, "INT", int)
POSITIVE_FLOAT = _spec(positive_float, "FLOAT", (int, float))
PORT = _spec(port_number, "PORT", int)
OUTPUT_FILE = _spec(output_path, "FILE", str)
PATHS = _spec(str, "PATH", str, many=True)  # one or more


def one_of(choices: tuple[str, ...] | Callable[[], tuple[str, ...]], many: bool = False,
           **arg: Any):
    """A str field (many=True: a tuple of them) restricted to `choices`, a table of the library,
    or a function returning it when this verb's parser is built (so that importing the CLI module
    does not import the library); `arg` as for tyro.conf.arg (name, metavar)."""
    def factory():
        kind = typing.Literal[tuple(choices() if callable(choices) else choices)]
        return tuple[kind, ...] if many else kind

    def hint(label: str) -> str:  # tyro labels a constructor_factory's default "['lowrank']"
        try:
            values = ast.literal_eval(label)
        except (ValueError, SyntaxError):
            values = label
        if isinstance(values, list):
            values = " ".join(map(str, values)) or "all"
        return f"(default: {values})"
    return tyro.conf.arg(constructor_factory=factory, help_behavior_hint=hint, **arg)


# --- a RunConfig from --preset / --config / --resume plus --model.* ... overrides -----------------


def _preset_hint(default: str) -> str:
    from structlm.config import DEFAULT_PRESET, PRESETS

    return f"(one of {', '.join(sorted(PRESETS))}; default {DEFAULT_PRESET})"


@dataclasses.dataclass(frozen=True)
class RunSource:
    """Where the run's configuration starts; every --model.* / --data.* / --optim.* / --train.*
    flag then overrides a field of it."""

    # start from this preset
    preset: Annotated[str | None, tyro.conf.arg(help_behavior_hint=_preset_hint)] = None
    config: str | None = None  # start from a saved config.json instead of a preset

    def base(self):
        """The RunConfig the overrides apply to (ValueError / FileNotFoundError naming the flag)."""
        from structlm.config import DEFAULT_PRESET, PRESETS, load_run_config

        resume = getattr(self, "resume", None)
        if sum(bool(v) for v in (self.preset, self.config, resume)) > 1:
            raise ValueError("give only one of --preset, --config, --resume")
        if resume:
            from structlm.training.rundir import refuse_checkpoint_dir

            run = Path(resume)
            if not (run / "config.json").exists():
                what = ("does not exist" if not run.exists()
                        else "holds no config.json (not a structlm run)")
                raise FileNotFoundError(f"--resume {run}: the directory {what}")
            refuse_checkpoint_dir(run, "--resume")
            base = load_run_config(str(run / "config.json"))
            base.train.out_dir = str(run)
            return base
        if self.config:
            return load_run_config(self.config)
        name = self.preset or DEFAULT_PRESET
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]()


@dataclasses.dataclass(frozen=True)
class ResumableSource(RunSource):
    """Where the run's configuration starts (or the run it continues); every --model.* /
    --data.* / --optim.* / --train.* flag then overrides a field of it."""

    resume: str | None = None  # continue the run in this directory
    # with --resume: allow changed optim.* / train.dtype fields (e.g. a lower lr after a loss
    # spike); recorded in the run
    override: bool = False

    def base(self):
        if self.override and not self.resume:
            raise ValueError("--override changes a run being resumed; give it with --resume "
                             "RUN_DIR")
        return super().base()


def parse_run_config(prog: str, argv: list[str], options: type | None = None,
                     source: type[RunSource] = RunSource, description: str | None = None):
    """argv -> (RunConfig, source, options): `--preset NAME`, `--config FILE` or `--resume DIR`
    (`source`) picks the starting RunConfig, every `--a.b.c value` then overrides it, and the
    verb's own flags fill `options` (a dataclass, or None) -- one tyro parser for all of them, so
    --help lists them together.

    `source` is read first (tyro, ignoring the other flags), since it decides the defaults the
    overrides apply to; then one tyro pass over everything."""
    from structlm.config import RunConfig

    first, _ = tyro.cli(source, args=argv, prog=prog, return_unknown_args=True, add_help=False,
                        use_underscores=True, config=OPTIONS)
    base = first.base()
    _switch_ffn_kind(base, argv)
    fields: list[Any] = [("source", Annotated[source, FLAT, *OPTIONS])]
    if options is not None:
        fields.append(("options", Annotated[options, FLAT, *OPTIONS]))
    # booleans of the config take a value: --train.compile True
    fields.append(("run", Annotated[RunConfig, FLAT, tyro.conf.FlagConversionOff],
                   dataclasses.field(default_factory=lambda: base)))
    args = tyro.cli(dataclasses.make_dataclass("Args", fields, frozen=True), args=argv, prog=prog,
                    description=" ".join((description or "").split()), use_underscores=True)
    cfg, src = args.run, args.source
    resume = getattr(src, "resume", None)
    if resume and Path(cfg.train.out_dir) != Path(resume):
        raise ValueError(f"--resume {resume} continues the run in that directory; drop "
                         f"--train.out_dir {cfg.train.out_dir} (to start a new run there from "
                         f"this one's weights, use --train.init_from {resume})")
    ready()
    return cfg, src, getattr(args, "options", None)


def _switch_ffn_kind(base, argv: list[str]) -> None:
    """When `--model.ffn.kind` changes the kind, drop the base's hyper-parameters the new kind
    does not take (so `--model.ffn.kind blockshuffle --model.ffn.nblocks 4` works on a LowRank
    preset). Read by a one-flag argparse pre-parser: tyro then parses every flag against the
    switched base."""
    from structlm.linear.registry import LINEARS

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--model.ffn.kind", dest="kind", nargs="?")
    kind = pre.parse_known_args(argv)[0].kind
    if kind in LINEARS and kind != base.model.ffn.kind:
        base.model.ffn = base.model.ffn.with_kind(kind)


def print_rows(rows: list[dict], cols: tuple[str, ...]) -> None:
    cols = [c for c in cols if any(c in r for r in rows)]
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    widths = [max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(cell(r.get(c)).rjust(w) for c, w in zip(cols, widths, strict=True)))
