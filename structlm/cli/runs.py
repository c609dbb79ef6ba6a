"""Verbs on a finished run: eval, generate, serve, export, import, convert."""

from __future__ import annotations

import argparse
import json
import sys

from structlm.cli.args import nonnegative_int, port_number, positive_float, positive_int
from structlm.linear.registry import LINEARS
from structlm.model.sampling import check_sampling
from structlm.runs.convert import convert_run
from structlm.runs.evaluate import evaluate_run
from structlm.runs.export import default_format, export_run
from structlm.runs.generate import Generator
from structlm.runs.importer import import_hf


def cmd_eval(argv: list[str]) -> None:
    """Loss and perplexity of a trained run on its validation split, another prepared dir, or a text
    file."""
    p = argparse.ArgumentParser(prog="structlm eval", description=cmd_eval.__doc__)
    p.add_argument("run_dir", help="a run directory (or one checkpoint directory)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--data", default=None, help="a prepared data directory (its val split is used)")
    g.add_argument("--text", default=None, help="a text file, tokenized with the run's tokenizer")
    p.add_argument("--split", default="val", choices=["train", "val"],
                   help="split of --data / the run's data")
    p.add_argument("--batch_size", type=positive_int, default=8, help="sequences per forward")
    p.add_argument("--seq_len", type=positive_int, default=None,
                   help="window length (default: the run's training sequence length)")
    p.add_argument("--max_tokens", type=positive_float, default=None,
                   help="evaluate at most this many tokens")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    max_tokens = int(a.max_tokens) if a.max_tokens else None
    res = evaluate_run(a.run_dir, data=a.data, text=a.text, split=a.split,
                       batch_size=a.batch_size, max_tokens=max_tokens, device=a.device,
                       dtype=a.dtype, progress=sys.stderr.isatty(), seq_len=a.seq_len)
    if a.json:
        print(json.dumps(res))
    else:
        print(f"{res['source']}: loss {res['loss']:.4f} | ppl {res['ppl']:.2f} | "
              f"{res['tokens']:,} tokens")


def cmd_serve(argv: list[str]) -> None:
    """An OpenAI-compatible server (completions, chat completions, streaming) with continuous
    batching and per-step pre-merge."""
    p = argparse.ArgumentParser(prog="structlm serve", description=cmd_serve.__doc__)
    p.add_argument("run_dir", help="a run directory (or one checkpoint directory)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument("--max_batch", type=positive_int, default=32,
                   help="sequences decoded together (KV cache slots)")
    p.add_argument("--max_tokens", type=positive_int, default=1024,
                   help="the most tokens one request may generate")
    p.add_argument("--max_queue", type=positive_int, default=256,
                   help="requests waiting for a slot before new ones get 429")
    p.add_argument("--prefill_chunk", type=positive_int, default=256,
                   help="prompt tokens prefilled per engine step")
    p.add_argument("--api_key", default=None, help="require Authorization: Bearer API_KEY")
    p.add_argument("--context", type=positive_int, default=None,
                   help="tokens per sequence the KV cache holds (default: the model's context, "
                        "at most 4096; the cache takes max_batch x context positions)")
    p.add_argument("--no_premerge", action="store_true", help="decode with the structured factors")
    p.add_argument("--calibrate", action="store_true", help="measure pre-merge thresholds first")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    a = p.parse_args(argv)
    from structlm.serving.server import serve

    serve(a.run_dir, a.host, a.port, device=a.device, dtype=a.dtype, max_batch=a.max_batch,
          max_queue=a.max_queue, prefill_chunk=a.prefill_chunk, premerge=not a.no_premerge,
          calibrate=a.calibrate, max_tokens=a.max_tokens, api_key=a.api_key, context=a.context)


