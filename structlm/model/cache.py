"""Key/value caches: KVCache for one batch of sequences decoded together, SlotCache for the
server's slots.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Per-layer key/value buffers (B, n_kv_head, max_len, head_dim), allocated on first write.

    Keys are stored already rotated (RoPE of absolute positions), which equals rotating cached raw
    keys.
    `length` counts the positions written; `GPT.forward` advances it after each call.
    """

    def __init__(self, n_layer: int, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.k: list[Tensor | None] = [None] * n_layer
        self.v: list[Tensor | None] = [None] * n_layer

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v: (B, n_kv, T, hs) at [length, length+T); return keys/values 0..length+T-1."""
        B, nkv, T, hs = k.shape
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(B, nkv, self.max_len, hs)
            self.v[layer] = v.new_zeros(B, nkv, self.max_len, hs)
        kc, vc = self.k[layer], self.v[layer]
        kc[:, :, self.length : end] = k
        vc[:, :, self.length : end] = v
        return kc[:, :, :end], vc[:, :, :end]


class SlotCache:
    """The KV cache of continuous batching: `slots` independent sequences, each with its own
    length, in per-layer buffers (slots, n_kv_head, max_len, head_dim). A forward works on the
    slots `select`ed for it (its batch rows, in order): row b's T new tokens take positions
    lengths[slot_b] .. +T-1 and attend to that slot's keys up to their own position, so a sequence
    computes the same whichever others share the batch, and no row waits for the longest."""

    def __init__(self, n_layer: int, slots: int, max_len: int) -> None:
        self.max_len, self.slots = max_len, slots
        self.lengths = torch.zeros(slots, dtype=torch.long)
        self.rows = torch.zeros(0, dtype=torch.long)
        self.k: list[Tensor | None] = [None] * n_layer
        self.v: list[Tensor | None] = [None] * n_layer

    def select(self, slots: list[int]) -> None:
        """The slots the next forward's batch rows are (row b = slots[b])."""
        self.rows = torch.tensor(slots, dtype=torch.long)

    def positions(self, T: int, device) -> Tensor:
        """(B, T) absolute positions of the next forward's tokens."""
        return (self.lengths[self.rows][:, None] + torch.arange(T)).to(device)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Write k, v: (B, n_kv, T, hs) at each row's positions; return the rows' keys and values
        (B, n_kv, L, hs), L the longest row's length, and the mask (B, 1, T, L) of the keys each
        query may see."""
        B, nkv, T, hs = k.shape
        pos = self.positions(T, k.device)  # (B, T)
        if int(pos.max()) >= self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {int(pos.max()) + 1} "
                             "requested")
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(self.slots, nkv, self.max_len, hs)
            self.v[layer] = v.new_zeros(self.slots, nkv, self.max_len, hs)
        rows = self.rows.to(k.device)
        self.k[layer][rows[:, None], :, pos] = k.transpose(1, 2)  # (B, T, nkv, hs) at (row, pos)
        self.v[layer][rows[:, None], :, pos] = v.transpose(1, 2)
        L = int(pos.max()) + 1
        mask = torch.arange(L, device=k.device)[None, None, :] <= pos[:, :, None]  # (B, T, L)
        return self.k[layer][rows, :, :L], self.v[layer][rows, :, :L], mask[:, None]

    def advance(self, T: int) -> None:
        self.lengths[self.rows] += T
