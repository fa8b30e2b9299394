"""Token-by-token delta rule: the oracle (float64-capable, plain autograd), as FLA's ``delta_rule_recurrence`` and
``naive_recurrent_gated_delta_rule``. Per batch and head, with q already scaled:

    S'_t = exp(g_t) S_{t-1}                     (gated only: the decay comes first)
    u_t  = beta_t (v_t - k_t S'_t)              (the correction of what the state already predicts for k_t)
    S_t  = S'_t + k_t^T u_t,     o_t = q_t S_t

A Python loop over T: use it on small shapes only (tests, and as the baseline of the benchmarks).
"""

from __future__ import annotations

import torch
from torch import Tensor


def delta_rule_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None,
    scale: float,
    initial_state: Tensor | None,
    chunk_size: int = 64,
    output_final_state: bool = True,
) -> tuple[Tensor, Tensor]:
    """q, k (B, T, H, K); v (B, T, H, V); beta, g (B, T, H) (g None: no decay); initial_state (B, H, K, V) or None
    -> (o (B, T, H, V), final state (B, H, K, V)).

    Inputs are already in the accumulation dtype (float32 or float64); ``chunk_size`` and ``output_final_state`` are
    ignored (uniform signature; the state is always returned).
    """
    B, T, H, K = q.shape
    state = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state
    decay = None if g is None else g.exp()  # (B, T, H)
    outputs = []
    for t in range(T):
        if decay is not None:
            state = decay[:, t, :, None, None] * state
        k_t = k[:, t]  # (B, H, K)
        predicted = torch.einsum("bhk,bhkv->bhv", k_t, state)
        u_t = beta[:, t, :, None] * (v[:, t] - predicted)  # (B, H, V)
        state = state + k_t[..., :, None] * u_t[..., None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, state))
    return torch.stack(outputs, dim=1), state  # (B, T, H, V), (B, H, K, V)
