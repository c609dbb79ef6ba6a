"""A run directory and what is done with it: atomic, verified checkpoints (checkpoint.py; sharded
ones in dcp.py), loading a model, evaluating it (evaluate.py), generating from it (generate.py),
structuring a dense run (convert.py), importing a Hugging Face checkpoint or GGUF file as a run
(importer.py) and exporting a run as a transformers directory (export.py).
"""
