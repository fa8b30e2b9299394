"""Chunked delta rule in torch: the CPU path (the WY / UT-transform algorithm of FLA's ``chunk_delta_rule``).

Per batch and head, chunk n of length C holds positions nC .. nC + C - 1, S_n is the state at its start, q is
already scaled, b = cumsum of g restarted in every chunk (b = 0 without a gate), gamma = exp(b). Unrolling the
recurrence inside a chunk gives u_i = beta_i (v_i - k_i S'_i), the value each position actually writes, as the
solution of one unit lower-triangular system:

    D_ij  = exp(b_i - b_j) for j <= i, else 0                    (decay from j to i; every exponent <= 0)
    L     = strictly_lower(diag(beta) ((K K^T) ⊙ D)),   T = (I + L)^{-1}   (the UT transform)
    U     = T diag(beta) V,     W = T diag(beta ⊙ gamma) K       (the WY representation)
    u     = U - W S_n
    o     = (Q ⊙ gamma) S_n + ((Q K^T) ⊙ D) u
    S_n+1 = gamma_last S_n + (K ⊙ delta)^T u,    delta_j = exp(b_last - b_j)

Everything but the state carry is a batched matmul over all chunks at once. The carry is linear in S_n:
S_n+1 = F_n S_n + E_n with F_n = gamma_last I - (K ⊙ delta)^T W (K x K) and E_n = (K ⊙ delta)^T U (K x V), both
batched, so the loop over chunks (never over time) is one fused multiply-add per chunk.

The decays are only ever formed as differences b_i - b_j with j <= i (never exp(b_i) exp(-b_j)), so no gate,
however negative, overflows; with L2-normalised keys and beta in (0, 1) the entries of L lie in [-1, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _to_chunks(x: Tensor, C: int) -> Tensor:
    """(B, T, H, ...) -> contiguous (B, H, N, C, ...), zero-padding T to a multiple of C at the FRONT.

    Zero k (no write) and g = 0 (no decay) before position 0 leave the initial state untouched, so front padding
    changes nothing; the padded rows' outputs and gradients are dropped.
    """
    B, T, H = x.shape[:3]
    pad = (-T) % C
    x = x.movedim(1, 2)  # (B, H, T, ...)
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (pad, 0))
    return x.reshape(B, H, (T + pad) // C, C, *x.shape[3:]).contiguous()


def _from_chunks(x: Tensor, T: int) -> Tensor:
    """(B, H, N, C, ...) -> (B, T, H, ...), dropping the padded front."""
    B, H, N, C = x.shape[:4]
    return x.reshape(B, H, N * C, *x.shape[4:])[:, :, N * C - T :].movedim(2, 1)


def _decays(b: Tensor | None, C: int, like: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(D, gamma, delta) from the chunk-local cumsum b (B, H, N, C); without a gate D is the causal mask of ones
    and gamma = delta = None (all ones)."""
    causal = torch.ones(C, C, dtype=torch.bool, device=like.device).tril()
    if b is None:
        return causal.to(like.dtype), None, None
    # -inf above the diagonal BEFORE exp: exp(b_i - b_j) for j > i would overflow for very negative gates
    D = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    return D, b.exp(), (b[..., -1:] - b).exp()


def delta_rule_chunked(
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
    """q, k (B, T, H, K), v (B, T, H, V), beta, g (B, T, H) or g None, initial_state (B, H, K, V) or None
    -> (o (B, T, H, V), final state (B, H, K, V)).

    Inputs are already in the accumulation dtype; ``chunk_size`` is a power of two (shrunk to the next power of two
    >= T for short inputs; the result does not depend on it beyond rounding).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = min(chunk_size, 1 << max(T - 1, 0).bit_length())
    q, k, v, beta = _to_chunks(q * scale, C), _to_chunks(k, C), _to_chunks(v, C), _to_chunks(beta, C)
    b = None if g is None else _to_chunks(g, C).cumsum(-1)
    D, gamma, delta = _decays(b, C, q)
    N = q.shape[2]
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    L = ((k @ k.transpose(-1, -2)) * D * beta[..., None]).tril(-1)
    Tm = torch.linalg.solve_triangular(eye + L, eye.expand_as(L), upper=False, unitriangular=True)
    k_beta = k * beta[..., None]
    U = Tm @ (v * beta[..., None])
    W = Tm @ (k_beta if gamma is None else k_beta * gamma[..., None])
    k_end = k if delta is None else k * delta[..., None]  # each key as seen at the chunk end
    carry_in = -(k_end.transpose(-1, -2) @ W)  # (B, H, N, K, K)
    carry_in.diagonal(dim1=-2, dim2=-1).add_(1.0 if gamma is None else gamma[..., -1:])
    writes = k_end.transpose(-1, -2) @ U  # (B, H, N, K, V)
    starts = [q.new_zeros(B, H, K, V) if initial_state is None else initial_state]
    for n in range(N):
        starts.append(
            torch.baddbmm(
                writes[:, :, n].flatten(0, 1), carry_in[:, :, n].flatten(0, 1), starts[-1].flatten(0, 1)
            ).view(B, H, K, V)
        )
    final = starts.pop()
    S = torch.stack(starts, dim=2)  # (B, H, N, K, V)
    u = U - W @ S
    q_start = q if gamma is None else q * gamma[..., None]
    o = q_start @ S + ((q @ k.transpose(-1, -2)) * D) @ u
    return _from_chunks(o, T), final
