"""Continuous batching: requests join and leave a running decode batch at step boundaries.

Every request owns one slot of a `SlotCache` (its own length, no padding to the longest). Each
engine step prefills at most `prefill_chunk` prompt tokens (new prompts in arrival order; a long
prompt is cut into chunks over several steps, so it delays the running streams by one chunk per
step, not by its whole length), then runs one decode forward for every running request together.
A structured model is pre-merged: each layer takes its merged dense matrix or its factors by the
number of tokens in the call, so the dispatch follows the batch size step by step (counted per
layer shape for /metrics).

The engine runs in its own thread; `submit` and `cancel` are safe from any thread, and a request's
`emit` callback receives its text deltas and the finish reason from the engine thread. Its
`observer` hears the timings and counts of every request (structlm.serving.metrics turns them into
Prometheus metrics).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer
from torch import nn

from structlm.linear.merge import PreMergedLinear
from structlm.model.cache import SlotCache
from structlm.model.sampling import sample_rows
from structlm.utils.device import autocast


class QueueFull(RuntimeError):
    """More requests are waiting than the queue holds."""


class ContextTooLong(ValueError):
    """A prompt leaves no room in the context for one generated token."""


@dataclass
class Event:
    """What a request receives: a text delta, and at the end a finish reason and the counts."""

    text: str
    finish_reason: str | None = None  # "stop" | "length" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Observer:
    """What the engine reports as requests move through it, from the engine thread (no-op here).
    Times are seconds of `time.monotonic`."""

    def admitted(self, queued_s: float) -> None:
        """A request left the queue for a slot after `queued_s` in it."""

    def prefilled(self, tokens: int) -> None:
        """A request's whole prompt of `tokens` tokens is in the cache."""

    def token(self, gap_s: float, first: bool, output: bool) -> None:
        """A request sampled a token, `gap_s` after its previous one (the first: after its
        arrival); `output`: the token is part of the completion (not the end-of-text token)."""

    def finished(self, reason: str, e2e_s: float) -> None:
        """A request ended ("stop", "length", "cancelled" or "error") `e2e_s` after arriving."""


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # engine state
    slot: int = -1
    prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    sent: str = ""  # the text emitted so far
    cancelled: bool = False
    done: bool = False
    generator: torch.Generator | None = None
    # when it arrived (the API passes its handler's start)
    submitted: float = field(default_factory=time.monotonic)
    queued: float = 0.0  # when `submit` queued it
    last_token: float | None = None  # when it sampled its latest token


@dataclass
class Stats:
    """Counters of the engine's work (plain ints and floats, read without a lock); /metrics
    reports the step-level ones (structlm.serving.metrics)."""

    requests: dict = field(default_factory=lambda: {"stop": 0, "length": 0, "cancelled": 0,
                                                    "error": 0})
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    prefill_chunks: int = 0
    last_batch: int = 0
    peak_batch: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=256))  # (time, tokens) per step

    def tokens_per_s(self, window: float = 10.0) -> float:
        now = time.monotonic()
        pts = [(t, n) for t, n in list(self.recent) if now - t <= window]
        return sum(n for _, n in pts) / window if pts else 0.0


