"""Chunked GLA in torch: the CPU path (FLA's ``chunk_gla`` algorithm, written with batched matmuls).

Per batch and head, chunk n of length C holds positions nC .. nC + C - 1; b = cumsum of g restarted in every chunk,
S_n = state at the chunk start, q already scaled. All exponents below are <= 0 because g <= 0:

    intra:  A_ij = sum_c q_ic k_jc exp(b_ic - b_jc)  for j <= i (else 0)
    output: o = A v + (q ⊙ exp(b)) S_n
    state:  S_{n+1} = diag(exp(b_last)) S_n + (k ⊙ exp(b_last - b))^T v

Intra-chunk decays without overflow (specs/attention.md §3 "Numerical stability"): exp(b_i) exp(-b_j) is never
formed over a span. Vector gates use a binary hierarchy of sub-chunks: in a block of 2s rows, the lower-left s x s
block (query rows i in the lower half, key rows j in the upper half) is factored around r = the first row of the
lower half, exp(b_i - b_j) = exp(b_i - b_r) exp(b_r - b_j), where j < r <= i so BOTH factors are <= 1 for every g <= 0;
it becomes one (s, K) x (K, s) matmul. The diagonal (i = j) has decay 1. So log2(C) levels of matmuls cover the
lower triangle, with no bound on how negative g may be (-20 per step, or -inf-like gates, are fine). Scalar gates
(simple GLA) have a (C, C) decay matrix formed from pairwise differences b_i - b_j, masked with -inf before exp.

Inter-chunk: the chunk writes (k ⊙ exp(b_last - b))^T v are batched matmuls; the carry S_{n+1} = a_n S_n + U_n is one
fused multiply-add per chunk (a Python loop over chunks, never over time).

Backward (custom autograd.Function) keeps only q, k, v, g and the initial state, and recomputes A and the chunk states
(memory O(T (K + V) + T C + (T / C) K V)). With do, and dH_{n+1} = gradient reaching S_{n+1}
(reverse carry dH_n = a_n dH_{n+1} + (q ⊙ exp(b))^T do):

    dv = A^T do + (k ⊙ exp(b_last - b)) dH_{n+1}
    dq = dq_A + (do S_n^T) ⊙ exp(b),    dk = dk_A + (v dH_{n+1}^T) ⊙ exp(b_last - b),  (dq_A, dk_A from dA = do v^T)
    db = q ⊙ dq - k ⊙ dk,   db_last += rowsum(S_{n+1} ⊙ dH_{n+1}),   dg = reverse cumsum of db within the chunk,
    d initial_state = dH_0.

(db: every exp(b_i - b_j) contributes +q dq through b_i and -k dk through b_j; the last row also scales the carried
state. Terms with no decay, A's diagonal and the last row's own write, cancel exactly and are left out of db.) For
scalar gates db is summed over K.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _to_chunks(x: Tensor, C: int) -> Tensor:
    """(B, T, H, D) -> (B, H, N, C, D), zero-padding T to a multiple of C at the FRONT.

    Zero q, k, v and g = 0 before position 0 change nothing (the initial state passes through undecayed), and padding
    at the front keeps every chunk's last row a real position, which the exact-cancellation rule of dg relies on.
    """
    B, T, H, D = x.shape
    pad = (-T) % C
    if pad:
        x = F.pad(x, (0, 0, 0, 0, pad, 0))
    return x.transpose(1, 2).reshape(B, H, -1, C, D)


def _from_chunks(x: Tensor, T: int) -> Tensor:
    """(B, H, N, C, D) -> (B, T, H, D), dropping the padded front."""
    B, H, N, C, D = x.shape
    return x.reshape(B, H, N * C, D)[:, :, N * C - T :].transpose(1, 2)


def _level_views(x: Tensor, s: int) -> tuple[Tensor, Tensor]:
    """Split rows (..., C, D) into blocks of 2s rows: (upper halves, lower halves), each (..., C / 2s, s, D)."""
    *lead, C, D = x.shape
    blocks = x.view(*lead, C // (2 * s), 2, s, D)
    return blocks[..., 0, :, :], blocks[..., 1, :, :]


def _offdiag_blocks(A: Tensor, s: int) -> Tensor:
    """View of the lower-left s x s block of every 2s x 2s diagonal block of A (..., C, C): (..., C / 2s, s, s)."""
    *lead, C, _ = A.shape
    nb = C // (2 * s)
    blocks = A.view(*lead, nb, 2, s, nb, 2, s)
    diag = torch.diagonal(blocks, dim1=len(lead), dim2=len(lead) + 3)  # (..., 2, s, 2, s, nb)
    return diag[..., 1, :, 0, :, :].movedim(-1, -3)


def _level_factors(b: Tensor, s: int) -> tuple[Tensor, Tensor]:
    """exp(b_i - b_r) for lower-half rows and exp(b_r - b_j) for upper-half rows, r = first lower row; both <= 1."""
    upper, lower = _level_views(b, s)
    ref = lower[..., :1, :]  # (..., nb, 1, K)
    return (lower - ref).exp(), (ref - upper).exp()


def _intra_scores(q: Tensor, k: Tensor, b: Tensor) -> Tensor:
    """A (..., C, C) lower triangle (with diagonal) of sum_c q_ic k_jc exp(b_ic - b_jc); q, k (..., C, K)."""
    C = q.shape[-2]
    if b.shape[-1] == 1:  # scalar gate: one (C, C) decay matrix, masked before exp
        return (q @ k.transpose(-1, -2)) * _decay_matrix(b)
    A = q.new_zeros(*q.shape[:-1], C)
    A.diagonal(dim1=-2, dim2=-1).copy_((q * k).sum(-1))
    s = 1
    while s < C:
        q_exp, k_exp = _level_factors(b, s)
        q_low = _level_views(q, s)[1] * q_exp  # (..., nb, s, K)
        k_up = _level_views(k, s)[0] * k_exp
        _offdiag_blocks(A, s).copy_(q_low @ k_up.transpose(-1, -2))
        s *= 2
    return A


def _intra_grads(dA: Tensor, q: Tensor, k: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of the strictly lower part of _intra_scores for a strictly lower dA (..., C, C): (dq, dk).

    The diagonal (decay 1) is left to the caller: it does not depend on b, and keeping it out of q dq - k dk avoids
    a cancellation that would swamp dg when the gates are very negative (true dg ~ exp(g) there).
    """
    C = q.shape[-2]
    if b.shape[-1] == 1:
        dscores = dA * _decay_matrix(b)
        return dscores @ k, dscores.transpose(-1, -2) @ q
    dq, dk = torch.zeros_like(q), torch.zeros_like(k)
    s = 1
    while s < C:
        q_exp, k_exp = _level_factors(b, s)
        q_low = _level_views(q, s)[1]
        k_up = _level_views(k, s)[0]
        dblock = _offdiag_blocks(dA, s)  # (..., nb, s, s)
        _level_views(dq, s)[1].addcmul_(dblock @ (k_up * k_exp), q_exp)
        _level_views(dk, s)[0].addcmul_(dblock.transpose(-1, -2) @ (q_low * q_exp), k_exp)
        s *= 2
    return dq, dk


