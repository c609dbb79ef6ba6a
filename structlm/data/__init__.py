"""Text in, token ids out: reading a corpus as documents (sources.py), preparing it into token
files atomically and resumably (prepare.py, with the tokenizing workers in shards.py),
tokenizers and their special tokens (tokenizer.py), and reading prepared data as training and
evaluation batches (batches.py).
"""
