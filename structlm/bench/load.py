"""A bounded load generator for an OpenAI-compatible server on loopback (`structlm bench serve`):
`clients` threads send `requests` streaming completions in all, prompt and output lengths drawn
uniformly around the given means; it measures requests/s, output tokens/s, time to first token
and inter-token latency percentiles, and errors."""

from __future__ import annotations

import http.client
import json
import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

WORDS = ("the", "king", "and", "of", "love", "night", "sweet", "my", "lord", "to", "death",
         "what", "is", "this", "fair", "heaven", "thou", "art", "so", "true")


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)  # seconds, per request
    itl: list[float] = field(default_factory=list)  # seconds between deltas, over all requests
    tokens: int = 0
    done: int = 0
    errors: int = 0


def one_request(url: str, body: dict, api_key: str | None, out: Result, lock) -> None:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    t0 = time.perf_counter()
    times, tokens = [], 0
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), headers)
        r = conn.getresponse()
        if r.status != 200:
            r.read()
            raise RuntimeError(r.status)
        for line in iter(r.readline, b""):
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            elif obj["choices"] and obj["choices"][0]["text"]:
                times.append(time.perf_counter())
    except (OSError, RuntimeError, ValueError):
        with lock:
            out.errors += 1
        return
    finally:
        conn.close()
    with lock:
        out.done += 1
        out.tokens += tokens
        if times:
            out.ttft.append(times[0] - t0)
            out.itl.extend(b - a for a, b in zip(times, times[1:], strict=False))


def run_load(url: str, clients: int, requests: int, prompt_words: int = 64,
             output_tokens: int = 64, seed: int = 0, api_key: str | None = None) -> dict:
    """Drive the server; returns one row of figures."""
    rng = random.Random(seed)
    bodies = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(
                   rng.randint(max(1, prompt_words // 2), prompt_words * 3 // 2))),
               "max_tokens": rng.randint(max(1, output_tokens // 2), output_tokens * 3 // 2),
               "temperature": 0.8, "seed": i, "stream": True,
               "stream_options": {"include_usage": True}} for i in range(requests)]
    out, lock, queue = Result(), threading.Lock(), list(reversed(bodies))

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                body = queue.pop()
            one_request(url, body, api_key, out, lock)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    pct = lambda xs, q: 1e3 * statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else (  # noqa: E731
        1e3 * xs[0] if xs else None)
    return {"clients": clients, "requests": requests, "errors": out.errors, "wall_s": wall,
            "req_per_s": out.done / wall, "out_tok_per_s": out.tokens / wall,
            **{f"ttft_p{q}_ms": pct(out.ttft, q) for q in (50, 95, 99)},
            **{f"itl_p{q}_ms": pct(out.itl, q) for q in (50, 95, 99)}}
