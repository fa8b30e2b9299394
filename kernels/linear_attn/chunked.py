"""Chunked linear attention in torch: the CPU path.

Causal (chunk size C, N = ceil(T / C) chunks, chunk n holds positions nC .. nC + C - 1):

    o_n = (q_n k_n^T ⊙ tril) v_n + q_n S_n,     S_n = S_0 + sum_{m<n} k_m^T v_m   (state at the start of chunk n)

All chunks are processed at once with batched matmuls (no Python loop over time or chunks): the per-chunk updates
k_n^T v_n are (N, K, V) and their exclusive cumulative sum gives every S_n. Memory per head is O(T·C + T·K·V / C),
i.e. O(T·d) at the default C = 64 ≈ d, never per-token K x V states. The backward (a custom autograd.Function) keeps
only q, k, v and S_0 and recomputes the chunk states, so training memory stays at that size too:

    dA = (do v^T) ⊙ tril,  dq_n = dA k_n + do_n S_n^T,  dk_n = dA^T q_n + v_n G_n^T,  dv_n = A^T do_n + k_n G_n,
    G_n = dS_final + sum_{m>n} q_m^T do_m   (gradient reaching the state after chunk n),   dS_0 = G_{-1}.

Non-causal: S = S_0 + k^T v, o = q S (two matmuls, autograd).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _to_chunks(x: Tensor, C: int) -> Tensor:
    """(B, T, H, D) -> (B, H, N, C, D), zero-padding T up to a multiple of C (zero k/v add nothing to the state)."""
    B, T, H, D = x.shape
    pad = (-T) % C
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    return x.transpose(1, 2).reshape(B, H, -1, C, D)


def _from_chunks(x: Tensor, T: int) -> Tensor:
    """(B, H, N, C, D) -> (B, T, H, D), dropping the padded tail."""
    B, H, N, C, D = x.shape
    return x.reshape(B, H, N * C, D)[:, :, :T].transpose(1, 2)


def _chunk_states(k: Tensor, v: Tensor, initial_state: Tensor | None) -> tuple[Tensor, Tensor]:
    """States at the start of every chunk (B, H, N, K, V) and the final state (B, H, K, V)."""
    kv = k.transpose(-1, -2) @ v  # (B, H, N, K, V): each chunk's write
    inclusive = kv.cumsum(2)
    final = inclusive[:, :, -1]
    # exclusive prefix sum by shifting, not by subtracting kv (which would cancel catastrophically)
    starts = torch.cat([torch.zeros_like(kv[:, :, :1]), inclusive[:, :, :-1]], dim=2)
    if initial_state is not None:
        starts = starts + initial_state[:, :, None]
        final = final + initial_state
    return starts, final


class _CausalChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, initial_state: Tensor | None):  # chunked (B, H, N, C, D)
        C = q.shape[-2]
        tril = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        starts, final = _chunk_states(k, v, initial_state)
        scores = (q @ k.transpose(-1, -2)).masked_fill_(~tril, 0)  # (B, H, N, C, C)
        o = scores @ v
        o = o.add_(q @ starts)  # (B, H, N, C, V)
        ctx.save_for_backward(q, k, v, initial_state)
        return o, final

    @staticmethod
    def backward(ctx, do: Tensor, dfinal: Tensor | None):
        q, k, v, initial_state = ctx.saved_tensors
        C = q.shape[-2]
        tril = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        starts, _ = _chunk_states(k, v, initial_state)  # recomputed instead of saved
        dscores = (do @ v.transpose(-1, -2)).masked_fill_(~tril, 0)  # (B, H, N, C, C)
        dq = dscores @ k + do @ starts.transpose(-1, -2)
        dk = dscores.transpose(-1, -2) @ q
        scores = (q @ k.transpose(-1, -2)).masked_fill_(~tril, 0)
        dv = scores.transpose(-1, -2) @ do
        # G_n: gradient w.r.t. the state after chunk n = sum of q_m^T do_m over later chunks (+ dfinal)
        qdo = q.transpose(-1, -2) @ do  # (B, H, N, K, V)
        suffix = qdo.flip(2).cumsum(2).flip(2)  # sum over m >= n
        after = torch.cat([suffix[:, :, 1:], torch.zeros_like(qdo[:, :, :1])], dim=2)
        dinitial = suffix[:, :, 0]
        if dfinal is not None:
            after = after + dfinal[:, :, None]
            dinitial = dinitial + dfinal
        dk = dk + v @ after.transpose(-1, -2)
        dv = dv + k @ after
        return dq, dk, dv, (dinitial if initial_state is not None and ctx.needs_input_grad[3] else None)


def linear_attn_chunked(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, initial_state: Tensor | None, chunk_size: int = 64
) -> tuple[Tensor, Tensor]:
    """q (B, T, H, K), k (B, S, H, K), v (B, S, H, V), initial_state (B, H, K, V) or None -> (o, final state)."""
    if not causal:
        state = torch.einsum("bshk,bshv->bhkv", k, v)  # (B, H, K, V)
        if initial_state is not None:
            state = state + initial_state
        return torch.einsum("bthk,bhkv->bthv", q, state), state
    T = q.shape[1]
    C = max(1, min(chunk_size, T))  # a chunk longer than the sequence only adds padding
    o, final = _CausalChunked.apply(_to_chunks(q, C), _to_chunks(k, C), _to_chunks(v, C), initial_state)
    return _from_chunks(o, T), final
