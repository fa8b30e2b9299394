"""Token-by-token diagonal-plus-low-rank (DPLR) delta rule: the oracle (float64-capable, plain autograd), as FLA's
``dplr_recurrence`` (fla/ops/generalized_delta_rule/dplr/naive.py). Per batch and head, with q already scaled:

    S_t = diag(exp(g_t)) S_{t-1} + b_t^T (a_t S_{t-1}) + k_t^T v_t,     o_t = q_t S_t

i.e. the transition diag(exp g_t) + b_t^T a_t is applied to the previous state, then k_t^T v_t is written.
A Python loop over T: use it on small shapes only (tests, and as the baseline of the benchmarks).
"""

from __future__ import annotations

import torch
from torch import Tensor


def dplr_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    g: Tensor,
    scale: float,
    initial_state: Tensor | None,
    chunk_size: int = 16,
    output_final_state: bool = True,
) -> tuple[Tensor, Tensor]:
    """q, k, a, b, g (B, T, H, K); v (B, T, H, V); initial_state (B, H, K, V) or None
    -> (o (B, T, H, V), final state (B, H, K, V)).

    Inputs are already in the accumulation dtype (float32 or float64); ``chunk_size`` and ``output_final_state`` are
    ignored (uniform signature; the state is always returned).
    """
    B, T, H, K = q.shape
    state = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state
    outputs = []
    for t in range(T):
        read = torch.einsum("bhk,bhkv->bhv", a[:, t], state)  # a_t S_{t-1}: (B, H, V)
        state = (
            g[:, t, :, :, None].exp() * state
            + b[:, t, :, :, None] * read[:, :, None, :]
            + k[:, t, :, :, None] * v[:, t, :, None, :]
        )
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, state))
    return torch.stack(outputs, dim=1), state  # (B, T, H, V), (B, H, K, V)
