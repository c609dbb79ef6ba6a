"""Serving: `structlm serve RUN_DIR`, an OpenAI-compatible HTTP server over a continuous-batching
engine.

    engine.py    schedules requests onto the slots of one batched KV cache and decodes them
                 together, step by step, prompts prefilled in budgeted chunks
    schemas.py   the OpenAI request bodies (pydantic)
    api.py       the ASGI app (FastAPI, the optional `[serve]` extra): errors, the body size
                 limit, the API key, SSE
    metrics.py   the Prometheus metrics of /metrics (prometheus_client, in the `[serve]` extra)
    server.py    loading a run for serving, and uvicorn (graceful on SIGINT and SIGTERM)

The load generator of `structlm bench serve` is structlm.bench.load.
"""
