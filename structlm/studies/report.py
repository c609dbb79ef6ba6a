"""The paper's Table 1 / Table 2 layout for any set of finished runs, as Markdown and CSV.

    structlm report runs/cpu-study/scaling --decode_batch 64 256 1024 --md table.md --csv table.csv

Columns: run, family, model size (the paper's: matrices + tied embedding), FFN size (FFN
matrices), all parameters, tokens, training FLOPs, training time, validation perplexity and, with
--decode_batch, decode throughput: tokens/s of one decode step of a batch at the last position
of a `gen`-token KV cache (the paper's "max throughput, generation 256"; on a CPU memory does not
bound the batch, so the best over the given batches is reported). Throughput depends only on the
architecture, so it is measured on freshly initialised models of each run's config, all timed
interleaved in one process so their ratios are comparable.
"""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

import torch

from structlm.bench.decode import decode_step
from structlm.config import ModelConfig, from_dict
from structlm.model.gpt import GPT
from structlm.studies.scaling import collect, read_summary
from structlm.utils.device import autocast_dtype, autodetect_device
from structlm.utils.timing import time_interleaved

COLUMNS = [  # (key, header)
    ("run", "run"), ("family", "family"), ("matrix_params", "model size (M)"),
    ("ffn_matrix_params", "FFN size (M)"), ("params", "all params (M)"), ("tokens", "tokens (M)"),
    ("train_flops", "training FLOPs"), ("hours", "time (h)"), ("val_ppl", "val PPL"),
    ("decode_tokens_per_s", "decode tokens/s"),
]


def report_rows(paths: list[str]) -> list[dict]:
    """One row per finished run (summary.json), with the Table 1 / 2 quantities."""
    rows = []
    for r in collect(paths):
        s = read_summary(Path(r["summary_file"]))
        g = s["param_groups"]
        rows.append({
            "run": r["run"], "family": r["family"], "matrix_params": g["matrix"],
            "ffn_matrix_params": g["ffn_matrix"], "params": g["total"], "tokens": s["tokens"],
            "train_flops": s["train_flops"], "hours": s["wall_time_s"] / 3600,
            "val_ppl": s["final_val_ppl"], "val_loss": s["final_val_loss"],
            "model": s["config"]["model"], "run_dir": r["run_dir"],
        })
    rows.sort(key=lambda r: (r["family"] != "dense", r["family"], r["train_flops"]))
    return rows


def measure_decode(
    rows: list[dict], batches: list[int], gen: int = 256, reps: int = 7, device: str = "auto",
    dtype: str = "auto",
) -> None:
    """Fill rows' decode_tokens_per_s in place: the best over `batches` of the median of `reps`
    interleaved repetitions (all runs timed together at each batch)."""
    dev = autodetect_device(device)
    amp = autocast_dtype(dev, dtype)
    for batch in batches:
        fns = {}
        for r in rows:
            cfg = from_dict(ModelConfig, r["model"])
            model = GPT(cfg).to(dev).eval()
            fns[r["run"]] = decode_step(model, batch, min(gen, cfg.block_size), dev, amp)
        times = time_interleaved(fns, dev, reps=reps, min_time=0.05)
        for r in rows:
            tps = batch / statistics.median(times[r["run"]])
            r.setdefault("decode_by_batch", {})[batch] = tps
            if tps > r.get("decode_tokens_per_s", 0.0):
                r["decode_tokens_per_s"], r["decode_batch"] = tps, batch
        fns = times = None  # free this batch's caches before the next
    for r in rows:
        r["decode_gen"] = min(gen, r["model"]["block_size"])
        r["decode_dtype"] = str(amp or torch.float32).replace("torch.", "")


def _cell(key: str, v) -> str:
    if v is None:
        return "-"
    if key.endswith("params") or key == "tokens":
        return f"{v / 1e6:.2f}"
    if key == "train_flops":
        return f"{v:.3e}"
    if key == "hours":
        return f"{v:.3f}"
    if key == "val_ppl":
        return f"{v:.2f}"
    if key == "decode_tokens_per_s":
        return f"{v:,.0f}"
    return str(v)


def to_markdown(rows: list[dict]) -> str:
    cols = [(k, h) for k, h in COLUMNS if k != "decode_tokens_per_s"
            or any("decode_tokens_per_s" in r for r in rows)]
    best = min((r["val_ppl"] for r in rows), default=None)
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [_cell(k, r.get(k)) for k, _ in cols]
        if r["val_ppl"] == best:  # the best perplexity in bold, as the paper's tables
            i = [k for k, _ in cols].index("val_ppl")
            cells[i] = f"**{cells[i]}**"
        lines.append("| " + " | ".join(cells) + " |")
    if rows and "decode_by_batch" in rows[0]:
        r = rows[0]
        batches = ", ".join(str(b) for b in r["decode_by_batch"])
        lines.append(f"\ndecode tokens/s: the best over batches {batches} of one decode step at "
                     f"position {r['decode_gen']} ({r['decode_dtype']}; median of interleaved "
                     "repetitions; the batch that gave it is in the CSV)")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    keys = [k for k, _ in COLUMNS] + ["val_loss", "decode_batch", "decode_gen", "run_dir"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in keys})
    return buf.getvalue()


def report_runs(
    paths: list[str], *, decode_batch: list[int] | None = None, gen: int = 256,
    md: str | None = None, csv_path: str | None = None,
) -> list[dict]:
    """Print the Markdown table of the runs under `paths`; write it (and a CSV) if asked."""
    rows = report_rows(paths)
    if decode_batch:
        measure_decode(rows, decode_batch, gen)
    text = to_markdown(rows)
    print(text)
    for path, body in ((md, text), (csv_path, to_csv(rows) if csv_path else "")):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(body)
            print(f"wrote {path}")
    return rows
