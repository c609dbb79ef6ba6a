"""Validation loss and perplexity: over batches of (x, y) token windows (`evaluate`), or of a
trained run on its own validation split, another prepared directory or a text file
(`evaluate_run`, what `structlm eval` calls)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from structlm.data.batches import check_tokenizer, eval_batches, load_meta, load_tokens
from structlm.data.prepare import resolve_data_dir
from structlm.data.tokenizer import encode_text_file
from structlm.runs.run import Run
from structlm.utils.device import autocast, autocast_dtype, autodetect_device
from structlm.utils.files import file_sha256


@torch.no_grad()
def evaluate_sums(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
    dtype: torch.dtype | None = None, progress: bool = False, total: int | None = None,
) -> tuple[float, int]:
    """(sum of token losses, number of tokens) over `batches`; the model is put in eval mode and
    back."""
    was_training = model.training
    model.eval()
    loss_sum, n = 0.0, 0
    it = tqdm(batches, total=total, desc="eval", unit="batch", leave=False) if progress else batches
    for x, y in it:
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            _, loss = model(x, y)
        loss_sum += loss.item() * y.numel()  # .item() syncs; eval is not the hot path
        n += y.numel()
    model.train(was_training)
    return loss_sum, n


def evaluate(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
    dtype: torch.dtype | None = None, progress: bool = False, total: int | None = None,
) -> dict[str, float]:
    """{"loss": mean token cross-entropy, "ppl": exp(loss), "tokens": n} over `batches`."""
    s, n = evaluate_sums(model, batches, device, dtype, progress, total)
    if n == 0:
        raise ValueError("evaluation got no tokens; the split is shorter than one sequence")
    loss = s / n
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": n}


def evaluate_run(
    run_dir: str | Path, *, data: str | None = None, text: str | None = None, split: str = "val",
    batch_size: int = 8, max_tokens: int | None = None, device: str = "auto", dtype: str = "auto",
    progress: bool = False, seq_len: int | None = None,
) -> dict:
    """Loss and perplexity of a run's newest checkpoint (or one checkpoint directory) on `text` (a
    file, tokenized with the run's tokenizer), a prepared `data` directory, or the run's own data;
    {"source", "loss", "ppl", "tokens"}."""
    dev = autodetect_device(device)
    run = Run.open(run_dir)
    tokenizer, tok_path = run.tokenizer(), run.tokenizer_path  # a damaged file is named first
    model, cfg = run.load_model(dev)
    if text:
        tokens, source = encode_text_file(text, tokenizer), text
    else:
        data_dir = Path(data) if data else resolve_data_dir(cfg.data)
        check_tokenizer(data_dir, load_meta(data_dir), file_sha256(tok_path), f"the run {run_dir}",
                        "evaluate on data prepared with the run's tokenizer "
                        "(--data.tokenizer RUN/tokenizer.json)")
        tokens, source = load_tokens(data_dir, split), f"{data_dir} ({split})"
    seq = seq_len or cfg.seq_len  # window length: the run's training length unless given
    if not 0 < seq <= cfg.model.block_size:
        raise ValueError(f"seq_len={seq} must be in 1..{cfg.model.block_size} (the context)")
    n_batches = -(-min(len(tokens) - 1, max_tokens or len(tokens)) // (seq * batch_size))
    res = evaluate(model, eval_batches(tokens, seq, batch_size, max_tokens), dev,
                   autocast_dtype(dev, dtype), progress=progress, total=n_batches)
    return {"source": source, **res}