def _decay_matrix(b: Tensor) -> Tensor:
    """exp(b_i - b_j) for j <= i, else 0, from b (..., C, 1); masked with -inf BEFORE exp (no inf * 0 = NaN)."""
    C = b.shape[-2]
    causal = torch.ones(C, C, dtype=torch.bool, device=b.device).tril()
    return (b - b.transpose(-1, -2)).masked_fill_(~causal, float("-inf")).exp_()


def _forward_parts(q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Tensor | None):
    """Everything forward and backward share, recomputed in backward rather than saved."""
    b = g.cumsum(-2)  # (B, H, N, C, K or 1) log decay since the chunk start
    b_last = b[..., -1:, :]  # (B, H, N, 1, K or 1)
    A = _intra_scores(q, k, b)  # (B, H, N, C, C)
    q_decay = b.exp()  # decay from the chunk start to row i
    k_decay = (b_last - b).exp()  # decay from row j to the chunk end
    writes = (k * k_decay).transpose(-1, -2) @ v  # (B, H, N, K, V)
    carry = b_last.transpose(-1, -2).exp()  # (B, H, N, K or 1, 1)
    B, H, N, _, K = q.shape
    state = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state
    starts = torch.empty_like(writes)  # (B, H, N, K, V) state at every chunk start
    for n in range(N):  # the only sequential part: one multiply-add per chunk
        starts[:, :, n] = state
        state = torch.addcmul(writes[:, :, n], carry[:, :, n], state)
    return b, A, q_decay, k_decay, carry, starts, state


