"""Quadratic (masked) reference of un-normalised linear attention: the oracle, float64-capable, plain autograd.

    o = (q k^T ⊙ M) v + q S_0,   S_final = S_0 + k^T v,   M = lower-triangular ones (causal) or all ones

Memory is O(T·S) per head, so use it on small shapes only (tests, and as the "quadratic form" in benchmarks).
"""

from __future__ import annotations

import torch
from torch import Tensor


def linear_attn_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    initial_state: Tensor | None,
    chunk_size: int = 64,
    output_final_state: bool = True,
) -> tuple[Tensor, Tensor]:
    """q (B, T, H, K), k (B, S, H, K), v (B, S, H, V), initial_state (B, H, K, V) or None -> (o, final state).

    ``chunk_size`` and ``output_final_state`` are accepted for a uniform backend signature and ignored (the state
    is always returned).
    """
    scores = torch.einsum("bthk,bshk->bhts", q, k)  # (B, H, T, S)
    if causal:
        T = q.shape[1]
        scores = scores * torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    o = torch.einsum("bhts,bshv->bthv", scores, v)  # (B, T, H, V)
    state = torch.einsum("bshk,bshv->bhkv", k, v)  # (B, H, K, V)
    if initial_state is not None:
        o = o + torch.einsum("bthk,bhkv->bthv", q, initial_state)
        state = state + initial_state
    return o, state
