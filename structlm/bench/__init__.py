"""`structlm bench`: the suite split by theme (kernels.py: peak, kernel, ffn; train.py: the step
against nanoGPT; decode.py: decode, prefill, crossover, maxbatch; memory.py with probe.py, its
torchrun worker; serve.py with load.py, the load generator), the µP coordinate check (coord.py),
and the table that names them all (suite.py).
"""
