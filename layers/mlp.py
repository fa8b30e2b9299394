"""Feed-forward layers by name, reusing timm's: ``gelu`` (timm ``Mlp``: fc1 -> GELU -> fc2) and ``swiglu``
(Shazeer 2020, "GLU Variants Improve Transformer", https://arxiv.org/abs/2002.05202: fc2(silu(fc1_g x) * fc1_x x),
timm ``SwiGLU``)."""

from __future__ import annotations

from timm.layers import Mlp, SwiGLU
from torch import nn

from attnzoo.errors import unknown

MLPS = ("gelu", "swiglu")


def create_mlp(name: str, dim: int, hidden_dim: int, *, bias: bool = True, drop: float = 0.0) -> nn.Module:
    """An MLP dim -> hidden_dim -> dim. For ``swiglu`` pass the gated width (LLaMA uses 2/3 of 4*dim)."""
    key = name.lower()
    if key == "gelu":
        return Mlp(dim, hidden_dim, act_layer=nn.GELU, bias=bias, drop=drop)
    if key == "swiglu":
        return SwiGLU(dim, hidden_dim, bias=bias, drop=drop)
    raise ValueError(unknown("mlp", name, MLPS))
