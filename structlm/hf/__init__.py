"""Hugging Face's formats, read and written as structlm configs and weights (no run directories:
`structlm.runs` imports and exports runs through this package).

    families.py   the architectures both sides share (Llama, GPT-2, GPT-NeoX), the exact weight
                  mappings both ways, and the transformers config of each
    reader.py     read_hf: a local transformers checkpoint (config.json + safetensors) or a GGUF
                  file -> ModelConfig + structlm weights; no code from the checkpoint runs
    gguf_writer.py write_gguf: a dense Llama-shaped model and its byte-level BPE tokenizer as one
                  llama.cpp GGUF file (`--format gguf`), written with the `gguf` package
    remote/       the modeling code copied beside a `--format hf` export (transformers only)
"""
