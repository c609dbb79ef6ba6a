"""`structlm serve RUN_DIR`: load a run (pre-merged for few-token calls), start the engine, serve
the API with uvicorn until SIGINT or SIGTERM, then shut down gracefully."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from structlm.runs.generate import Generator
from structlm.runs.run import Run
from structlm.serving.engine import Engine


def build(run_dir: str, *, device: str = "auto", dtype: str = "auto", max_batch: int = 32,
          max_queue: int = 256, prefill_chunk: int = 256, premerge: bool = True,
          calibrate: bool = False, max_tokens: int = 1024, api_key: str | None = None,
          context: int | None = None, max_body_mb: float = 4.0):
    """(the ASGI app, its engine, not started) for a run directory. `context`: positions each
    slot of the KV cache holds (default: the model's block_size, at most 4096); `max_body_mb`:
    the largest request body in MiB (larger ones are answered 413)."""
    try:
        from structlm.serving.api import ServeConfig, create_app  # the [serve] extra
    except ImportError as e:
        raise ImportError(f"structlm serve needs the serve extra ({e.name} is missing): "
                          "pip install 'structlm[serve]'") from None

    run = Run.open(run_dir)
    g = Generator.load(run, device, dtype, premerge=premerge, calibrate=calibrate)
    eos = run.stop_id(g.tokenizer)  # an instruct model's end of turn, else the end of text
    engine = Engine(g.model, g.tokenizer, eos, max_batch=max_batch,
                    max_queue=max_queue, prefill_chunk=prefill_chunk, device=g.device,
                    dtype=g.dtype, max_len=min(context or 4096, g.model.cfg.block_size))
    bos, eos_text = run.special_token("bos_token") or "", run.special_token("eos_token") or ""
    cfg = ServeConfig(Path(run_dir).resolve().name, max_tokens, api_key, run.chat_template(),
                      bos, eos_text, max(1, int(max_body_mb * 2**20)))
    return create_app(engine, g.tokenizer, cfg), engine


def serve(run_dir: str, host: str = "127.0.0.1", port: int = 8000, *,
          graceful_timeout: float = 30.0, **kw) -> None:
    """Serves `run_dir` (port 0: any free port, printed) until SIGINT or SIGTERM. Either stops
    the server gracefully: no new connections, requests in flight finish (those still running
    after `graceful_timeout` seconds are cancelled), then the engine stops. After SIGTERM this
    returns (the process exits 0); after SIGINT, KeyboardInterrupt propagates."""
    try:
        import uvicorn
    except ImportError:
        raise ImportError("structlm serve needs the serve extra (uvicorn is missing): "
                          "pip install 'structlm[serve]'") from None
    app, engine = build(run_dir, **kw)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=graceful_timeout)
    sock = config.bind_socket()  # bound here, so that the port chosen for port 0 is known,
    sock.listen(config.backlog)  # and listening: connections wait until the server accepts them
    engine.start()
    print(f"serving {run_dir} on http://{host}:{sock.getsockname()[1]}/v1 "
          f"(max batch {engine.max_batch}); Ctrl-C or SIGTERM stops", flush=True)
    server = uvicorn.Server(config)

    def stop(signum: int, frame) -> None:
        """SIGTERM: stop serving gracefully. While it runs, uvicorn's own handler does that, then
        raises the signal again under this one, which takes it: the process is not killed by
        it (exit 143) but returns from here."""
        server.should_exit = True

    main = threading.current_thread() is threading.main_thread()  # where signals are handled
    previous = signal.signal(signal.SIGTERM, stop) if main else None
    try:
        server.run(sockets=[sock])
    finally:
        if main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
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
