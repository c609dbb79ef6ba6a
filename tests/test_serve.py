"""structlm serve: a real uvicorn server on an ephemeral loopback port, driven by the official
openai client and by raw HTTP: completions and chat, streaming, batched = alone under greedy
decoding, every bad input answered in the OpenAI error format, the body size limit, an event loop
that keeps answering while prompts are tokenized, disconnects, the queue limit, the API key, the
Prometheus metrics (with the per-step pre-merge dispatch), and a graceful SIGTERM."""

import http.client
import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from structlm.config import DataConfig, LinearSpec, ModelConfig, RunConfig, save_json
from structlm.data.prepare import prepare
from structlm.model.gpt import GPT
from structlm.runs import checkpoint

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from structlm.serving import api  # noqa: E402
from structlm.serving.engine import stop_prefix  # noqa: E402
from structlm.serving.server import BackgroundServer, build  # noqa: E402

TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
            "{{ raise_exception('a system message must come first') }}{% endif %}"
            "<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """A random LowRank GPT (block 0 dense) with a BPE of the corpus and a chat template."""
    tmp = tmp_path_factory.mktemp("serve")
    data = prepare(DataConfig(source=str(corpus), data_dir=str(tmp / "data"), vocab_size=300,
                              val_fraction=0.2), progress=False)
    cfg = RunConfig(model=ModelConfig(vocab_size=300, block_size=96, n_layer=2, n_head=2,
                                      d_model=32, d_ff=128, ffn=LinearSpec("lowrank", rank=8)))
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    out = tmp / "run"
    checkpoint.save(out, model, None, cfg, 1, {})
    save_json(cfg, str(out / "config.json"))
    (out / "tokenizer.json").write_bytes((data / "tokenizer.json").read_bytes())
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return out


class Server(BackgroundServer):
    """The background server with an openai client and raw-HTTP helpers."""

    def __init__(self, app, engine, start_engine: bool = True) -> None:
        super().__init__(app, engine, start_engine)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def post(self, path: str, body, headers=None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        out = r.status, json.loads(r.read() or b"{}")
        conn.close()
        return out

    def fetch(self, path: str, headers=None) -> tuple[int, str]:
        """GET path: (status, text)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        out = r.status, r.read().decode()
        conn.close()
        return out

    def get(self, path: str, headers=None) -> str:
        return self.fetch(path, headers)[1]

    def post_chunked(self, path: str, size: int, chunk: int = 2**16) -> tuple[int, dict]:
        """POST `size` bytes of a JSON body in chunks (Transfer-Encoding: chunked, no
        Content-Length)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        body = b'{"prompt": "' + b"a" * (size - 14) + b'"}'
        conn.request("POST", path, (body[i:i + chunk] for i in range(0, size, chunk)),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        out = r.status, json.loads(r.read())
        conn.close()
        return out

    def metric(self, name: str, headers=None, **labels: str) -> float:
        """The sum of the /metrics samples named `structlm:<name>` whose labels include
        `labels`."""
        families = text_string_to_metric_families(self.get("/metrics", headers))
        return sum(s.value for f in families for s in f.samples
                   if s.name == f"structlm:{name}" and labels.items() <= s.labels.items())


@pytest.fixture(scope="module")
def server(run):
    app, engine = build(str(run), device="cpu", dtype="fp32", max_batch=32, max_tokens=64,
                        prefill_chunk=48)
    s = Server(app, engine)
    yield s
    s.close()


def test_openai_client_completions_stream_chat_and_models(server):
    c = server.client
    assert [m.id for m in c.models.list().data] == ["run"]
    r = c.completions.create(model="run", prompt="Scene 1", max_tokens=12, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.prompt_tokens > 0
    parts = [ch.choices[0].text for ch in c.completions.create(
        model="run", prompt="Scene 1", max_tokens=12, temperature=0, stream=True) if ch.choices]
    assert "".join(parts) == r.choices[0].text  # streamed = whole
    chat = c.chat.completions.create(model="run", messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=6, temperature=0.7, seed=1)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 6
    again = c.chat.completions.create(model="run", messages=[{"role": "user", "content": "hi"}],
                                      max_tokens=6, temperature=0.7, seed=1)
    assert again.choices[0].message.content == chat.choices[0].message.content  # seeded
    deltas = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="run", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
        temperature=0.7, seed=1, stream=True) if ch.choices]
    assert "".join(deltas) == chat.choices[0].message.content


def test_batched_outputs_equal_alone_and_dispatch_follows_the_batch(server):
    """32 greedy requests of different prompt and output lengths at once give what each gives
    alone; the decode batch was big (structured factors) and alone it was one (merged)."""
    prompts = [("Scene " + "and the " * (i % 7)) + str(i) for i in range(32)]
    lengths = [20 + (i * 5) % 24 for i in range(32)]
    ask = lambda i: server.client.completions.create(  # noqa: E731
        model="run", prompt=prompts[i], max_tokens=lengths[i], temperature=0).choices[0].text
    shape = {"kind": "lowrank", "d_in": "32", "d_out": "128"}
    before = server.metric("layer_calls_total", **shape, path="merged")
    alone = [ask(i) for i in range(32)]
    assert server.metric("layer_calls_total", **shape, path="merged") > before
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, range(32)))
    assert together == alone
    assert server.metric("peak_batch_size") >= 16
    assert server.metric("layer_calls_total", **shape, path="structured") > 0


def test_seeded_sampling_batched_equals_alone(server):
    """Sampled requests (temperature, top-p, a seed each) give the same text in a batch of 16 as
    alone: the batch is sampled at once, each row from its own request's generator."""
    ask = lambda i: server.client.completions.create(  # noqa: E731
        model="run", prompt=f"Scene {i}", max_tokens=24, temperature=0.9, top_p=0.9,
        seed=i).choices[0].text
    alone = [ask(i) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, range(16)))
    assert together == alone and len(set(alone)) > 1


