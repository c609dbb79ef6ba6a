"""The HTTP API: OpenAI-compatible completions and chat completions (with server-sent-event
streaming), models, health and Prometheus metrics, over an `Engine`. FastAPI is imported only
here (the optional `[serve]` extra).

Every error is an OpenAI-format JSON body with a 4xx status (bad JSON, non-UTF-8 bodies, wrong
types, unknown fields, prompts beyond the context, limits, sampling values out of range); the
server keeps serving. A body over the size limit answers 413 before anything parses it; a full
queue answers 429; with an API key, /v1/ and /metrics requests without its bearer token get 401
(/health stays open). Bodies are validated, chat templates rendered and prompts tokenized in
worker threads, so the event loop (/health, streams) keeps answering meanwhile. A client that
disconnects (streaming or not) frees its slot at the next engine step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tokenizers import Tokenizer

from structlm.serving.engine import ContextTooLong, Engine, Event, QueueFull, Request
from structlm.serving.metrics import ServingMetrics
from structlm.serving.schemas import ChatBody, CompletionBody, error_body

MAX_BODY = 4 * 2**20  # bytes: the default request size limit (4 MiB)
# a prompt of more characters than this per context position is first tokenized by its beginning:
# if that alone fills the context (with SLACK tokens to spare for the cut), it is refused without
# tokenizing megabytes
HEAD_CHARS_PER_TOKEN = 16
SLACK = 16


@dataclass
class ServeConfig:
    name: str  # the model id /v1/models lists
    max_tokens: int = 1024  # the most tokens one request may ask for
    api_key: str | None = None
    chat_template: str | None = None  # jinja, from the run's tokenizer files
    bos: str = ""
    eos: str = ""
    max_body: int = MAX_BODY  # bytes a request body may hold


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.response = JSONResponse(error_body(message, kind, param, code), status_code=status)


class RequireKey:
    """ASGI middleware: /v1/ paths and /metrics need `Authorization: Bearer KEY`. Plain ASGI, not
    Starlette's BaseHTTPMiddleware, through which a handler could never see its client
    disconnect."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http"
                and (scope["path"].startswith("/v1/") or scope["path"] == "/metrics")
                and dict(scope["headers"]).get(b"authorization") != self.expected):
            body = error_body("missing or wrong API key (Authorization: Bearer KEY)",
                              code="invalid_api_key")
            return await JSONResponse(body, status_code=401)(scope, receive, send)
        await self.app(scope, receive, send)


class LimitBody:
    """ASGI middleware: a request body over `limit` bytes is answered 413 (OpenAI's error format)
    before the app sees it: at once when its Content-Length says so, else as soon as the bytes
    received (a chunked body) pass the limit. The body read here is handed to the app whole;
    of a refused one, uvicorn reads and discards what the client still sends."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self.refuse(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self.refuse(scope, receive, send)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # what comes next: the client's disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = (f"the request body is larger than this server's limit of {self.limit:,} bytes "
                   "(structlm serve --max_body_mb)")
        response = JSONResponse(error_body(message, code="request_too_large"), status_code=413)
        await response(scope, receive, send)


def create_app(engine: Engine, tokenizer: Tokenizer, cfg: ServeConfig) -> FastAPI:
    """The app serving `engine`; its metrics become the engine's observer."""
    app = FastAPI(title="structlm", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    template = compile_template(cfg.chat_template) if cfg.chat_template else None
    metrics = ServingMetrics(engine, cfg.name)
    engine.observer = metrics

    app.add_middleware(LimitBody, limit=cfg.max_body)
    if cfg.api_key:  # added last, so outermost: a request without the key is not even read
        app.add_middleware(RequireKey, key=cfg.api_key)

    @app.exception_handler(BadRequest)
    async def bad_request(request: HTTPRequest, e: BadRequest):
        return e.response

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.running, "waiting": engine.queue_depth}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.name, "object": "model",
                                            "created": created, "owned_by": "structlm"}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        arrival = time.monotonic()
        raw = await request.body()
        body, ids = await asyncio.to_thread(completion_input, raw, tokenizer, engine, cfg)
        n = budget(body.max_tokens, 16, cfg)
        return await run(request, engine, body, ids, cfg, n, arrival)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        arrival = time.monotonic()
        if template is None:
            raise BadRequest("this model has no chat template (its tokenizer files define none); "
                             "use /v1/completions", status=404, code="no_chat_template")
        raw = await request.body()
        body, ids = await asyncio.to_thread(chat_input, raw, template, tokenizer, engine, cfg)
        n = budget(body.max_completion_tokens or body.max_tokens, 256, cfg)
        return await run(request, engine, body, ids, cfg, n, arrival, chat=True)

    return app


