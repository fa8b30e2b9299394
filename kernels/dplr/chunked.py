"""Chunked DPLR delta rule: the CPU path. Matmuls and one triangular solve per chunk, a loop over chunks only.

Per batch and head, S_t = diag(exp g_t) S_{t-1} + b_t^T (a_t S_{t-1}) + k_t^T v_t and o_t = q_t S_t (q scaled).
Inside a chunk of C positions that starts from the state S_0, write G_t = g_1 + ... + g_t (the cumulative log decay,
per key channel) and u_t = a_t S_{t-1} (what the low-rank part reads). Unrolling the recurrence,

    u_t = (a_t e^{G_{t-1}}) S_0 + sum_{s<t} [a_t . (b_s e^{G_{t-1} - G_s})] u_s + [a_t . (k_s e^{G_{t-1} - G_s})] v_s
    o_t = (q_t e^{G_t}) S_0   + sum_{s<=t} [q_t . (b_s e^{G_t - G_s})] u_s   + [q_t . (k_s e^{G_t - G_s})] v_s
    S_C = diag(e^{G_C}) S_0   + sum_s (b_s e^{G_C - G_s})^T u_s + (k_s e^{G_C - G_s})^T v_s

so U = W S_0 + U0 with W = (I - A_ab)^{-1} (a e^{G_-}) and U0 = (I - A_ab)^{-1} A_ak V, A_ab and A_ak the strictly
lower (C, C) matrices of the brackets: one unit-triangular solve (the UT transform of the delta rule, here with a
per-channel decay). The chunk-to-chunk recurrence is then S_{c+1} = P_c S_c + R_c with P_c = diag(e^{G_C}) + B~^T W,
R_c = B~^T U0 + K~^T V, a loop over T / C chunks; outputs follow in one batched product per chunk.

The decays enter only as e^{G_t - G_s} with t >= s, which is at most 1, computed per (t, s, channel) pair: no
e^{-G} factor can overflow however strong the decay (the factored forms e^{G_t} e^{-G_s} overflow float32 once a chunk
accumulates a log decay below about -88). That pairwise tensor is (C, C, K) per chunk, hence the small default chunk.
Gradients flow through these operations by autograd (the solve and the chunk loop included): no per-step loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _chunks(t: Tensor, chunk_size: int) -> Tensor:
    """(B, T, H, D) -> (B, H, N, C, D), zero-padded at the end to N * C positions (zeros change nothing: no write,
    no read, no decay)."""
    B, T, H, D = t.shape
    pad = -T % chunk_size
    if pad:
        t = F.pad(t, (0, 0, 0, 0, 0, pad))
    return t.view(B, (T + pad) // chunk_size, chunk_size, H, D).permute(0, 3, 1, 2, 4)


def dplr_chunked(
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
    """Same inputs and outputs as :func:`attnzoo.kernels.dplr.reference.dplr_reference` (the state is always
    returned; ``output_final_state`` is accepted for the uniform backend signature)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    q, k, v, a, b, g = (_chunks(t, C) for t in (q * scale, k, v, a, b, g))  # (B, H, N, C, K|V)
    G = g.cumsum(-2)  # (B, H, N, C, K) G_t, inclusive
    G_before = G - g  # G_{t-1}
    positions = torch.arange(C, device=q.device)
    strict = (positions[:, None] > positions[None, :])[..., None]  # (C, C, 1) s < t
    inclusive = (positions[:, None] >= positions[None, :])[..., None]  # (C, C, 1) s <= t
    minus_inf = torch.tensor(float("-inf"), dtype=q.dtype, device=q.device)
    # e^{G_{t-1} - G_s} (s < t) and e^{G_t - G_s} (s <= t), (B, H, N, C, C, K); the masked exponents become -inf
    # before exp, so pairs with s > t (whose exponent may be large and positive) never overflow
    decay_read = torch.where(strict, G_before[..., :, None, :] - G[..., None, :, :], minus_inf).exp()
    decay_out = torch.where(inclusive, G[..., :, None, :] - G[..., None, :, :], minus_inf).exp()
    a_decayed = a[..., :, None, :] * decay_read  # (B, H, N, C, C, K)
    q_decayed = q[..., :, None, :] * decay_out
    A_ab = (a_decayed * b[..., None, :, :]).sum(-1)  # (B, H, N, C, C)
    A_ak = (a_decayed * k[..., None, :, :]).sum(-1)
    A_qb = (q_decayed * b[..., None, :, :]).sum(-1)
    A_qk = (q_decayed * k[..., None, :, :]).sum(-1)

    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    rhs = torch.cat([a * G_before.exp(), A_ak @ v], dim=-1)  # (B, H, N, C, K + V)
    W, U0 = torch.linalg.solve_triangular(eye - A_ab, rhs, upper=False, unitriangular=True).split([K, V], dim=-1)

    to_end = (G[..., -1:, :] - G).exp()  # (B, H, N, C, K) e^{G_C - G_s} <= 1
    b_end, k_end = (b * to_end).transpose(-1, -2), (k * to_end).transpose(-1, -2)  # (B, H, N, K, C)
    transition = torch.diag_embed(G[..., -1, :].exp()) + b_end @ W  # (B, H, N, K, K)
    written = b_end @ U0 + k_end @ v  # (B, H, N, K, V)

    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state
    starts = []
    # over chunks, not positions; unbind (not indexing) so the backward stacks the N gradients once instead of
    # scattering each into a zero-filled copy of the whole (B, H, N, K, K) tensor
    for transition_n, written_n in zip(transition.unbind(2), written.unbind(2), strict=True):
        starts.append(state)
        state = torch.baddbmm(written_n.flatten(0, 1), transition_n.flatten(0, 1), state.flatten(0, 1)).view_as(state)
    S = torch.stack(starts, dim=2)  # (B, H, N, K, V) the state before each chunk

    o = (q * G.exp() + A_qb @ W) @ S + A_qb @ U0 + A_qk @ v  # (B, H, N, C, V)
    o = o.permute(0, 2, 3, 1, 4).reshape(B, -1, H, V)[:, :T]
    return o, state
