"""Rotary position embedding — Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding",
https://arxiv.org/abs/2104.09864

    rope(x)_t = [x1 * cos(t * f) - x2 * sin(t * f),  x2 * cos(t * f) + x1 * sin(t * f)],   f_i = base^(-2i / D)

with x = [x1, x2] split in halves (the GPT-NeoX / LLaMA layout). q_t . k_s then depends on t - s only, which is what
makes cached decoding with an ``offset`` equal to a full forward. base = 10000 as in the paper.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """Rotate (B, T, H, D) queries or keys by their absolute positions ``offset .. offset + T - 1``."""

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"rotary embedding needs an even head dimension; got head_dim={head_dim}.")
        self.head_dim = head_dim
        self.base = base
        # kept in float64 and never saved: recomputed identically on load, precise enough for long contexts
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._tables: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

    def _cos_sin(self, end: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos and sin of the angles of positions 0 .. >= end - 1, (positions, D/2), grown by doubling: decoding then
        costs a slice per step instead of four trigonometric ops per call."""
        key = (dtype, device)
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < end:
            length = max(end, 2 * (0 if table is None else table[0].shape[0]), 256)
            positions = torch.arange(length, device=device, dtype=torch.float64)
            angles = torch.outer(positions, self.inv_freq.to(device)).to(dtype)  # (positions, D/2)
            table = self._tables[key] = (angles.cos(), angles.sin())
        return table

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        T = x.shape[1]
        # angles in float32 at least (bf16 positions would collide past 256), float64 for float64 inputs
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        cos, sin = self._cos_sin(offset + T, compute_dtype, x.device)
        cos = cos[offset : offset + T, None, :]  # (T, 1, D/2)
        sin = sin[offset : offset + T, None, :]
        x1, x2 = x.to(compute_dtype).chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return rotated.to(x.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"