@pytest.mark.parametrize(("body", "status", "words"), [
    (b'{"prompt": "a", "max_tokens": ', 400, "not valid JSON"),
    (b"\xff\xfe\x00", 400, "not UTF-8"),
    ({"prompt": "a", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"prompt": "a", "colour": "red"}, 400, "Unrecognized request argument supplied: colour"),
    ({"prompt": 7}, 400, "prompt"),
    ({"prompt": "a", "temperature": -0.5}, 400, "temperature"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "a", "max_tokens": 65}, 400, "limit of 64"),
    ({"prompt": "a", "n": 2}, 400, "n=2 is not supported"),
    ({"prompt": "and the " * 200}, 400, "maximum context length is 96"),
    ({"prompt": "a", "stop": ["", "x"]}, 400, "stop"),
    ([1, 2], 400, "JSON object"),
    ({"prompt": "a \ud800 b"}, 400, "unpaired UTF-16 surrogate"),
    ({"prompt": "a", "seed": 2**64}, 400, "seed"),
    ({"prompt": "a", "model": "gpt-4o"}, 404, "The model `gpt-4o` does not exist"),
])
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, body, status, words):
    code, out = server.post("/v1/completions", body)
    assert code == status and words in out["error"]["message"], out
    assert out["error"]["type"] == "invalid_request_error"
    code, ok = server.post("/v1/completions", {"prompt": "Scene", "max_tokens": 2})
    assert code == 200 and ok["choices"][0]["text"] is not None


def test_neutral_and_default_values_are_accepted(server):
    """null max_tokens takes the default (16 for completions; chat's 256 is capped at the server's
    limit of 64), an empty logit_bias biases nothing, the served name and any 64-bit seed pass."""
    code, out = server.post("/v1/completions", {
        "prompt": "Scene", "max_tokens": None, "logit_bias": {}, "model": "run",
        "seed": 2**64 - 1, "temperature": 0})
    assert code == 200 and out["usage"]["completion_tokens"] <= 16, out
    code, out = server.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "temperature": 0})
    assert code == 200 and out["usage"]["completion_tokens"] <= 64, out


def test_a_chat_template_that_refuses_the_messages_is_a_400(server):
    code, out = server.post("/v1/chat/completions", {"messages": [
        {"role": "user", "content": "hi"}, {"role": "system", "content": "be brief"}]})
    assert code == 400 and "a system message must come first" in out["error"]["message"], out
    assert out["error"]["param"] == "messages"


@pytest.mark.parametrize(("text", "stops", "held"), [
    ("abcST", ("STOP",), 2), ("abc", ("STOP",), 0), ("aSTO", ("STOP", "TO!"), 3),
    ("abS", ("xx", "SS"), 1), ("", ("a",), 0),
])
def test_stop_prefix_is_the_longest_end_that_begins_a_stop_string(text, stops, held):
    assert stop_prefix(text, stops) == held


