"""Text generation from a trained run: its tokenizer, its model, pre-merged for small-batch
decoding.

    gen = Generator.load("runs/small")              # pre-merge on by default for structured models
    print(gen.generate("ROMEO:", max_new_tokens=100, temperature=0.8, top_k=200))
    for piece in gen.stream("ROMEO:"): print(piece, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from structlm.data.tokenizer import eot_id
from structlm.linear.merge import premerge as premerge_model
from structlm.linear.merge import thresholds_for
from structlm.runs.run import Run
from structlm.utils.device import autocast, autocast_dtype, autodetect_device


class Generator:
    """A loaded model with its tokenizer, ready to sample text."""

    def __init__(
        self, model, cfg, tokenizer, device: torch.device, dtype: torch.dtype | None
    ) -> None:
        self.model, self.cfg, self.tokenizer, self.device, self.dtype = (
            model, cfg, tokenizer, device, dtype
        )
        self.eot = eot_id(tokenizer) or 0

    @classmethod
    def load(
        cls, run_dir: str | Path | Run, device: str = "auto", dtype: str = "fp32",
        premerge: bool = True, calibrate: bool = False,
    ) -> Generator:
        """Load a run (or anything `Run.open` opens). `premerge` folds each structured FFN layer
        into a dense matrix for calls with few tokens (thresholds from `structlm bench
        crossover`'s cache, measured now if `calibrate`)."""
        dev = autodetect_device(device)
        amp = autocast_dtype(dev, dtype)
        run = run_dir if isinstance(run_dir, Run) else Run.open(run_dir)
        model, cfg = run.load_model(dev)
        if premerge:
            thresholds, _ = thresholds_for(model, dev, amp, calibrate)
            premerge_model(model, thresholds)
        return cls(model, cfg, run.tokenizer(), dev, amp)

    def encode(self, prompt: str) -> list[int]:
        check_text(prompt, "the prompt")
        ids = self.tokenizer.encode(prompt).ids if prompt else []
        ids = ids or [self.eot]
        if max(ids) >= self.cfg.model.vocab_size:
            raise ValueError(
                "the prompt tokenizes to ids outside the model's vocabulary: wrong tokenizer"
            )
        return ids

    def stream(
        self, prompt: str, max_new_tokens: int = 200, *, temperature: float = 0.8,
        top_k: int | None = 200, top_p: float | None = None, seed: int | None = None,
        use_cache: bool = True,
    ) -> Iterator[str]:
        """Yield the generated text piece by piece (whole UTF-8 characters only)."""
        gen = torch.Generator(device=self.device)
        if seed is not None:
            gen.manual_seed(seed)
        idx = torch.tensor([self.encode(prompt)], device=self.device)
        out: list[int] = []
        printed = ""
        with autocast(self.device, self.dtype):
            for nxt in self.model.stream(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                                         top_p=top_p, generator=gen, use_cache=use_cache):
                out.append(int(nxt[0, 0]))
                text = self.tokenizer.decode(out)
                if not text.endswith("\ufffd"):  # wait until a multi-byte character is complete
                    yield text[len(printed):]
                    printed = text
        rest = self.tokenizer.decode(out)[len(printed):]
        if rest:
            yield rest

    def generate(self, prompt: str, max_new_tokens: int = 200, **kw) -> str:
        """The prompt followed by the generated text."""
        return prompt + "".join(self.stream(prompt, max_new_tokens, **kw))


def check_text(text: str, what: str) -> None:
    """Refuse text that is not valid Unicode: bytes that were not UTF-8 (a shell passes them on
    as lone surrogates), naming where."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid UTF-8 (a byte that no UTF-8 character starts with, "
                         f"at character {e.start}); give UTF-8 text") from None
