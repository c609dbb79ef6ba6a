"""The two files `structlm export --format hf` copies next to the weights, so that transformers
loads a structured model with `trust_remote_code=True` and no structlm installed. They import
only torch and transformers (and each other)."""
