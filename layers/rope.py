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

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        T = x.shape[1]
        # angles in float32 at least (bf16 positions would collide past 256), float64 for float64 inputs
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        positions = torch.arange(offset, offset + T, device=x.device, dtype=torch.float64)
        angles = torch.outer(positions, self.inv_freq.to(x.device)).to(compute_dtype)  # (T, D/2)
        cos = angles.cos()[None, :, None, :]  # (1, T, 1, D/2)
        sin = angles.sin()[None, :, None, :]
        x1, x2 = x.to(compute_dtype).chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return rotated.to(x.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"
