"""Token-by-token GLA recurrence: the oracle (float64-capable, plain autograd), as in FLA's ``naive_recurrent_gla``.

    S_t = diag(exp g_t) S_{t-1} + k_t^T v_t,     o_t = scale * q_t S_t

The scalar ("simple GLA") variant is the same loop with g_t broadcast over K. A Python loop over T: use it on small
shapes only (tests, and as the baseline of the benchmarks).
"""

from __future__ import annotations

import torch
from torch import Tensor


def gla_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float,
    initial_state: Tensor | None,
    chunk_size: int = 64,
    output_final_state: bool = True,
) -> tuple[Tensor, Tensor]:
    """q, k, g (B, T, H, K) or g (B, T, H, 1); v (B, T, H, V); initial_state (B, H, K, V) or None -> (o, final state).

    Inputs are already in the accumulation dtype (float32 or float64); ``chunk_size`` and
    ``output_final_state`` are ignored (uniform signature; the state is always returned).
    """
    B, T, H, K = q.shape
    state = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state
    decay = g.exp()  # (B, T, H, K or 1)
    outputs = []
    for t in range(T):
        state = decay[:, t, :, :, None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]  # (B, H, K, V)
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, state))
    return torch.stack(outputs, dim=1), state  # (B, T, H, V), (B, H, K, V)
