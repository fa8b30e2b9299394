"""The key/value cache of softmax-family layers: grows by doubling, so decoding T tokens costs O(T) copies."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class KVCache:
    """Keys and values of every position seen so far, (B, S, H, D) each, plus the key padding mask if any.

    Buffers are allocated on the first update with that update's dtype and device, and their capacity doubles when
    full, so ``update`` is amortised O(new tokens).
    """

    batch_size: int
    length: int = 0
    keys: Tensor | None = None  # (B, capacity, H, D)
    values: Tensor | None = None  # (B, capacity, H, Dv)
    key_mask: Tensor | None = None  # (B, capacity) bool, allocated once a padding mask is seen

    def update(self, k: Tensor, v: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Append T new keys/values (and their (B, T) mask); return all keys, values and mask so far."""
        B, T = k.shape[:2]
        if self.batch_size != B:
            raise ValueError(f"cache was made for batch size {self.batch_size}; got a batch of {B}.")
        end = self.length + T
        if self.keys is None or end > self.keys.shape[1]:
            self._grow(k, v, max(end, 2 * (0 if self.keys is None else self.keys.shape[1]), 16))
        self.keys[:, self.length : end] = k
        self.values[:, self.length : end] = v
        if mask is not None and self.key_mask is None:
            self.key_mask = torch.ones(B, self.keys.shape[1], dtype=torch.bool, device=k.device)
        if self.key_mask is not None:
            self.key_mask[:, self.length : end] = True if mask is None else mask
        self.length = end
        key_mask = None if self.key_mask is None else self.key_mask[:, :end]
        return self.keys[:, :end], self.values[:, :end], key_mask

    def _grow(self, k: Tensor, v: Tensor, capacity: int) -> None:
        B = k.shape[0]
        keys = k.new_zeros(B, capacity, *k.shape[2:])
        values = v.new_zeros(B, capacity, *v.shape[2:])
        if self.keys is not None:
            keys[:, : self.length] = self.keys[:, : self.length]
            values[:, : self.length] = self.values[:, : self.length]
        self.keys, self.values = keys, values
        if self.key_mask is not None:
            key_mask = torch.ones(B, capacity, dtype=torch.bool, device=k.device)
            key_mask[:, : self.length] = self.key_mask[:, : self.length]
            self.key_mask = key_mask
