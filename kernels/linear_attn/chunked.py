"""Chunked linear attention in torch: the CPU path.

Causal (chunk size C, N = ceil(T / C) chunks, chunk n holds positions nC .. nC + C - 1):

    o_n = (q_n k_n^T ⊙ tril) v_n + q_n S_n,     S_n = S_0 + sum_{m<n} k_m^T v_m   (state at the start of chunk n)

All chunks are processed at once with batched matmuls (no Python loop over time or chunks) in a chunk-major
(N * B * H, C, D) layout: the per-chunk updates k_n^T v_n are (N, B * H, K, V) and their exclusive cumulative sum over
the leading axis gives every S_n. Memory per head is O(T·C + T·K·V / C),
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
    """(B, T, H, D) -> (N * B * H, C, D), chunk-major, zero-padding T up to a multiple of C."""
    B, T, H, D = x.shape
    pad = (-T) % C
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    N = x.shape[1] // C
    return x.view(B, N, C, H, D).permute(1, 0, 3, 2, 4).reshape(N * B * H, C, D)


def _from_chunks(x: Tensor, B: int, H: int, T: int) -> Tensor:
    """(N * B * H, C, D) -> (B, T, H, D)."""
    NBH, C, D = x.shape
    N = NBH // (B * H)
    return x.view(N, B, H, C, D).permute(1, 0, 3, 2, 4).reshape(B, N * C, H, D)[:, :T]


def _chunk_starts(k: Tensor, v: Tensor, initial_state: Tensor | None, BH: int) -> tuple[Tensor, Tensor]:
    """State at the start of each chunk, (N * BH, K, V), and the final state (BH, K, V)."""
    kv = torch.bmm(k.transpose(1, 2), v)  # (N * BH, K, V): each chunk's write
    NBH, K, V = kv.shape
    kv = kv.view(NBH // BH, BH, K, V)
    if initial_state is not None:
        kv[0] += initial_state  # folded into the first write: every prefix sum then includes it
    starts = torch.empty_like(kv)
    starts[0] = 0 if initial_state is None else initial_state
    torch.cumsum(kv[:-1], dim=0, out=starts[1:])  # exclusive prefix sum, chunk-major so slices are contiguous
    # starts[-1] already holds S_0 (folded into kv[0]); with a single chunk, kv[0] is the whole sum
    final = starts[-1] + kv[-1] if kv.shape[0] > 1 else kv[0]
    return starts.view(NBH, K, V), final


class _CausalChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, initial_state: Tensor | None, BH: int):  # (N * BH, C, D)
        starts, final = _chunk_starts(k, v, initial_state, BH)
        scores = torch.bmm(q, k.transpose(1, 2)).tril_()  # (N * BH, C, C)
        o = torch.bmm(q, starts).add_(torch.bmm(scores, v))  # (bmm + add_: baddbmm loops per batch on CPU)
        ctx.save_for_backward(q, k, v, initial_state)
        ctx.BH = BH
        return o, final

    @staticmethod
    def backward(ctx, do: Tensor, dfinal: Tensor | None):
        q, k, v, initial_state = ctx.saved_tensors
        BH = ctx.BH
        starts, _ = _chunk_starts(k, v, initial_state, BH)  # recomputed instead of saved: memory stays O(T d)
        dscores = torch.bmm(do, v.transpose(1, 2)).tril_()
        dq = torch.bmm(do, starts.transpose(1, 2)).add_(torch.bmm(dscores, k))
        del starts
        qdo = torch.bmm(q.transpose(1, 2), do)  # (N * BH, K, V)
        NBH, K, V = qdo.shape
        qdo = qdo.view(NBH // BH, BH, K, V)
        # G_n, the gradient reaching the state after chunk n: dfinal + sum of q_m^T do_m over later chunks m > n
        after = torch.empty_like(qdo)
        after[-1] = 0 if dfinal is None else dfinal
        rev = torch.cumsum(qdo[1:].flip(0), dim=0)
        after[:-1] = rev.flip(0)
        if dfinal is not None:
            after[:-1] += dfinal
        dinitial = after[0] + qdo[0]
        after = after.view(NBH, K, V)
        dk = torch.bmm(v, after.transpose(1, 2)).add_(torch.bmm(dscores.transpose(1, 2), q))
        del dscores
        scores = torch.bmm(q, k.transpose(1, 2)).tril_()
        dv = torch.bmm(k, after).add_(torch.bmm(scores.transpose(1, 2), do))
        return dq, dk, dv, (dinitial if initial_state is not None and ctx.needs_input_grad[3] else None), None


def linear_attn_chunked(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, initial_state: Tensor | None, chunk_size: int = 64
) -> tuple[Tensor, Tensor]:
    """q (B, T, H, K), k (B, S, H, K), v (B, S, H, V), initial_state (B, H, K, V) or None -> (o, final state)."""
    if not causal:
        state = torch.einsum("bshk,bshv->bhkv", k, v)
        if initial_state is not None:
            state = state + initial_state
        return torch.einsum("bthk,bhkv->bthv", q, state), state
    B, T, H, _ = q.shape
    C = max(1, min(chunk_size, T))  # a chunk longer than the sequence only adds padding
    h0 = None if initial_state is None else initial_state.reshape(B * H, *initial_state.shape[2:])
    o, final = _CausalChunked.apply(_to_chunks(q, C), _to_chunks(k, C), _to_chunks(v, C), h0, B * H)
    return _from_chunks(o, B, H, T), final.view(B, H, *final.shape[1:])