def cmd_generate(argv: list[str]) -> None:
    """Sample text from a trained run with the KV cache, streaming tokens to the terminal."""
    p = argparse.ArgumentParser(prog="structlm generate", description=cmd_generate.__doc__)
    p.add_argument("run_dir", help="a run directory (or one checkpoint directory)")
    p.add_argument("--prompt", default="", help="text to continue (empty: start of a document)")
    p.add_argument("--max_new_tokens", type=nonnegative_int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=200, help="sample from the k likeliest (>= 1)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling, in (0, 1]")
    p.add_argument("--num_samples", type=positive_int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no_cache", action="store_true",
                   help="recompute the whole context every token")
    p.add_argument("--no_premerge", action="store_true", help="decode with the structured factors")
    p.add_argument("--calibrate", action="store_true", help="measure pre-merge thresholds first")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32", choices=["auto", "bf16", "fp32"])
    a = p.parse_args(argv)
    check_sampling(a.temperature, a.top_k, a.top_p)  # before the model is loaded
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


def cmd_export(argv: list[str]) -> None:
    """Write a run as a transformers model directory (loads with no structlm installed)."""
    p = argparse.ArgumentParser(prog="structlm export", description=cmd_export.__doc__)
    p.add_argument("run_dir", help="a run directory (or one checkpoint directory)")
    p.add_argument("out_dir", help="a new (or empty) directory to write")
    p.add_argument("--format", default=None, choices=["hf", "hf-merged"],
                   help="hf (default for structured runs): the factors themselves, loaded with "
                        "trust_remote_code=True; hf-merged (default for dense runs): folded into "
                        "a native Llama / GPT-2 / GPT-NeoX")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    a = p.parse_args(argv)
    fmt = a.format or default_format(a.run_dir)
    out = export_run(a.run_dir, a.out_dir, fmt, a.dtype)
    remote = ", trust_remote_code=True" if fmt == "hf" else ""
    print(f"exported {a.run_dir} to {out} as {fmt} (logits checked against structlm's)\n"
          f"load it: transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}{remote})")


def cmd_import(argv: list[str]) -> None:
    """Turn a local transformers checkpoint (Llama, GPT-2, GPT-NeoX; safetensors) into a run."""
    p = argparse.ArgumentParser(prog="structlm import", description=cmd_import.__doc__)
    p.add_argument("hf_dir", help="a directory with config.json, *.safetensors, tokenizer.json")
    p.add_argument("out_dir", help="the structlm run directory to write (new or empty)")
    a = p.parse_args(argv)
    out = import_hf(a.hf_dir, a.out_dir)
    print(f"imported {a.hf_dir} to {out}\n"
          f"evaluate: structlm eval {out} --text FILE\n"
          f"train from it: structlm train --config {out}/config.json --train.init_from {out} "
          "--train.out_dir runs/NEW")


def cmd_convert(argv: list[str]) -> None:
    """Structure a dense run or Hugging Face checkpoint: FFN factors projected from the weights."""
    p = argparse.ArgumentParser(prog="structlm convert", description=cmd_convert.__doc__)
    p.add_argument("source", help="a structlm run, a transformers directory or a .gguf file")
    p.add_argument("out_dir", help="the structured run directory to write (new or empty)")
    p.add_argument("--model.ffn.kind", dest="kind", default="lowrank",
                   choices=[k for k in LINEARS if k != "dense"])
    p.add_argument("--fraction", type=positive_float, default=0.32,
                   help="share of the dense FFN parameters to keep (paper: 0.63, 0.32)")
    p.add_argument("--calib", default=None,
                   help="a text file: activation-aware projection on its first tokens")
    a = p.parse_args(argv)
    out, report = convert_run(a.source, a.out_dir, a.kind, a.fraction, a.calib)
    before = sum(r["params_before"] for r in report)
    after = sum(r["params_after"] for r in report)
    err = max(r["rel_error"] for r in report)
    print(f"converted {len(report)} FFN layers of {a.source} to {a.kind}: {before:,} -> {after:,} "
          f"weights, relative error <= {err:.3f} (per layer: {out}/conversion.json)\n"
          f"heal it: structlm train --config {out}/config.json --train.init_from {out} "
          "--train.out_dir runs/NEW")
