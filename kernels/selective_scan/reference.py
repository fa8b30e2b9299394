"""Sequential selective scan: the oracle (mamba_ssm's ``selective_scan_ref`` semantics, float64-capable).

    h_t = exp(delta_t ⊗ A) ⊙ h_{t-1} + (delta_t * u_t) ⊗ B_t,     y_t = h_t · C_t        (per channel e, state n)

Backends receive validated tensors already in the accumulation dtype; the wrapper in ``__init__`` adds delta_bias,
softplus, the D skip and the z gate, so every backend computes only this core.
"""

from __future__ import annotations

import torch
from torch import Tensor


def selective_scan_reference(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, initial_state: Tensor | None, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """u, delta (batch, E, L); A (E, N); B, C (batch, G, N, L) with G | E; initial_state (batch, E, N) or None.

    Returns y (batch, E, L) and the last state (batch, E, N). ``chunk_size`` is unused (one step at a time).
    """
    batch, E, L = u.shape
    N = A.shape[1]
    group = E // B.shape[1]  # channels per B/C group; channel e reads group e // group
    B = B.repeat_interleave(group, dim=1)  # (batch, E, N, L)
    C = C.repeat_interleave(group, dim=1)
    decay = torch.exp(delta[..., None] * A[:, None, :])  # (batch, E, L, N)
    write = (delta * u)[..., None] * B.transpose(-1, -2)  # (batch, E, L, N)
    h = u.new_zeros(batch, E, N) if initial_state is None else initial_state
    ys = []
    for t in range(L):
        h = decay[:, :, t] * h + write[:, :, t]
        ys.append((h * C[..., t]).sum(-1))  # (batch, E)
    return torch.stack(ys, dim=-1), h
