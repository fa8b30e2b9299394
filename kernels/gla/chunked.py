"""Chunked GLA in torch: the CPU path (FLA's ``chunk_gla`` algorithm, written with batched matmuls).

Per batch and head, chunk n of length C holds positions nC .. nC + C - 1; b = cumsum of g restarted in every chunk,
S_n = state at the chunk start, q already scaled. With g <= 0 every exponent below is <= 0:

    intra:  A_ij = sum_c q_ic k_jc exp(b_ic - b_jc)  for j <= i (else 0)
    output: o = A v + (q ⊙ exp(b)) S_n
    state:  S_{n+1} = diag(exp(b_last)) S_n + (k ⊙ exp(b_last - b))^T v

Intra-chunk decays without overflow (specs/attention.md §3 "Numerical stability"). exp(b_i) exp(-b_j) is only formed
inside a block whose decay span is bounded: aligned c-row blocks whose sum of |g| is at most FACTOR_BOUND = 40 are
factored around the row before the block, exp(b_i - b_f) exp(b_f - b_j), each factor in [e^-40, e^40] (a plain
matmul). c is the largest power of two for which this holds in every block (checked per call): c = C for FLA-style
gates (logsigmoid / 16), smaller for very negative gates. Blocks below the diagonal c x c blocks use an exact binary
hierarchy: in a block of 2s rows, the lower-left s x s block (query rows i in the lower half, key rows j in the upper
half) is factored around r = the first row of the lower half, exp(b_i - b_r) exp(b_r - b_j) with j < r <= i, so
BOTH factors are <= 1 for any g <= 0 (-20 per step, or -1e4, is fine); one (s, K) x (K, s) matmul per level. Scalar
gates (simple GLA) take the same path with g broadcast over K (b is (..., C, 1), so the factors cost nothing).

Inter-chunk: the chunk writes U_n = (k ⊙ exp(b_last - b))^T v are batched matmuls; the carry S_{n+1} = a_n S_n + U_n
is solved in closed form by one matmul with a masked pairwise decay matrix over chunks (_chunk_transfer) when there
are at most 2C chunks (its memory is then at most twice q's), otherwise by one fused multiply-add per chunk (a Python
loop over chunks, never over time).

Backward (custom autograd.Function) keeps only q, k, v, g and the initial state, and recomputes A and the chunk states
(memory O(T (K + V + C) + (T / C) K V)). With do, and dH_{n+1} = gradient reaching S_{n+1}
(reverse carry dH_n = a_n dH_{n+1} + (q ⊙ exp(b))^T do):

    dv = A^T do + (k ⊙ exp(b_last - b)) dH_{n+1}
    dq = dq_A + (do S_n^T) ⊙ exp(b),    dk = dk_A + (v dH_{n+1}^T) ⊙ exp(b_last - b),  (dq_A, dk_A from dA = do v^T)
    db = q ⊙ dq - k ⊙ dk,   db_last += rowsum(S_{n+1} ⊙ dH_{n+1}),   dg = reverse cumsum of db within the chunk,
    d initial_state = dH_0.

(db: every exp(b_i - b_j) contributes +q dq through b_i and -k dk through b_j; the last row also scales the carried
state. Terms with no decay, A's diagonal and the last row's own write, cancel exactly and are left out of db, which
keeps dg accurate when exp(g) is tiny.) For scalar gates db is summed over K.
"""

from __future__ import annotations

from typing import NamedTuple

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


def _exp(x: Tensor) -> Tensor:
    """exp(x) in place, with exponents below the dtype's floor (masked -inf entries included) mapped to exactly 0.

    exp(-80) = 2e-35 in float32 (exp(-700) = 1e-304 in float64) is ~28 orders of magnitude below the precision of any
    sum it enters, but smaller values would be denormals, which make exp and matmul ~100x slower on x86 CPUs; exp of
    -inf or of very negative arguments is itself 5-20x slower than the normal range, so those are clamped, then zeroed.
    """
    floor = -700.0 if x.dtype == torch.float64 else -80.0
    dead = x < floor
    return x.clamp_min_(floor).exp_().masked_fill_(dead, 0)


def _level_factors(b: Tensor, s: int) -> tuple[Tensor, Tensor]:
    """exp(b_i - b_r) for lower-half rows and exp(b_r - b_j) for upper-half rows, r = first lower row; both <= 1."""
    upper, lower = _level_views(b, s)
    ref = lower[..., :1, :]  # (..., nb, 1, K)
    return _exp(lower - ref), _exp(ref - upper)


