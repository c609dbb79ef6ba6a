"""The compute kernels under the model: structlm's own C kernels (csrc/, compiled and loaded by
native.py, each with an on/off switch in native.SWITCHES), the block-diagonal products of the
block kinds with their custom ops and Triton kernels (blocks.py, triton_block.py), and the fused
ops the GPT calls: tanh-GELU (gelu.py), causal attention (attention.py), chunked cross-entropy
(xent.py), RoPE (rope.py). Each has a reference path in PyTorch ops and dispatches by device,
dtype and switch.
"""
