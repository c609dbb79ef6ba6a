"""Hugging Face interop: export a run as a transformers model directory, import a transformers
checkpoint as a structlm run.

    families.py   the architectures both sides share, and the exact weight mappings
    export.py     export_run: a run -> LlamaForCausalLM / GPT2LMHeadModel / GPTNeoXForCausalLM
    importer.py   read_hf / import_hf: a local transformers checkpoint -> structlm (no code run)
"""