def test_a_stop_string_never_leaks_a_partial_match(server):
    """Text that might begin a stop string is held back: whole and streamed responses end right
    before the stop string, wherever the token boundaries fall inside it."""
    body = {"prompt": "Scene 2", "max_tokens": 48, "temperature": 0}
    full = server.post("/v1/completions", body)[1]["choices"][0]["text"]
    clean = [p for p in range(len(full) - 5) if full[p:p + 5].isprintable()]  # no stray bytes
    assert len(clean) >= 3, full
    for p in (clean[0], clean[len(clean) // 2], clean[-1]):
        stop = full[p:p + 5]
        want = full[:full.find(stop)]
        whole = server.post("/v1/completions", {**body, "stop": [stop]})[1]["choices"][0]
        streamed = "".join(ch.choices[0].text for ch in server.client.completions.create(
            model="run", prompt=body["prompt"], max_tokens=48, temperature=0, stop=[stop],
            stream=True) if ch.choices)
        assert (whole["text"], whole["finish_reason"], streamed) == (want, "stop", want), stop


def test_a_prompt_longer_than_a_prefill_chunk_is_chunked_to_the_same_output(run, server):
    """Prefill in 48-token chunks (the server) and in 5-token chunks: the same greedy text."""
    body = {"prompt": "Scene 3. " + "and the " * 9, "max_tokens": 16, "temperature": 0}
    app, engine = build(str(run), device="cpu", dtype="fp32", max_batch=2, prefill_chunk=5)
    small = Server(app, engine)
    try:
        assert small.post("/v1/completions", body)[1]["choices"] == server.post(
            "/v1/completions", body)[1]["choices"]
        assert small.metric("prefill_chunks_total") > 3
    finally:
        small.close()


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    cancelled = server.metric("request_success_total", finished_reason="abort")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(
        {"prompt": "Scene", "max_tokens": 64, "stream": True, "temperature": 1.0, "seed": 0}),
        {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    conn.sock.close()
    conn.close()
    for _ in range(200):
        if server.metric("request_success_total", finished_reason="abort") > cancelled:
            break
        time.sleep(0.05)
    assert server.metric("request_success_total", finished_reason="abort") == cancelled + 1
    assert json.loads(server.get("/health"))["running"] == 0


def test_a_client_that_disconnects_during_a_whole_response_frees_its_slot(server, monkeypatch):
    """Tokens keep coming (one per 50 ms) while the client waits for a non-streamed response;
    its disconnect still cancels the request long before its 64 tokens are done."""
    body = {"prompt": "Scene", "max_tokens": 64, "temperature": 1.0, "seed": 0}
    code, out = server.post("/v1/completions", body)
    assert code == 200 and out["usage"]["completion_tokens"] == 64  # it runs to its length
    forward = server.engine._forward
    monkeypatch.setattr(server.engine, "_forward",
                        lambda *a: (time.sleep(0.05), forward(*a))[1])
    cancelled = server.metric("request_success_total", finished_reason="abort")
    length = server.metric("request_success_total", finished_reason="length")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    while server.engine.stats.generated_tokens == 0 or server.engine.running == 0:
        time.sleep(0.01)
    time.sleep(0.6)  # tokens are flowing
    conn.sock.close()
    conn.close()
    for _ in range(40):  # 2 s: the 64 tokens would take 3.2 s
        if server.metric("request_success_total", finished_reason="abort") > cancelled:
            break
        time.sleep(0.05)
    assert server.metric("request_success_total", finished_reason="abort") == cancelled + 1
    assert server.metric("request_success_total", finished_reason="length") == length
    assert json.loads(server.get("/health"))["running"] == 0


def test_queue_limit_answers_429_and_api_key_401(run):
    app, engine = build(str(run), device="cpu", dtype="fp32", max_batch=1, max_queue=1,
                        api_key="sekret")
    s = Server(app, engine, start_engine=False)  # nothing is served until the engine starts
    try:
        key = {"Authorization": "Bearer sekret"}
        code, out = s.post("/v1/completions", {"prompt": "a"})
        assert code == 401 and out["error"]["code"] == "invalid_api_key"
        assert json.loads(s.get("/health"))["status"] == "ok"  # health needs no key
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(s.post, "/v1/completions", {"prompt": "a", "max_tokens": 3}, key)
            while engine.queue_depth < 1:
                time.sleep(0.01)
            code, out = s.post("/v1/completions", {"prompt": "b"}, key)
            assert code == 429 and out["error"]["type"] == "rate_limit_error"
            engine.start()
            assert first.result(timeout=60)[0] == 200
    finally:
        s.close()


def test_a_body_over_the_limit_is_a_413_with_or_without_content_length(server):
    """Over the 4 MiB default: 413 in the OpenAI error format, whether Content-Length says so or
    the chunked bytes pass the limit; a body of exactly the limit is served."""
    limit = api.MAX_BODY
    assert limit == 4 * 2**20
    small = json.dumps({"prompt": "Scene", "max_tokens": 2}).encode()
    answers = [server.post("/v1/completions", small + b" " * (limit + 1 - len(small))),
               server.post_chunked("/v1/completions", limit + 1),
               server.post_chunked("/v1/chat/completions", 3 * limit)]
    for code, out in answers:
        assert code == 413, out
        assert set(out["error"]) == {"message", "type", "param", "code"}
        assert out["error"]["type"] == "invalid_request_error"
        assert out["error"]["code"] == "request_too_large" and f"{limit:,} bytes" in out[
            "error"]["message"]
    code, out = server.post("/v1/completions", small + b" " * (limit - len(small)))
    assert code == 200 and out["usage"]["completion_tokens"] == 2


def test_health_answers_while_a_big_prompt_is_tokenized(server, monkeypatch):
    """Tokenizing a 3 MiB prompt (slowed to 3 s here) happens off the event loop: /health answers
    before the tokenizer returns, and the prompt is then refused as over the context."""
    entered, returned = threading.Event(), []
    token_ids = api.token_ids

    def slow(tokenizer, text):
        entered.set()
        time.sleep(3)
        returned.append(time.monotonic())
        return token_ids(tokenizer, text)

    monkeypatch.setattr(api, "token_ids", slow)
    with ThreadPoolExecutor(1) as pool:
        big = pool.submit(server.post, "/v1/completions", {"prompt": "and the " * 3 * 2**17})
        assert entered.wait(30)
        health = json.loads(server.get("/health"))
        answered = time.monotonic()
        code, out = big.result(timeout=60)
    assert health["status"] == "ok"
    assert answered < returned[0]  # /health answered while the tokenizer was still at work
    assert code == 400 and out["error"]["code"] == "context_length_exceeded", out
    assert "characters alone have" in out["error"]["message"]  # refused by its beginning


def test_metrics_need_the_api_key_and_health_does_not(run):
    app, engine = build(str(run), device="cpu", dtype="fp32", max_batch=1, api_key="sekret")
    s = Server(app, engine, start_engine=False)
    try:
        code, text = s.fetch("/metrics")
        assert code == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
        code, text = s.fetch("/metrics", {"Authorization": "Bearer wrong"})
        assert code == 401
        code, text = s.fetch("/metrics", {"Authorization": "Bearer sekret"})
        assert code == 200 and "structlm:num_requests_waiting" in text
        code, text = s.fetch("/health")
        assert code == 200 and json.loads(text)["status"] == "ok"
    finally:
        s.close()


def test_metrics_count_the_tokens_and_requests_served(run):
    """After two completions (one streamed) on a fresh server, /metrics parses as Prometheus
    text: the token counters equal the usage served, every request histogram counted each
    request once, the inter-token histogram each token after a request's first."""
    app, engine = build(str(run), device="cpu", dtype="fp32", max_batch=2, max_tokens=64)
    s = Server(app, engine)
    try:
        whole = s.client.completions.create(model="run", prompt="Scene 1", max_tokens=9,
                                            temperature=0)
        chunks = list(s.client.completions.create(
            model="run", prompt="Scene 2. and the", max_tokens=13, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        usages = [whole.usage, chunks[-1].usage]
        reasons = [whole.choices[0].finish_reason,
                   next(c.choices[0].finish_reason for c in chunks
                        if c.choices and c.choices[0].finish_reason)]
        families = {f.name: f for f in text_string_to_metric_families(s.get("/metrics"))}
    finally:
        s.close()

    def value(family: str, sample: str, **labels) -> float:
        return sum(x.value for x in families[f"structlm:{family}"].samples
                   if x.name == f"structlm:{sample}" and labels.items() <= x.labels.items())

    assert value("prompt_tokens", "prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    generated = sum(u.completion_tokens for u in usages)
    assert value("generation_tokens", "generation_tokens_total") == generated
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds"):
        assert value(h, f"{h}_count") == 2, h
        assert value(h, f"{h}_bucket", le="+Inf") == 2, h
    # a request that stopped at end-of-text sampled that token too (not in its usage)
    sampled = generated + reasons.count("stop")
    assert value("inter_token_latency_seconds", "inter_token_latency_seconds_count") == \
        sampled - 2
    assert value("e2e_request_latency_seconds", "e2e_request_latency_seconds_sum") >= value(
        "time_to_first_token_seconds", "time_to_first_token_seconds_sum") > 0
    for reason in ("stop", "length"):
        assert value("request_success", "request_success_total", finished_reason=reason,
                     model_name="run") == reasons.count(reason)
    assert value("request_success", "request_success_total") == 2
    assert value("num_requests_running", "num_requests_running") == 0
    assert value("num_requests_waiting", "num_requests_waiting") == 0


def test_sigterm_stops_structlm_serve_gracefully_with_exit_0(run):
    """`structlm serve --port 0` in a subprocess: a stream in flight when SIGTERM comes still
    ends with [DONE], and the process exits 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "structlm", "serve", str(run), "--port", "0", "--device", "cpu",
         "--dtype", "fp32", "--max_tokens", "80"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout] + [lines.put("")],
                     daemon=True).start()
    try:
        line = lines.get(timeout=120)
        port = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert port, (line, proc.stderr.read() if proc.poll() is not None else "")
        conn = http.client.HTTPConnection("127.0.0.1", int(port.group(1)), timeout=60)
        conn.request("POST", "/v1/completions", json.dumps(
            {"prompt": "Scene", "max_tokens": 80, "stream": True, "temperature": 1.0,
             "seed": 0}), {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and r.readline().startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        assert r.read().rstrip().endswith(b"data: [DONE]")  # the stream finished
        conn.close()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stream_chunks(port: int, body: dict) -> int:
    """One streamed completion to its end: the number of its events before [DONE]."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    text = r.read()
    conn.close()
    assert r.status == 200 and text.rstrip().endswith(b"data: [DONE]"), text[-200:]
    return text.count(b"data: ") - 1


@pytest.mark.slow
def test_under_load_a_10_mb_body_is_a_413_and_health_answers_within_1_s(run, record_property):
    """The issue's acceptance test: while 32 clients stream completions back to back, a 10 MiB
    body (with Content-Length, and chunked) is answered 413 and a 3 MiB prompt is tokenized and
    refused as over the context; /health, polled throughout, answers every time, the slowest
    within 1 s."""
    app, engine = build(str(run), device="cpu", dtype="fp32", max_batch=32, max_tokens=64)
    s = Server(app, engine)
    stop = threading.Event()

    def client(i: int) -> int:
        done = 0
        while not stop.is_set():
            done += stream_chunks(s.port, {"prompt": f"Scene {i}", "max_tokens": 64,
                                           "temperature": 1.0, "seed": 1000 * i + done}) > 0
        return done

    def poll() -> list[float]:
        latencies = []
        while not stop.is_set():
            t = time.perf_counter()
            assert json.loads(s.get("/health"))["status"] == "ok"
            latencies.append(time.perf_counter() - t)
            time.sleep(0.05)
        return latencies

    big = b'{"prompt": "' + b"a" * (10 * 2**20) + b'"}'
    try:
        with ThreadPoolExecutor(33) as pool:
            try:
                clients = [pool.submit(client, i) for i in range(32)]
                health = pool.submit(poll)
                deadline = time.monotonic() + 120
                while engine.stats.peak_batch < 16 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert engine.stats.peak_batch >= 16  # the clients decode together
                answers = [s.post("/v1/completions", big),
                           s.post_chunked("/v1/completions", 10 * 2**20),
                           s.post("/v1/completions", {"prompt": "and the " * 3 * 2**17})]
                time.sleep(2)
            finally:
                stop.set()
            served = [c.result(timeout=120) for c in clients]
            latencies = health.result(timeout=60)
    finally:
        s.close()
    assert [code for code, _ in answers] == [413, 413, 400], answers
    assert answers[2][1]["error"]["code"] == "context_length_exceeded"
    assert all(n > 0 for n in served) and len(latencies) >= 20
    record_property("max_health_latency_s", max(latencies))
    print(f"/health: {len(latencies)} calls under load, max {max(latencies) * 1e3:.0f} ms, "
          f"{sum(served)} streams served")
    assert max(latencies) < 1.0


@pytest.mark.slow
def test_an_imported_instruct_model_chats_through_its_own_template(tmp_path):
    """SmolLM2-135M-Instruct (GGUF) imported keeps its chat template; /v1/chat/completions renders
    it and the model answers in words."""
    from helpers import smollm2_file

    from structlm.runs.importer import import_hf

    run = import_hf(smollm2_file(), tmp_path / "smol")
    app, engine = build(str(run), device="cpu", dtype="fp32", max_batch=2, context=512)
    s = Server(app, engine)
    try:
        r = s.client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=12, temperature=0)
        assert "Paris" in r.choices[0].message.content
    finally:
        s.close()