# Largest sum of |g| over a block that is factored directly: exp(b_i - b_f) and exp(b_f - b_j) then lie in
# [e^-40, e^40] = [4e-18, 2e17], far inside float32's normal range (1e-38 .. 3e38), so neither factor overflows or
# underflows and each product q_i k_j exp(b_i - b_j) keeps float32's relative precision.
FACTOR_BOUND = 40.0


def _direct_block_size(g: Tensor, b: Tensor) -> int:
    """Largest power-of-two c <= C such that every aligned c-row block of every chunk has sum |g| <= FACTOR_BOUND.

    FLA's gates (logsigmoid / 16, about -0.05 per step) give c = C: the whole intra-chunk matrix is one matmul, which
    is checked first in one pass over b (|b_i| <= bound for all i is exactly the c = C condition). Very negative gates
    shrink c, down to 1 where only the exact hierarchy is used. One host sync per call.
    """
    C = g.shape[-2]
    lo, hi = torch.aminmax(b)
    if max(-lo.item(), hi.item()) <= FACTOR_BOUND:
        return C
    sums, maxima = g.abs(), []
    while sums.shape[-2] > 1:
        sums = sums.unflatten(-2, (-1, 2)).sum(-2)  # sums over aligned blocks of twice the size
        maxima.append(sums.amax())
    c = 1
    for m in torch.stack(maxima).tolist() if maxima else []:
        if not m <= FACTOR_BOUND:  # also stops at NaN
            break
        c *= 2
    return min(c, C)