class _ChunkedGLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Tensor | None):  # chunked
        _, A, q_decay, _, _, starts, final = _forward_parts(q, k, v, g, initial_state)
        o = (A @ v).add_((q * q_decay) @ starts)  # (B, H, N, C, V)
        ctx.save_for_backward(q, k, v, g, initial_state)
        return o, final

    @staticmethod
    def backward(ctx, do: Tensor, dfinal: Tensor | None):
        q, k, v, g, initial_state = ctx.saved_tensors
        b, A, q_decay, k_decay, carry, starts, final = _forward_parts(q, k, v, g, initial_state)
        N = q.shape[2]
        # reverse carry: dH after chunk n, for every n
        from_outputs = (q * q_decay).transpose(-1, -2) @ do  # (B, H, N, K, V)
        grad = torch.zeros_like(final) if dfinal is None else dfinal
        after = torch.empty_like(from_outputs)
        for n in reversed(range(N)):
            after[:, :, n] = grad
            grad = torch.addcmul(from_outputs[:, :, n], carry[:, :, n], grad)
        dinitial = grad

        dv = A.transpose(-1, -2) @ do + (k * k_decay) @ after
        C = q.shape[-2]
        strictly_lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
        dA = (do @ v.transpose(-1, -2)).masked_fill_(~strictly_lower, 0)  # (B, H, N, C, C)
        dA_diag = (do * v).sum(-1, keepdim=True)  # (B, H, N, C, 1): the diagonal of do v^T
        dq, dk = _intra_grads(dA, q, k, b)
        dq_state = (do @ starts.transpose(-1, -2)) * q_decay
        dk_state = (v @ after.transpose(-1, -2)) * k_decay

        dg = None
        if ctx.needs_input_grad[3]:
            # db from the b-dependent terms only (see module docstring); the terms that cancel exactly (diagonal of
            # A, the last row's own undecayed write) are left out rather than subtracted, to keep dg accurate
            # when exp(g) is tiny
            db = q * (dq + dq_state) - k * dk
            db[..., :-1, :] -= (k * dk_state)[..., :-1, :]
            carried = (starts * after).sum(-1) * carry[..., 0]  # (B, H, N, K): exp(b_last) rowsum(S_n ⊙ dH_{n+1})
            db[..., -1, :] += (k * dk_state)[..., :-1, :].sum(-2) + carried
            if g.shape[-1] == 1:
                db = db.sum(-1, keepdim=True)
            dg = db.flip(-2).cumsum(-2).flip(-2)  # b_i = sum_{r <= i} g_r
        dq = dq.add_(dq_state).addcmul_(dA_diag, k)
        dk = dk.add_(dk_state).addcmul_(dA_diag, q)
        needs_dinitial = initial_state is not None and ctx.needs_input_grad[4]
        return dq, dk, dv, dg, (dinitial if needs_dinitial else None)


def gla_chunked(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float, initial_state: Tensor | None, chunk_size: int = 64
) -> tuple[Tensor, Tensor]:
    """q, k (B, T, H, K), g (B, T, H, K or 1), v (B, T, H, V), initial_state (B, H, K, V) or None -> (o, final state).

    Inputs are already in the accumulation dtype; ``chunk_size`` is a power of two (shrunk to the next power of two
    >= T for short inputs; the result does not depend on it beyond rounding).
    """
    T = q.shape[1]
    C = min(chunk_size, 1 << max(T - 1, 0).bit_length())
    o, final = _ChunkedGLA.apply(
        _to_chunks(q * scale, C), _to_chunks(k, C), _to_chunks(v, C), _to_chunks(g, C), initial_state
    )
    return _from_chunks(o, T), final