def completion_input(raw: bytes, tokenizer: Tokenizer, engine: Engine,
                     cfg: ServeConfig) -> tuple[CompletionBody, list[int]]:
    """A completion request's body and prompt ids, or a BadRequest (run in a worker
    thread)."""
    body = parse(raw, CompletionBody, cfg)
    return body, encode(tokenizer, body.prompt, engine, "prompt")


def chat_input(raw: bytes, template: Template, tokenizer: Tokenizer, engine: Engine,
               cfg: ServeConfig) -> tuple[ChatBody, list[int]]:
    """A chat request's body and the ids of its rendered messages, or a BadRequest (run in a
    worker thread)."""
    body = parse(raw, ChatBody, cfg)
    try:
        text = template.render(
            messages=[m.model_dump(exclude_none=True) for m in body.messages],
            add_generation_prompt=True, bos_token=cfg.bos, eos_token=cfg.eos)
    except TemplateError as e:
        raise BadRequest(f"this model's chat template refuses these messages: {e}",
                         "messages") from None
    return body, encode(tokenizer, text, engine, "messages")


def compile_template(source: str) -> Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise TemplateError(message)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def parse(raw: bytes, schema, cfg: ServeConfig):
    """The body as `schema`, or a BadRequest naming what is wrong."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest("the request body is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise BadRequest(f"the request body is not valid JSON ({e.msg} at character {e.pos})") \
            from None
    if not isinstance(obj, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        body = schema.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            raise BadRequest(f"Unrecognized request argument supplied: {loc}", loc) from None
        raise BadRequest(f"{loc}: {err['msg']}", loc) from None
    if (name := body.unsupported()) is not None:
        raise BadRequest(f"{name}={getattr(body, name)!r} is not supported by this server; leave "
                         "it unset", name)
    if body.model is not None and body.model != cfg.name:
        raise BadRequest(f"The model `{body.model}` does not exist: this server serves "
                         f"`{cfg.name}` (GET /v1/models)", "model", status=404,
                         code="model_not_found")
    return body


def encode(tokenizer: Tokenizer, text: str, engine: Engine, param: str) -> list[int]:
    """The prompt's ids (an empty prompt: the end-of-text id), or a BadRequest: an unpaired
    surrogate, or no room left in the context. A text of more than HEAD_CHARS_PER_TOKEN characters
    per context position is first tokenized up to a space near that length: when that beginning
    alone has SLACK tokens more than the context, the prompt is refused without tokenizing the
    rest."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(f"{param} holds an unpaired UTF-16 surrogate ({text[e.start]!r} at "
                         f"character {e.start}): send valid Unicode text", param) from None

    def too_long(has: str) -> BadRequest:
        return BadRequest(f"This model's maximum context length is {engine.max_len} tokens; the "
                          f"prompt has {has}: shorten it", param, code="context_length_exceeded")

    head = HEAD_CHARS_PER_TOKEN * engine.max_len
    if len(text) > head:
        cut = text.rfind(" ", head // 2, head)  # where a pre-tokenizer splits too
        cut = cut if cut > 0 else head
        if (n := len(token_ids(tokenizer, text[:cut]))) >= engine.max_len + SLACK:
            raise too_long(f"more than that (its first {cut:,} characters alone have {n})")
    ids = token_ids(tokenizer, text) if text else []
    ids = ids or [engine.eos]
    if len(ids) >= engine.max_len:
        raise too_long(str(len(ids)))
    return ids


def token_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids of `text` (a module-level function, so that tests can slow it down)."""
    return tokenizer.encode(text).ids


def budget(asked: int | None, default: int, cfg: ServeConfig) -> int:
    """The tokens a request may generate: what it asked for (refused above the server's limit),
    else the endpoint's default capped at that limit."""
    if asked is None:
        return min(default, cfg.max_tokens)
    if asked > cfg.max_tokens:
        raise BadRequest(f"max_tokens={asked} is above this server's limit of "
                         f"{cfg.max_tokens} (structlm serve --max_tokens)", "max_tokens")
    return asked


async def run(request: HTTPRequest, engine: Engine, body, ids: list[int], cfg: ServeConfig,
              max_tokens: int, arrival: float, chat: bool = False) -> Response:
    """Submits the request (arrived at `arrival`, time.monotonic) and answers it, streamed or
    whole."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event | None] = asyncio.Queue()  # None: the client left
    req = Request(ids, max_tokens, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                  body.temperature, body.top_p, tuple(body.stop or ()), body.seed,
                  submitted=arrival)
    try:
        engine.submit(req)
    except QueueFull as e:
        raise BadRequest(str(e), status=429, kind="rate_limit_error", code="queue_full") from None
    except ContextTooLong as e:
        raise BadRequest(str(e), "prompt", code="context_length_exceeded") from None
    reply = Reply(cfg.name, chat, len(ids))
    if body.stream:
        return StreamingResponse(stream(req, events, engine, reply, body.include_usage()),
                                 media_type="text/event-stream")
    return await collect(request, req, events, engine, reply)


@dataclass
class Reply:
    """The response objects of one request, streamed or whole."""

    model: str
    chat: bool
    prompt_tokens: int

    def __post_init__(self) -> None:
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _obj(self, chunk: bool) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + (".chunk" if chunk and self.chat else ""),
                "created": self.created, "model": self.model}

    def choice(self, text: str | None, finish: str | None, chunk: bool) -> dict:
        c: dict = {"index": 0, "finish_reason": finish}
        if not self.chat:
            c.update(text=text or "", logprobs=None)
        elif chunk:
            c["delta"] = {} if text is None else {"content": text}
        else:
            c["message"] = {"role": "assistant", "content": text}
        return c

    def usage(self, completion: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def whole(self, text: str, ev: Event) -> dict:
        return {**self._obj(False), "choices": [self.choice(text, ev.finish_reason, False)],
                "usage": self.usage(ev.completion_tokens)}

    def chunk(self, text: str | None, finish: str | None = None, usage: dict | None = None,
              choices: bool = True) -> str:
        obj = {**self._obj(True), "choices": [self.choice(text, finish, True)] if choices else []}
        if usage is not None:
            obj["usage"] = usage
        return f"data: {json.dumps(obj)}\n\n"


async def stream(req: Request, events: asyncio.Queue, engine: Engine, reply: Reply,
                 include_usage: bool):
    """Server-sent events: a chunk per text delta, the finish reason, [DONE]. The request is
    cancelled (its slot freed) if the client goes away first."""
    try:
        if reply.chat:
            yield reply.chunk(None).replace('"delta": {}', '"delta": {"role": "assistant"}')
        while True:
            ev = await events.get()
            if ev.finish_reason == "error":
                yield f"data: {json.dumps(error_body(ev.text, 'server_error'))}\n\n"
                break
            if ev.text:
                yield reply.chunk(ev.text)
            if ev.finish_reason:
                yield reply.chunk(None if reply.chat else "", ev.finish_reason)
                if include_usage:
                    yield reply.chunk(None, usage=reply.usage(ev.completion_tokens),
                                      choices=False)
                break
        yield "data: [DONE]\n\n"
    finally:
        if not req.done:
            engine.cancel(req)


async def collect(http: HTTPRequest, req: Request, events: asyncio.Queue, engine: Engine,
                  reply: Reply) -> Response:
    """The whole response; the request is cancelled as soon as the client disconnects, however
    fast its tokens come."""
    watcher = asyncio.create_task(cancel_on_disconnect(http, req, engine, events))
    parts = []
    try:
        while True:
            ev = await events.get()
            if ev is None:  # the client went away
                return Response(status_code=499)
            if ev.finish_reason == "error":
                return JSONResponse(error_body(ev.text, "server_error"), status_code=500)
            parts.append(ev.text)
            if ev.finish_reason:
                return JSONResponse(reply.whole("".join(parts), ev))
    finally:
        watcher.cancel()


async def cancel_on_disconnect(http: HTTPRequest, req: Request, engine: Engine,
                               events: asyncio.Queue, every: float = 0.1) -> None:
    """Polls the connection while the request runs; on a disconnect, cancels it (its slot is
    freed at the next engine step) and wakes the collector with None."""
    while not req.done:
        if await http.is_disconnected():
            engine.cancel(req)
            events.put_nowait(None)
            return
        await asyncio.sleep(every)
