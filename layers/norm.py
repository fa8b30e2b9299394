"""Normalisation layers by name: ``layernorm`` (Ba et al. 2016) and ``rmsnorm`` (Zhang & Sennrich 2019)."""

from __future__ import annotations

from torch import nn

from attnzoo.errors import unknown

_NORMS = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}


def create_norm(name: str, dim: int, eps: float = 1e-5) -> nn.Module:
    """``create_norm("rmsnorm", 64)``; an unknown name raises with the valid ones."""
    key = name.lower().replace("_", "")
    if key not in _NORMS:
        raise ValueError(unknown("norm", name, _NORMS))
    return _NORMS[key](dim, eps=eps)