def _direct_factors(b: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """exp(b_i - b_f), exp(b_f - b_i) with f = the row before i's aligned c-row block (b_f = 0 for the first block)."""
    *lead, C, K = b.shape
    blocks = b.view(*lead, C // c, c, K)
    before = F.pad(blocks[..., :-1, -1:, :], (0, 0, 0, 0, 1, 0))  # (..., C / c, 1, K)
    return _exp(blocks - before).view_as(b), _exp(before - blocks).view_as(b)


def _diag_blocks(A: Tensor, c: int) -> Tensor:
    """View of the c x c diagonal blocks of A (..., C, C): (..., C / c, c, c)."""
    *lead, C, _ = A.shape
    blocks = A.view(*lead, C // c, c, C // c, c)
    return torch.diagonal(blocks, dim1=len(lead), dim2=len(lead) + 2).movedim(-1, -3)


def _chunk_transfer(carry_log: Tensor) -> tuple[Tensor, Tensor]:
    """Closed form of the chunk carry S_{n+1} = exp(a_n) S_n + U_n, from carry_log a (B, H, N, K or 1).

    Returns W (B, H, K or 1, N + 1, N) with W[n, m] = exp(sum_{m < l < n} a_l) for m < n, else 0 (pairwise
    differences of cumulative sums, masked with -inf before exp, so every exponent is <= 0), and decay0
    (B, H, N + 1, K or 1) = exp(sum_{l < n} a_l). Then S_n = sum_m W[n, m] U_m + decay0[n] S_0 for n = 0..N (row N is
    the final state), and the reverse carry is the transpose. Replaces N sequential small ops by one batched matmul.
    """
    a = carry_log.transpose(-1, -2)  # (B, H, K or 1, N)
    before = F.pad(a.cumsum(-1), (1, 0))  # (..., N + 1): sum_{l < n} a_l
    N = a.shape[-1]
    upto = before[..., 1:]  # (..., N): sum_{l <= m} a_l
    lower = torch.ones(N + 1, N, dtype=torch.bool, device=a.device).tril(-1)  # m < n
    W = _exp((before[..., :, None] - upto[..., None, :]).masked_fill_(~lower, float("-inf")))
    return W, _exp(before.clone()).transpose(-1, -2)


def _carry_apply(W: Tensor, x: Tensor) -> Tensor:
    """sum_m W[r, m] x_m per key channel: W (B, H, K or 1, R, M), x (B, H, M, K, V) -> (B, H, R, K, V)."""
    B, H, M, K, V = x.shape
    if W.shape[2] == 1:  # scalar gate: one decay for all of K x V
        return (W[:, :, 0] @ x.reshape(B, H, M, K * V)).view(B, H, -1, K, V)
    return (W @ x.transpose(2, 3)).transpose(2, 3)


class _Parts(NamedTuple):
    """What forward and backward share, recomputed in backward rather than saved (chunked shapes (B, H, N, ...))."""

    b: Tensor  # (C, K or 1) log decay since the chunk start
    c: int  # directly factored block size
    q_exp: Tensor  # (C, K or 1) exp(b_i - b_f), f = row before i's c-block (= exp(b) when c = C)
    q_in: Tensor  # (C, K) q ⊙ q_exp
    k_exp: Tensor  # (C, K or 1) exp(b_f - b_j)
    k_in: Tensor  # (C, K) k ⊙ k_exp
    A: Tensor  # (C, C) intra-chunk scores
    q_decay: Tensor  # (C, K or 1) exp(b)
    k_decay: Tensor  # (C, K or 1) exp(b_last - b)
    k_out: Tensor  # (C, K) k ⊙ k_decay: each key's write as seen at the chunk end
    carry: Tensor  # (K or 1, 1) exp(b_last)
    starts: Tensor  # (K, V) state at every chunk start
    final: Tensor | None  # (B, H, K, V) state after the last chunk (None when starts were given)


def _forward_parts(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Tensor | None, starts: Tensor | None = None
) -> _Parts:
    """All shared quantities; given the saved chunk-start states (backward), the state scan is skipped."""
    C = q.shape[-2]
    b = g.cumsum(-2)
    c = _direct_block_size(g, b)
    q_decay = _exp(b.clone())
    if c == 1:  # 1 x 1 diagonal blocks have decay exactly 1; factoring exp(g_i) exp(-g_i) would overflow for g < -88
        q_exp = k_exp = torch.ones_like(b)
    elif c == C:
        q_exp, k_exp = q_decay, _exp(b.neg())
    else:
        q_exp, k_exp = _direct_factors(b, c)
    q_in, k_in = q * q_exp, k * k_exp
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    diag = (q_in.unflatten(-2, (-1, c)) @ k_in.unflatten(-2, (-1, c)).transpose(-1, -2)).masked_fill_(~causal, 0)
    if c == C:
        A = diag.squeeze(-3)  # (B, H, N, C, C)
    else:
        A = q.new_zeros(*q.shape[:-1], C)
        _diag_blocks(A, c).copy_(diag)
        s = c
        while s < C:
            lower_exp, upper_exp = _level_factors(b, s)
            q_low = _level_views(q, s)[1] * lower_exp  # (..., nb, s, K)
            k_up = _level_views(k, s)[0] * upper_exp
            _offdiag_blocks(A, s).copy_(q_low @ k_up.transpose(-1, -2))
            s *= 2
    b_last = b[..., -1:, :]  # (B, H, N, 1, K or 1)
    k_decay = _exp(b_last - b)
    k_out = k * k_decay
    carry = b_last.transpose(-1, -2).exp()  # (B, H, N, K or 1, 1)
    state = None
    if starts is None:
        writes = k_out.transpose(-1, -2) @ v  # (B, H, N, K, V)
        B, H, N, _, K = q.shape
        state = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state
        if N <= 2 * C:  # closed form; its (N + 1) x N decay matrix costs at most twice q's memory
            W, decay0 = _chunk_transfer(b_last[..., 0, :])
            states = _carry_apply(W, writes)  # (B, H, N + 1, K, V)
            if initial_state is not None:
                states = states.addcmul_(decay0[..., None], initial_state[:, :, None])
            starts, state = states[:, :, :N], states[:, :, N]
        else:  # one multiply-add per chunk
            starts = torch.empty_like(writes)
            for n in range(N):
                starts[:, :, n] = state
                state = torch.addcmul(writes[:, :, n], carry[:, :, n], state)
    return _Parts(b, c, q_exp, q_in, k_exp, k_in, A, q_decay, k_decay, k_out, carry, starts, state)


def _intra_grads(dA: Tensor, q: Tensor, k: Tensor, p: _Parts) -> tuple[Tensor, Tensor]:
    """Gradients of the strictly lower part of A for a strictly lower dA (..., C, C): (dq, dk), each (..., C, K).

    The diagonal (decay 1) is left to the caller: it does not depend on b, and keeping it out of q dq - k dk avoids
    a cancellation that would swamp dg when the gates are very negative (true dg ~ exp(g) there).
    """
    C, c = q.shape[-2], p.c
    dblocks = dA.unsqueeze(-3) if c == C else _diag_blocks(dA, c)  # (..., C / c, c, c)
    dq = (dblocks @ p.k_in.unflatten(-2, (-1, c))).flatten(-3, -2).mul_(p.q_exp)
    dk = (dblocks.transpose(-1, -2) @ p.q_in.unflatten(-2, (-1, c))).flatten(-3, -2).mul_(p.k_exp)
    s = c
    while s < C:
        lower_exp, upper_exp = _level_factors(p.b, s)
        q_low = _level_views(q, s)[1]
        k_up = _level_views(k, s)[0]
        dblock = _offdiag_blocks(dA, s)  # (..., nb, s, s)
        _level_views(dq, s)[1].addcmul_(dblock @ (k_up * upper_exp), lower_exp)
        _level_views(dk, s)[0].addcmul_(dblock.transpose(-1, -2) @ (q_low * lower_exp), upper_exp)
        s *= 2
    return dq, dk


class _ChunkedGLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Tensor | None):  # chunked
        p = _forward_parts(q, k, v, g, initial_state)
        q_start = p.q_in if p.q_exp is p.q_decay else q * p.q_decay  # q ⊙ exp(b)
        o = (p.A @ v).add_(q_start @ p.starts)  # (B, H, N, C, V)
        # the chunk-start states are the O((T / C) K V) part of the memory bound; A and the decays are recomputed
        ctx.save_for_backward(q, k, v, g, p.starts)
        ctx.has_initial_state = initial_state is not None
        return o, p.final

    @staticmethod
    def backward(ctx, do: Tensor, dfinal: Tensor | None):
        q, k, v, g, starts = ctx.saved_tensors
        p = _forward_parts(q, k, v, g, None, starts)
        C, N = q.shape[-2], q.shape[2]
        q_start = p.q_in if p.q_exp is p.q_decay else q * p.q_decay
        # reverse carry: dH after chunk n, for every n
        from_outputs = q_start.transpose(-1, -2) @ do  # (B, H, N, K, V)
        if N <= 2 * C:  # closed form, as in the forward: the reverse carry is the transposed transfer
            W, decay0 = _chunk_transfer(p.b[..., -1, :])
            if dfinal is not None:  # the final state's gradient enters as row N
                from_outputs = torch.cat([from_outputs, dfinal[:, :, None]], dim=2)
                W = W.transpose(-1, -2)
            else:
                W = W[..., :N, :].transpose(-1, -2)
                decay0 = decay0[:, :, :N]
            after = _carry_apply(W, from_outputs)  # (B, H, N, K, V)
            dinitial = (from_outputs * decay0[..., None]).sum(2)
        else:
            grad = torch.zeros_like(starts[:, :, 0]) if dfinal is None else dfinal
            after = torch.empty_like(from_outputs)
            for n in reversed(range(N)):
                after[:, :, n] = grad
                grad = torch.addcmul(from_outputs[:, :, n], p.carry[:, :, n], grad)
            dinitial = grad

        dv = (p.A.transpose(-1, -2) @ do).add_(p.k_out @ after)
        strictly_lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
        dA = (do @ v.transpose(-1, -2)).masked_fill_(~strictly_lower, 0)  # (B, H, N, C, C)
        dA_diag = (do * v).sum(-1, keepdim=True)  # (B, H, N, C, 1): the diagonal of do v^T
        dq, dk = _intra_grads(dA, q, k, p)
        dq.addcmul_(do @ p.starts.transpose(-1, -2), p.q_decay)  # now dq without the diagonal term
        dk_out = v @ after.transpose(-1, -2)  # (B, H, N, C, K) gradient of k_out

        dg = None
        if ctx.needs_input_grad[3]:
            # b-dependent terms only (module docstring): A's diagonal and the last row's own write are left out
            db = (q * dq).sub_(k * dk)
            through_end = p.k_out * dk_out  # k ⊙ dk through exp(b_last - b): -db_j, and +db_last summed over j
            db[..., :-1, :] -= through_end[..., :-1, :]
            carried = (p.starts * after).sum(-1) * p.carry[..., 0]  # (B, H, N, K): exp(b_last) rowsum(S_n ⊙ dH)
            db[..., -1, :] += through_end[..., :-1, :].sum(-2) + carried
            if g.shape[-1] == 1:
                db = db.sum(-1, keepdim=True)
            # b_i = sum_{r <= i} g_r, so dg_r = sum_{i >= r} db_i: a reverse cumsum, as a matmul with triu ones
            dg = torch.ones(C, C, dtype=db.dtype, device=db.device).triu() @ db
        dq = dq.addcmul_(dA_diag, k)
        dk = dk.addcmul_(dk_out, p.k_decay).addcmul_(dA_diag, q)
        needs_dinitial = ctx.has_initial_state and ctx.needs_input_grad[4]
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
