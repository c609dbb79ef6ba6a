"""The GPT and what is computed from its config: the network (gpt.py), its key/value caches
(cache.py), sampling (sampling.py), parameter groups and FLOPs (flops.py), and structure-aware
µP multipliers and inits (mup.py). Nothing here knows of training, data or distribution.
"""
