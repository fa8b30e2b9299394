"""The pre-norm residual transformer block shared by the GPT and encoder backbones.

x = x + drop_path(attn(norm1(x)))
x = x + drop_path(mlp(norm2(x)))          (skipped when mlp_ratio == 0, as in Mamba's mixer-only blocks)
"""

from __future__ import annotations

from typing import Any

from timm.layers import DropPath
from torch import Tensor, nn

from attnzoo.layers.mlp import create_mlp
from attnzoo.layers.norm import create_norm
from attnzoo.layers.registry import build_attention


class Block(nn.Module):
    """Pre-norm block around any registered attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention: Any = "softmax",
        *,
        causal: bool = False,
        mlp: str = "gelu",
        mlp_ratio: float = 4.0,
        norm: str = "layernorm",
        norm_eps: float = 1e-5,
        bias: bool = True,
        dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        """
        Args:
            dim: model width.
            num_heads: attention heads.
            attention: a registered name or ``{"name": ..., **options}``.
            causal: build the attention causal.
            mlp: ``gelu`` or ``swiglu``.
            mlp_ratio: hidden width / dim; 0 drops the MLP.
            norm: ``layernorm`` or ``rmsnorm``.
            norm_eps: epsilon of both norms.
            bias: biases in the MLP.
            dropout: dropout inside the MLP.
            drop_path: stochastic-depth rate of both residual branches.
        """
        super().__init__()
        self.norm1 = create_norm(norm, dim, norm_eps)
        self.attn = build_attention(attention, dim=dim, num_heads=num_heads, causal=causal)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if mlp_ratio > 0:
            self.norm2 = create_norm(norm, dim, norm_eps)
            self.mlp = create_mlp(mlp, dim, int(dim * mlp_ratio), bias=bias, drop=dropout)
        else:
            self.norm2 = self.mlp = None

    def forward(self, x: Tensor, *, padding_mask: Tensor | None = None, cache: Any = None) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), padding_mask=padding_mask, cache=cache))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x
