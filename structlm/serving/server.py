"""`structlm serve RUN_DIR`: load a run (pre-merged for few-token calls), start the engine, serve
the API with uvicorn until interrupted."""

from __future__ import annotations

import json
from pathlib import Path

from structlm.data.tokenizer import declared_token, run_tokenizer_path, stop_id
from structlm.runs.generate import Generator
from structlm.serving.engine import Engine


def chat_template(run_dir: Path) -> tuple[str | None, str, str]:
    """(the chat template, bos, eos) from the run's tokenizer files; None when it has none."""
    conf = run_dir / "tokenizer_config.json"
    meta = json.loads(conf.read_text()) if conf.exists() else {}
    tpl = meta.get("chat_template")
    if isinstance(tpl, list):  # several named templates: the default one
        tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
    jinja = run_dir / "chat_template.jinja"
    if tpl is None and jinja.exists():
        tpl = jinja.read_text()
    tok = run_tokenizer_path(run_dir)
    return tpl, declared_token(tok, "bos_token") or "", declared_token(tok, "eos_token") or ""


def build(run_dir: str, *, device: str = "auto", dtype: str = "auto", max_batch: int = 32,
          max_queue: int = 256, prefill_chunk: int = 256, premerge: bool = True,
          calibrate: bool = False, max_tokens: int = 1024, api_key: str | None = None,
          context: int | None = None):
    """(the ASGI app, its engine, not started) for a run directory. `context`: positions each
    slot of the KV cache holds (default: the model's block_size, at most 4096)."""
    try:
        from structlm.serving.api import ServeConfig, create_app  # the [serve] extra
    except ImportError as e:
        raise ImportError(f"structlm serve needs the serve extra ({e.name} is missing): "
                          "pip install 'structlm[serve]'") from None

    g = Generator.load(run_dir, device, dtype, premerge=premerge, calibrate=calibrate)
    eos = stop_id(g.tokenizer, run_tokenizer_path(run_dir)) or 0  # an instruct model's end of turn
    engine = Engine(g.model, g.tokenizer, eos, max_batch=max_batch,
                    max_queue=max_queue, prefill_chunk=prefill_chunk, device=g.device,
                    dtype=g.dtype, max_len=min(context or 4096, g.model.cfg.block_size))
    tpl, bos, eos = chat_template(Path(run_dir))
    cfg = ServeConfig(Path(run_dir).resolve().name, max_tokens, api_key, tpl, bos, eos)
    return create_app(engine, g.tokenizer, cfg), engine


def serve(run_dir: str, host: str = "127.0.0.1", port: int = 8000, **kw) -> None:
    try:
        import uvicorn
    except ImportError:
        raise ImportError("structlm serve needs the serve extra (uvicorn is missing): "
                          "pip install 'structlm[serve]'") from None
    app, engine = build(run_dir, **kw)
    engine.start()
    print(f"serving {run_dir} on http://{host}:{port}/v1 (max batch {engine.max_batch}); "
          "Ctrl-C stops", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        engine.stop()


class BackgroundServer:
    """uvicorn serving `app` on 127.0.0.1 at an ephemeral port, in a thread (benchmarks, tests);
    `close()` stops it and the engine."""

    def __init__(self, app, engine: Engine, start_engine: bool = True) -> None:
        import threading
        import time

        import uvicorn

        self.engine = engine
        if start_engine:
            engine.start()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start (see the log above)")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.stop()