class Engine:
    def __init__(
        self, model: nn.Module, tokenizer: Tokenizer, eos: int, *, max_batch: int = 32,
        max_queue: int = 256, prefill_chunk: int = 256, device: torch.device | None = None,
        dtype: torch.dtype | None = None, max_len: int | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.model, self.tokenizer, self.eos = model, tokenizer, eos
        self.device = device or torch.device("cpu")
        self.dtype = dtype
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.max_len = max_len or model.cfg.block_size
        self.cache = SlotCache(model.cfg.n_layer, max_batch, self.max_len)
        self.free = list(range(max_batch))
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []  # holding a slot: prefilling or decoding
        self.stats = Stats()
        self.observer = observer or Observer()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    # --- from any thread ----------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        if len(req.prompt) + 1 > self.max_len:
            raise ContextTooLong(f"the prompt has {len(req.prompt)} tokens; this model's "
                                 f"context is {self.max_len} tokens: shorten the prompt")
        if req.seed is not None:
            req.generator = torch.Generator(self.device).manual_seed(req.seed)
        req.queued = time.monotonic()
        with self._lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the queue limit); "
                                "retry later")
            self.waiting.append(req)
        self._wake.set()

    def cancel(self, req: Request) -> None:
        req.cancelled = True  # its slot is freed at the next step
        self._wake.set()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.active)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="structlm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop:
            if not self.step():
                self._wake.wait(0.05)
                self._wake.clear()

    # --- the engine thread --------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> bool:
        """One scheduling step: drop cancelled requests, admit waiting ones into free slots, one
        prefill chunk, one decode forward. Returns whether there was anything to do."""
        for req in [r for r in self.active if r.cancelled]:
            self._finish(req, "cancelled")
        with self._lock:
            while self.free and self.waiting:
                req = self.waiting.popleft()
                if req.cancelled:  # gone before it had a slot
                    self._finish(req, "cancelled")
                    continue
                req.slot = self.free.pop(0)
                self.cache.lengths[req.slot] = 0
                self.active.append(req)
                self.observer.admitted(time.monotonic() - req.queued)
        if not self.active:
            return False
        try:
            self._prefill()
            self._decode()
        except Exception as e:  # a failed forward ends the requests in it, not the server
            for req in list(self.active):
                self._finish(req, "error", f"internal error: {type(e).__name__}: {e}")
        return True

    def _forward(self, slots: list[int], idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab) at the last position of idx (B, T) for the given slots."""
        self.cache.select(slots)
        with autocast(self.device, self.dtype):
            return self.model.logits(self.model.hidden(idx.to(self.device), self.cache)[:, -1])

    def _prefill(self) -> None:
        """Up to `prefill_chunk` prompt tokens this step, request by request in arrival order (a
        long prompt takes several steps); a finished prompt samples its first token."""
        budget = self.prefill_chunk
        for req in [r for r in self.active if r.prefilled < len(r.prompt)]:
            if budget <= 0:
                break
            chunk = req.prompt[req.prefilled:req.prefilled + budget]
            logits = self._forward([req.slot], torch.tensor([chunk]))
            req.prefilled += len(chunk)
            budget -= len(chunk)
            self.stats.prefill_chunks += 1
            if req.prefilled == len(req.prompt):  # the prompt is in: its first token
                self.stats.prompt_tokens += len(req.prompt)
                self.observer.prefilled(len(req.prompt))
                self._take(req, int(self._sample([req], logits[0:1])[0]))

    def _decode(self) -> None:
        batch = [r for r in self.active if r.prefilled == len(r.prompt) and r.generated
                 and not r.done and len(r.generated) < r.max_tokens]
        if not batch:
            return
        logits = self._forward([r.slot for r in batch],
                               torch.tensor([[r.generated[-1]] for r in batch]))
        self.stats.decode_steps += 1
        self.stats.last_batch = len(batch)
        self.stats.peak_batch = max(self.stats.peak_batch, len(batch))
        self.stats.recent.append((time.monotonic(), len(batch)))
        for req, token in zip(batch, self._sample(batch, logits).tolist(), strict=True):
            self._take(req, token)

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> torch.Tensor:
        """One token per request from its row of logits (B, vocab), all rows at once; each
        request's draws come from its own generator, so batching does not change them."""
        temps = torch.tensor([r.temperature for r in reqs], device=logits.device)
        top_p = torch.tensor([r.top_p for r in reqs], device=logits.device)
        return sample_rows(logits.float(), temps, top_p, [r.generator for r in reqs])

    def _take(self, req: Request, token: int) -> None:
        """A request's next token: emit the new text; finish on end-of-text, a stop string, its
        max_tokens or the full context."""
        self.stats.generated_tokens += 1
        now, first = time.monotonic(), req.last_token is None
        self.observer.token(now - (req.submitted if first else req.last_token), first,
                            token != self.eos)
        req.last_token = now
        if token == self.eos:
            self._emit(req, self.tokenizer.decode(req.generated))  # what was held back
            return self._finish(req, "stop")
        req.generated.append(token)
        text = self.tokenizer.decode(req.generated)
        cut = min((i for s in req.stop if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self._emit(req, text[:cut])
            return self._finish(req, "stop")
        full = int(self.cache.lengths[req.slot]) + 1 >= self.max_len
        if len(req.generated) >= req.max_tokens or full:
            self._emit(req, text)
            return self._finish(req, "length")
        if not text.endswith("\ufffd"):  # hold back a character whose bytes are not all out yet
            self._emit(req, text[:len(text) - stop_prefix(text, req.stop)])

    def _emit(self, req: Request, text: str) -> None:
        if len(text) > len(req.sent) and text.startswith(req.sent):
            req.emit(Event(text[len(req.sent):]))
            req.sent = text

    def _finish(self, req: Request, reason: str, message: str = "") -> None:
        req.done = True
        if req in self.active:
            self.active.remove(req)
            self.free.append(req.slot)
            self.free.sort()
        self.stats.requests[reason] = self.stats.requests.get(reason, 0) + 1
        self.observer.finished(reason, time.monotonic() - req.submitted)
        if reason != "cancelled":
            req.emit(Event(message, reason, len(req.prompt), len(req.generated)))

    def layer_paths(self) -> dict[tuple, dict[str, int]]:
        """Calls per (kind, d_in, d_out) and path (merged / structured) so far."""
        out: dict[tuple, dict[str, int]] = {}
        for m in self.model.modules():
            if isinstance(m, PreMergedLinear):
                s = m.structured
                acc = out.setdefault((s.kind, s.d_in, s.d_out), {"merged": 0, "structured": 0})
                for k, v in m.calls.items():
                    acc[k] += v
        return out


def stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that begins a stop string: text a stop string
    may still claim, so it is held back until the string completes or cannot."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                if text.endswith(s[:k])), default=0)
