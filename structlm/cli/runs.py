"""Verbs on a finished run: eval, generate, serve, export, import, convert.

Each verb's options are one frozen dataclass (a field's comment is its --help); the library is
imported inside each cmd_*, after its command line is accepted, so `structlm generate --help`
loads neither torch nor the training loop.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Annotated, Literal

import tyro

from structlm.cli.args import (
    NONNEGATIVE_INT,
    PORT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    one_of,
    parse,
)

Positional = tyro.conf.Positional
RunDir = Annotated[str, Positional, tyro.conf.arg(metavar="RUN_DIR")]
_SOURCE = tyro.conf.create_mutex_group(required=False, title="what to evaluate on (at most one)")


def _structured_kinds() -> tuple[str, ...]:
    from structlm.linear.registry import LINEARS

    return tuple(k for k in LINEARS if k != "dense")


@dataclass(frozen=True)
class EvalOptions:
    """Loss and perplexity of a trained run on its validation split, another prepared dir, or a
    text file."""

    run_dir: RunDir  # a run directory (or one checkpoint directory)
    data: Annotated[str | None, _SOURCE] = None  # a prepared data directory (its val split is used)
    text: Annotated[str | None, _SOURCE] = None  # a text file, tokenized with the run's tokenizer
    split: Literal["train", "val"] = "val"  # split of --data / the run's data
    batch_size: Annotated[int, POSITIVE_INT] = 8  # sequences per forward
    # window length (default: the run's training sequence length)
    seq_len: Annotated[int | None, POSITIVE_INT] = None
    max_tokens: Annotated[float | None, POSITIVE_FLOAT] = None  # evaluate at most this many tokens
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where the hardware is fast at it
    json: bool = False  # print one JSON object


def cmd_eval(argv: list[str]) -> None:
    a = parse(EvalOptions, argv, "structlm eval")
    from structlm.runs.evaluate import evaluate_run

    max_tokens = int(a.max_tokens) if a.max_tokens else None
    res = evaluate_run(a.run_dir, data=a.data, text=a.text, split=a.split,
                       batch_size=a.batch_size, max_tokens=max_tokens, device=a.device,
                       dtype=a.dtype, progress=sys.stderr.isatty(), seq_len=a.seq_len)
    if a.json:
        print(json.dumps(res))
    else:
        print(f"{res['source']}: loss {res['loss']:.4f} | ppl {res['ppl']:.2f} | "
              f"{res['tokens']:,} tokens")


@dataclass(frozen=True)
class ServeOptions:
    """An OpenAI-compatible server (completions, chat completions, streaming) with continuous
    batching and per-step pre-merge."""

    run_dir: RunDir  # a run directory (or one checkpoint directory)
    host: str = "127.0.0.1"  # address to bind (loopback by default)
    port: Annotated[int, PORT] = 8000  # port to listen on (0: any free one)
    max_batch: Annotated[int, POSITIVE_INT] = 32  # sequences decoded together (KV cache slots)
    max_tokens: Annotated[int, POSITIVE_INT] = 1024  # the most tokens one request may generate
    # requests waiting for a slot before new ones get 429
    max_queue: Annotated[int, POSITIVE_INT] = 256
    prefill_chunk: Annotated[int, POSITIVE_INT] = 256  # prompt tokens prefilled per engine step
    api_key: str | None = None  # require Authorization: Bearer API_KEY (on /v1 and /metrics)
    # the largest request body in MiB; a larger one is answered 413 before it is parsed
    max_body_mb: Annotated[float, POSITIVE_FLOAT] = 4.0
    # seconds in-flight requests get to finish after SIGTERM or Ctrl-C
    graceful_timeout: Annotated[float, POSITIVE_FLOAT] = 30.0
    # tokens per sequence the KV cache holds (default: the model's context, at most 4096; the cache
    # takes max_batch x context positions)
    context: Annotated[int | None, POSITIVE_INT] = None
    no_premerge: bool = False  # decode with the structured factors
    calibrate: bool = False  # measure pre-merge thresholds first
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where the hardware is fast at it


def cmd_serve(argv: list[str]) -> None:
    a = parse(ServeOptions, argv, "structlm serve")
    from structlm.serving.server import serve

    serve(a.run_dir, a.host, a.port, device=a.device, dtype=a.dtype, max_batch=a.max_batch,
          max_queue=a.max_queue, prefill_chunk=a.prefill_chunk, premerge=not a.no_premerge,
          calibrate=a.calibrate, max_tokens=a.max_tokens, api_key=a.api_key, context=a.context,
          max_body_mb=a.max_body_mb, graceful_timeout=a.graceful_timeout)


@dataclass(frozen=True)
class GenerateOptions:
    """Sample text from a trained run with the KV cache, streaming tokens to the terminal."""

    run_dir: RunDir  # a run directory (or one checkpoint directory)
    prompt: str = ""  # text to continue (empty: start of a document)
    max_new_tokens: Annotated[int, NONNEGATIVE_INT] = 200  # tokens to generate per sample
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 200  # sample from the k likeliest (>= 1)
    top_p: float | None = None  # nucleus sampling, in (0, 1]
    num_samples: Annotated[int, POSITIVE_INT] = 1  # samples, each with the next seed
    seed: int = 1337  # the first sample's seed
    no_cache: bool = False  # recompute the whole context every token
    no_premerge: bool = False  # decode with the structured factors
    calibrate: bool = False  # measure pre-merge thresholds first
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    dtype: Literal["auto", "bf16", "fp32"] = "fp32"  # auto: bf16 where the hardware is fast at it


def cmd_generate(argv: list[str]) -> None:
    a = parse(GenerateOptions, argv, "structlm generate")
    from structlm.model.sampling import check_sampling
    from structlm.runs.generate import Generator, check_text

    check_sampling(a.temperature, a.top_k, a.top_p)  # before the model is loaded
    check_text(a.prompt, "--prompt")
    gen = Generator.load(a.run_dir, a.device, a.dtype, premerge=not a.no_premerge,
                         calibrate=a.calibrate)
    for i in range(a.num_samples):
        sys.stdout.write(a.prompt)
        for piece in gen.stream(a.prompt, a.max_new_tokens, temperature=a.temperature,
                                top_k=a.top_k, top_p=a.top_p, seed=a.seed + i,
                                use_cache=not a.no_cache):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if i + 1 < a.num_samples:
            print("-" * 40)


@dataclass(frozen=True)
class ExportOptions:
    """Write a run as a transformers model directory (loads with no structlm installed) or as one
    GGUF file (llama.cpp, ollama, LM Studio)."""

    run_dir: RunDir  # a run directory (or one checkpoint directory)
    # a new (or empty) directory to write; a new file ending in .gguf for --format gguf
    out_dir: Annotated[str, Positional, tyro.conf.arg(metavar="OUT")]
    # hf (default for structured runs): the factors themselves, loaded with trust_remote_code=True;
    # hf-merged (default for dense runs): folded into a native Llama / GPT-2 / GPT-NeoX;
    # gguf (default for OUT ending in .gguf): the merged model as a Llama GGUF file
    format: Literal["hf", "hf-merged", "gguf"] | None = None
    # the weights' dtype in the export (q8_0: gguf only; f32 / f16 are fp32 / fp16)
    dtype: Literal["fp32", "bf16", "fp16", "f32", "f16", "q8_0"] = "fp32"


def cmd_export(argv: list[str]) -> None:
    a = parse(ExportOptions, argv, "structlm export")
    from structlm.runs.export import default_format, export_run

    fmt = a.format or default_format(a.run_dir, a.out_dir)
    out = export_run(a.run_dir, a.out_dir, fmt, a.dtype)
    print(f"exported {a.run_dir} to {out} as {fmt} (logits checked against structlm's)")
    if fmt == "gguf":
        print(f"run it: llama-server -m {out}   (or transformers: from_pretrained("
              f"{str(out.parent)!r}, gguf_file={out.name!r}))")
    else:
        remote = ", trust_remote_code=True" if fmt == "hf" else ""
        print(f"load it: transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}{remote})")


@dataclass(frozen=True)
class ImportOptions:
    """Turn a local transformers checkpoint (Llama, GPT-2, GPT-NeoX; safetensors or GGUF) into a
    run."""

    # a directory with config.json, *.safetensors, tokenizer.json (or a .gguf file)
    hf_dir: Annotated[str, Positional, tyro.conf.arg(metavar="HF_DIR")]
    # the structlm run directory to write (new or empty)
    out_dir: Annotated[str, Positional, tyro.conf.arg(metavar="OUT_RUN_DIR")]


def cmd_import(argv: list[str]) -> None:
    a = parse(ImportOptions, argv, "structlm import")
    from structlm.runs.importer import import_hf

    out = import_hf(a.hf_dir, a.out_dir)
    print(f"imported {a.hf_dir} to {out}\n"
          f"evaluate: structlm eval {out} --text FILE\n"
          f"train from it: structlm train --config {out}/config.json --train.init_from {out} "
          "--train.out_dir runs/NEW")


@dataclass(frozen=True)
class ConvertOptions:
    """Structure a dense run or Hugging Face checkpoint: FFN factors projected from the weights."""

    # a structlm run, a transformers directory or a .gguf file
    source: Annotated[str, Positional, tyro.conf.arg(metavar="RUN_OR_HF_DIR")]
    # the structured run directory to write (new or empty)
    out_dir: Annotated[str, Positional, tyro.conf.arg(metavar="OUT_RUN_DIR")]
    # the structure of the FFN layers (a registered kind other than dense)
    kind: Annotated[str, one_of(_structured_kinds, name="model.ffn.kind")] = "lowrank"
    # share of the dense FFN parameters to keep (paper: 0.63, 0.32)
    fraction: Annotated[float, POSITIVE_FLOAT] = 0.32
    calib: str | None = None  # a text file: activation-aware projection on its first tokens
    # uniform: every FFN linear keeps `fraction` of its weights; error (lowrank): `fraction` of
    # all FFN weights, spent per layer where it removes the most (activation-weighted) error;
    # sensitivity (lowrank, --calib): each layer's error weighed by its effect on the outputs
    allocate: Literal["uniform", "error", "sensitivity"] = "uniform"


def cmd_convert(argv: list[str]) -> None:
    a = parse(ConvertOptions, argv, "structlm convert")
    from structlm.runs.convert import convert_run

    out, report = convert_run(a.source, a.out_dir, a.kind, a.fraction, a.calib, a.allocate)
    before = sum(r["params_before"] for r in report)
    after = sum(r["params_after"] for r in report)
    err = max(r["rel_error"] for r in report)
    print(f"converted {len(report)} FFN layers of {a.source} to {a.kind}: {before:,} -> {after:,} "
          f"weights, relative error <= {err:.3f} (per layer: {out}/conversion.json)\n"
          f"heal it: structlm train --config {out}/config.json --train.init_from {out} "
          f"--data.source TEXT --data.tokenizer {out}/tokenizer.json --train.max_steps N "
          "--optim.lr 3e-4 --train.out_dir runs/NEW")
