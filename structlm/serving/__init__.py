"""Serving: `structlm serve RUN_DIR`, an OpenAI-compatible HTTP server over a continuous-batching
engine. `engine.py` schedules requests onto the slots of one batched KV cache and decodes them
together, step by step; `api.py` is the ASGI app (FastAPI, the optional `[serve]` extra)."""
