"""structlm serve: a real uvicorn server on an ephemeral loopback port, driven by the official
openai client and by raw HTTP: completions and chat, streaming, batched = alone under greedy
decoding, every bad input answered in the OpenAI error format, disconnects, the queue limit, the
API key, and the per-step pre-merge dispatch in /metrics."""

import http.client
import json
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

    def get(self, path: str) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", path)
        text = conn.getresponse().read().decode()
        conn.close()
        return text

    def metric(self, name: str) -> float:
        return sum(float(ln.split()[-1]) for ln in self.get("/metrics").splitlines()
                   if ln.startswith(f"structlm_{name}"))


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
    before = server.metric('layer_calls_total{kind="lowrank",d_in="32",d_out="128",path="merged"')
    alone = [ask(i) for i in range(32)]
    assert server.metric(
        'layer_calls_total{kind="lowrank",d_in="32",d_out="128",path="merged"') > before
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, range(32)))
    assert together == alone
    assert server.metric("peak_batch_size") >= 16
    assert server.metric('layer_calls_total{kind="lowrank",d_in="32",d_out="128",'
                         'path="structured"') > 0


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
    cancelled = server.metric('requests_total{outcome="cancelled"}')
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(
        {"prompt": "Scene", "max_tokens": 64, "stream": True, "temperature": 1.0, "seed": 0}),
        {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    conn.sock.close()
    conn.close()
    for _ in range(200):
        if server.metric('requests_total{outcome="cancelled"}') > cancelled:
            break
        time.sleep(0.05)
    assert server.metric('requests_total{outcome="cancelled"}') == cancelled + 1
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
    cancelled = server.metric('requests_total{outcome="cancelled"}')
    length = server.metric('requests_total{outcome="length"}')
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    while server.engine.stats.generated_tokens == 0 or server.engine.running == 0:
        time.sleep(0.01)
    time.sleep(0.6)  # tokens are flowing
    conn.sock.close()
    conn.close()
    for _ in range(40):  # 2 s: the 64 tokens would take 3.2 s
        if server.metric('requests_total{outcome="cancelled"}') > cancelled:
            break
        time.sleep(0.05)
    assert server.metric('requests_total{outcome="cancelled"}') == cancelled + 1
    assert server.metric('requests_total{outcome="length"}') == length
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
