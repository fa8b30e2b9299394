"""Chunked GLA in torch: the CPU path (FLA's ``chunk_gla`` algorithm, written with batched matmuls).

Per batch and head, chunk n of length C holds positions nC .. nC + C - 1; b = cumsum of g restarted in every chunk,
S_n = state at the chunk start, q already scaled. With g <= 0 every exponent below is <= 0:

    intra:  A_ij = sum_c q_ic k_jc exp(b_ic - b_jc)  for j <= i (else 0)
    output: o = A v + (q ⊙ exp(b)) S_n
    state:  S_{n+1} = diag(exp(b_last)) S_n + (k ⊙ exp(b_last - b))^T v

Intra-chunk decays without overflow. exp(b_i) exp(-b_j) is only formed
inside a block whose decay span is bounded: aligned c-row blocks whose sum of |g| is at most FACTOR_BOUND = 40 are
factored around the row before the block, exp(b_i - b_f) exp(b_f - b_j), each factor in [e^-40, e^40] (a plain
matmul). c is the largest power of two for which this holds in every block (checked per call): c = C for FLA-style
gates (logsigmoid / 16), smaller for very negative gates. Blocks below the diagonal c x c blocks use an exact binary
hierarchy: in a block of 2s rows, the lower-left s x s block (query rows i in the lower half, key rows j in the upper
half) is factored around r = the first row of the lower half, exp(b_i - b_r) exp(b_r - b_j) with j < r <= i, so
BOTH factors are <= 1 for any g <= 0 (-20 per step, or -1e4, is fine); one (s, K) x (K, s) matmul per level. Scalar
gates (simple GLA) take the same path with g broadcast over K (b is (..., C, 1), so the factors cost nothing).

Inter-chunk: the chunk writes U_n = (k ⊙ exp(b_last - b))^T v are batched matmuls; the carry S_{n+1} = a_n S_n + U_n
is one fused multiply-add per chunk, written in place (a Python loop over chunks, never over time). A closed form by
one matmul with a pairwise decay matrix over chunks was measured slower at every size (it costs N^2 K V and three
transposing copies, against N small ops).

Backward (custom autograd.Function) keeps q, k, v, b, A and the chunk-start states, and recomputes the elementwise
decays (memory O(T (K + V + C) + (T / C) K V)). With do, and dH_{n+1} = gradient reaching S_{n+1}
(reverse carry dH_n = a_n dH_{n+1} + (q ⊙ exp(b))^T do):

    dv = A^T do + (k ⊙ exp(b_last - b)) dH_{n+1}
    dq = dq_A + (do S_n^T) ⊙ exp(b),    dk = dk_A + (v dH_{n+1}^T) ⊙ exp(b_last - b),  (dq_A, dk_A from dA = do v^T)
    db = q ⊙ dq - k ⊙ dk,   db_last += exp(b_last) rowsum(S_n ⊙ dH_{n+1}),   dg = reverse cumsum of db in the chunk,
    d initial_state = dH_0.

(db: every exp(b_i - b_j) contributes +q dq through b_i and -k dk through b_j; the last row also scales the carried
state. Terms with no decay, A's diagonal and the last row's own write, cancel exactly and are left out of db, which
keeps dg accurate when exp(g) is tiny.) For scalar gates db is summed over K. When c = C (the common case) all of this
runs in the frames q_in = q ⊙ exp(b), k_in = k ⊙ exp(-b), which the forward saves in place of q and k (and exp(b)
in place of b; _bounded_grads): no exp in the backward, and products take exp(b_last) on their small side.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from attnzoo.kernels.numerics import exp_, into


def _to_chunks(x: Tensor, C: int, scale: float = 1.0) -> Tensor:
    """scale * x, (B, T, H, D) -> contiguous (B, H, N, C, D), zero-padding T to a multiple of C at the FRONT.

    Zero q, k, v and g = 0 before position 0 change nothing (the initial state passes through undecayed), and padding
    at the front keeps every chunk's last row a real position, which the exact-cancellation rule of dg relies on.
    Contiguous, because every later elementwise op is several times slower on the strided (B, H, T, D) view.
    """
    B, T, H, D = x.shape
    N = -(-T // C)
    out = x.new_empty(B, H, N * C, D)
    out[:, :, : N * C - T].zero_()
    real = out[:, :, N * C - T :]
    if scale == 1.0:
        real.copy_(x.transpose(1, 2))
    else:
        into(real, torch.mul, x.transpose(1, 2), scale)
    return out.view(B, H, N, C, D)


def _from_chunks(x: Tensor, T: int, scale: float = 1.0) -> Tensor:
    """scale * x, (B, H, N, C, D) -> contiguous (B, T, H, D), dropping the padded front."""
    B, H, N, C, D = x.shape
    out = x.new_empty(B, T, H, D)
    real = x.view(B, H, N * C, D)[:, :, N * C - T :]
    if scale == 1.0:
        out.transpose(1, 2).copy_(real)
    else:
        into(out.transpose(1, 2), torch.mul, real, scale)
    return out


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
    return exp_(lower - ref), exp_(ref - upper)


# Largest sum of |g| over a block that is factored directly: exp(b_i - b_f) and exp(b_f - b_j) then lie in
# [e^-40, e^40] = [4e-18, 2e17], far inside float32's normal range (1e-38 .. 3e38), so neither factor overflows or
# underflows and each product q_i k_j exp(b_i - b_j) keeps float32's relative precision.
FACTOR_BOUND = 40.0


def _direct_block_size(g: Tensor, b: Tensor) -> int:
    """Largest power-of-two c <= C such that every aligned c-row block of every chunk has sum |g| <= FACTOR_BOUND.

    FLA's gates (logsigmoid / 16, about -0.05 per step) give c = C: the whole intra-chunk matrix is one matmul, which
    is checked first in one pass over b (|b_i| <= bound for all i is exactly the c = C condition). Very negative gates
    shrink c, down to 1 where only the exact hierarchy is used. One host sync per call.

    Under ``torch.compile`` c is 1: a block size read from the data would be a data-dependent shape, and the exact
    hierarchy alone is correct for every g <= 0 (log2 C small matmuls per chunk instead of one).
    """
    C = g.shape[-2]
    if torch.compiler.is_compiling():
        return 1
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
    return exp_(blocks - before).view_as(b), exp_(before - blocks).view_as(b)


def _diag_blocks(A: Tensor, c: int) -> Tensor:
    """View of the c x c diagonal blocks of A (..., C, C): (..., C / c, c, c)."""
    *lead, C, _ = A.shape
    blocks = A.view(*lead, C // c, c, C // c, c)
    return torch.diagonal(blocks, dim1=len(lead), dim2=len(lead) + 2).movedim(-1, -3)


class _Saved(NamedTuple):
    """What the general path's backward gets besides q, k, v: O(T (K + C) + (T / C) K V) memory."""

    b: Tensor  # (B, H, N, C, K or 1) log decay since the chunk start
    c: int  # directly factored block size
    A: Tensor  # (B, H, N, C, C) intra-chunk scores
    starts: Tensor  # (B, H, N, K, V) state at every chunk start


class _Parts(NamedTuple):
    """What forward and backward share; the backward recomputes the elementwise decays from the saved b."""

    b: Tensor | None  # (C, K or 1) log decay since the chunk start (None in the c = C backward, which needs exp(b))
    c: int  # directly factored block size
    q_exp: Tensor  # (C, K or 1) exp(b_i - b_f), f = row before i's c-block (= exp(b) when c = C)
    q_in: Tensor  # (C, K) q ⊙ q_exp
    k_exp: Tensor  # (C, K or 1) exp(b_f - b_j)
    k_in: Tensor  # (C, K) k ⊙ k_exp
    A: Tensor  # (C, C) intra-chunk scores
    q_decay: Tensor  # (C, K or 1) exp(b)
    k_decay: Tensor | None  # (C, K or 1) exp(b_last - b); None when c = C (see _bounded_grads)
    k_out: Tensor | None  # (C, K) k ⊙ k_decay: each key's write as seen at the chunk end; None when c = C
    carry: Tensor  # (K or 1, 1) exp(b_last)
    starts: Tensor  # (K, V) state at every chunk start
    final: Tensor | None  # (B, H, K, V) state after the last chunk (None when starts were given)


def _forward_parts(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    initial_state: Tensor | None,
    saved: _Saved | None = None,
    need_final: bool = True,
) -> _Parts:
    """All shared quantities; given what the forward saved (backward), b, c, A and the state scan are reused.

    Without ``need_final`` the last chunk's write is not formed (nothing reads it) and ``final`` is None."""
    C = q.shape[-2]
    if saved is None:
        b = g.cumsum(-2)
        c, A, starts = _direct_block_size(g, b), None, None
    else:
        b, c, A, starts = saved
    b_last = b[..., -1:, :]  # (B, H, N, 1, K or 1)
    if c == C > 1:
        # every |b| <= FACTOR_BOUND: one exp (the dearest elementwise op, 7x a multiply) gives all three decays, each
        # within 2 ulp of its own exp and far from the denormal range; A is one matmul
        q_decay = q_exp = b.exp()
        k_exp = q_decay.reciprocal()
        k_decay = k_out = None  # k_out = k_in ⊙ exp(b_last): every product with it takes exp(b_last) on the small side
        q_in, k_in = q * q_exp, k * k_exp
        if A is None:
            A = (q_in @ k_in.transpose(-1, -2)).tril_()  # (B, H, N, C, C)
    else:
        q_decay = exp_(b.clone())
        k_decay = exp_(b_last - b)
        if c == 1:  # 1 x 1 diagonal blocks have decay exactly 1; factoring exp(g_i) exp(-g_i) overflows for g < -88
            q_exp = k_exp = torch.ones_like(b)
        else:
            q_exp, k_exp = _direct_factors(b, c)
        q_in, k_in = q * q_exp, k * k_exp
    if A is None and not c == C > 1:
        causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        diag = q_in.unflatten(-2, (-1, c)) @ k_in.unflatten(-2, (-1, c)).transpose(-1, -2)
        A = q.new_zeros(*q.shape[:-1], C)
        _diag_blocks(A, c).copy_(diag.masked_fill_(~causal, 0))
        s = c
        while s < C:
            lower_exp, upper_exp = _level_factors(b, s)
            q_low = _level_views(q, s)[1] * lower_exp  # (..., nb, s, K)
            k_up = _level_views(k, s)[0] * upper_exp
            _offdiag_blocks(A, s).copy_(q_low @ k_up.transpose(-1, -2))
            s *= 2
    if k_decay is not None:
        k_out = k * k_decay
    carry = b_last.transpose(-1, -2).exp()  # (B, H, N, K or 1, 1)
    final = None
    if starts is None:
        N = q.shape[2]
        starts = v.new_empty(*q.shape[:3], q.shape[-1], v.shape[-1])  # (B, H, N, K, V)
        starts[:, :, 0] = 0 if initial_state is None else initial_state
        written = N if need_final else N - 1  # chunks whose write is read
        if written:
            # when c = C, k_out^T v = (k_in^T v) ⊙ exp(b_last), scaled on the (K, V) side
            k_w, v_w = (k_in if k_out is None else k_out)[:, :, :written], v[:, :, :written]
            writes = k_w.transpose(-1, -2) @ v_w
            if k_out is None:
                writes.mul_(carry[:, :, :written])
            for n in range(N - 1):  # S_{n+1} = a_n S_n + U_n, in place
                into(starts[:, :, n + 1], torch.addcmul, writes[:, :, n], carry[:, :, n], starts[:, :, n])
            if need_final:
                final = torch.addcmul(writes[:, :, N - 1], carry[:, :, N - 1], starts[:, :, N - 1])
    return _Parts(b, c, q_exp, q_in, k_exp, k_in, A, q_decay, k_decay, k_out, carry, starts, final)


def _intra_grads(dA: Tensor, q: Tensor, k: Tensor, p: _Parts) -> tuple[Tensor, Tensor]:
    """Gradients of the strictly lower part of A for a strictly lower dA (..., C, C): (dq, dk), each (..., C, K).

    The diagonal (decay 1) is left to the caller: it does not depend on b, and keeping it out of q dq - k dk avoids
    a cancellation that would swamp dg when the gates are very negative (true dg ~ exp(g) there).
    """
    C, c = q.shape[-2], p.c
    dblocks = _diag_blocks(dA, c)  # (..., C / c, c, c)
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


def _mm_add(add: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """add + a @ b over the chunk batch dims as one GEMM with beta = 1 (no separate pass for the sum)."""
    return torch.baddbmm(add.flatten(0, -3), a.flatten(0, -3), b.flatten(0, -3)).view(add.shape)


def _add_chunk_products(add: Tensor, a: Tensor, b: Tensor, lo: int, hi: int) -> Tensor:
    """add + a @ b on (B, H, N, ., .) tensors where only chunks lo .. hi - 1 have a non-zero product (a zero start
    state, a zero gradient after the last chunk): one fused GEMM-accumulate when that is every chunk, else the
    product of those chunks alone, added in place."""
    if lo == 0 and hi == add.shape[2]:
        return _mm_add(add, a, b)
    if lo < hi:
        add[:, :, lo:hi] += a[:, :, lo:hi] @ b[:, :, lo:hi]
    return add


def _bounded_parts(q_in: Tensor, k_in: Tensor, q_decay: Tensor, A: Tensor, starts: Tensor) -> _Parts:
    """The backward's _Parts when c = C from the saved q_in, k_in and exp(b): one reciprocal."""
    carry = q_decay[..., -1:, :].transpose(-1, -2)  # exp(b_last)
    k_exp = q_decay.reciprocal()
    return _Parts(None, q_decay.shape[-2], q_decay, q_in, k_exp, k_in, A, q_decay, None, None, carry, starts, None)


def _bounded_grads(
    do: Tensor, v: Tensor, p: _Parts, after: Tensor, carried: Tensor | None, first: int, last: int
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """dq, dk, dv and db when c = C (every |b| <= FACTOR_BOUND), in the frames of q_in = q ⊙ e and k_in = k ⊙ e^-1.

    With e = exp(b), a = exp(b_last) and dH' = a ⊙ dH_{n+1} (the reverse carry scaled to the chunk start):
        dq = (dA k_in + do S_n^T) ⊙ e,   dk = (dA^T q_in + v dH'^T) ⊙ e^-1,   dv = A^T do + k_in dH'
    plus the diagonal terms, so q ⊙ dq = q_in ⊙ X and k ⊙ dk = k_in ⊙ Y use the GEMM outputs X, Y directly: three
    GEMM-accumulates and seven elementwise passes instead of the general path's eleven. Chunks before ``first``
    start from a zero state and chunks from ``last`` on have a zero gradient after them: their state products are
    left out.
    """
    after_scaled = after * p.carry  # (B, H, N, K, V)
    dv = _add_chunk_products(p.A.transpose(-1, -2) @ do, p.k_in, after_scaled, 0, last)
    dA = do @ v.transpose(-1, -2)  # (B, H, N, C, C)
    dA_diag = dA.diagonal(dim1=-2, dim2=-1).unsqueeze(-1).clone()  # (B, H, N, C, 1)
    dA.tril_(-1)
    X = _add_chunk_products(dA @ p.k_in, do, p.starts.transpose(-1, -2), first, dA.shape[2])
    # (B, H, last, C, K): k_in-frame gradient through the chunk end (zero for the chunks from last on)
    through_end = v[:, :, :last] @ after_scaled[:, :, :last].transpose(-1, -2)
    if last == dA.shape[2]:
        Y = _mm_add(through_end, dA.transpose(-1, -2), p.q_in)
    else:
        Y = dA.transpose(-1, -2) @ p.q_in
        Y[:, :, :last] += through_end
    db = None
    if carried is not None:  # g needs a gradient
        # b-dependent terms only (module docstring). Row C - 1: dA's last column is zero, so k ⊙ dk there is the
        # row's own write alone, which cancels exactly and is left out
        db = (p.q_in * X).addcmul_(p.k_in, Y, value=-1)
        last_q = (p.q_in[..., -1, :] * X[..., -1, :]).add_(carried)
        last_q[:, :, :last] += (p.k_in[:, :, :last, :-1, :] * through_end[..., :-1, :]).sum(-2)
        db[..., -1, :] = last_q
    # the diagonal terms dA_ii k_i = dA_ii k_in,i e_i and dA_ii q_i = dA_ii q_in,i e_i^-1 join before the scaling
    dq = X.addcmul_(dA_diag, p.k_in).mul_(p.q_decay)
    dk = Y.addcmul_(dA_diag, p.q_in).mul_(p.k_exp)
    return dq, dk, dv, db


def _blocked_grads(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, p: _Parts, after: Tensor, carried: Tensor | None, first: int, last: int
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """dq, dk, dv and db for any gates (c < C: blocks and the exact hierarchy), following the module docstring; the
    state products of chunks before ``first`` (zero start) and from ``last`` on (zero gradient after) are left out."""
    N = do.shape[2]
    dv = _add_chunk_products(p.A.transpose(-1, -2) @ do, p.k_out, after, 0, last)
    dA = do @ v.transpose(-1, -2)  # (B, H, N, C, C)
    dA_diag = dA.diagonal(dim1=-2, dim2=-1).unsqueeze(-1).clone()  # (B, H, N, C, 1)
    dq, dk = _intra_grads(dA.tril_(-1), q, k, p)
    if first < N:  # now dq without the diagonal term
        dq[:, :, first:].addcmul_(do[:, :, first:] @ p.starts[:, :, first:].transpose(-1, -2), p.q_decay[:, :, first:])
    dk_out = v[:, :, :last] @ after[:, :, :last].transpose(-1, -2)  # (B, H, last, C, K) gradient of k_out
    db = None
    if carried is not None:  # g needs a gradient
        # b-dependent terms only (module docstring): A's diagonal and the last row's own write are left out
        db = (q * dq).sub_(k * dk)
        through_end = p.k_out[:, :, :last] * dk_out  # k ⊙ dk through exp(b_last - b): -db_j, +db_last summed over j
        db[:, :, :last, :-1, :] -= through_end[..., :-1, :]
        db[..., -1, :] += carried
        db[:, :, :last, -1, :] += through_end[..., :-1, :].sum(-2)
    dq = dq.addcmul_(dA_diag, k)
    dk[:, :, :last].addcmul_(dk_out, p.k_decay[:, :, :last])
    dk = dk.addcmul_(dA_diag, q)
    return dq, dk, dv, db


# Up to this many chunks, state products with a zero operand are skipped (_ChunkedGLA). Skipping slices the chunk
# axis of (B, H, N, ...) tensors, and batched matmuls copy such views. Measured side by side (fwd + bwd): 1.9x at
# N = 1 and 1.15-1.37x at N = 2 (MQAR's T = 64 and 128), break-even at N = 4, 0.86-0.95x at N = 8-64, where only
# one chunk in N is saved.
SKIP_ZERO_CHUNKS_UP_TO = 2


class _ChunkedGLA(torch.autograd.Function):
    """The chunked op. On short inputs (<= SKIP_ZERO_CHUNKS_UP_TO chunks) state products with a zero operand are
    skipped: with no initial state the first chunk starts from zero (no (q ⊙ exp(b)) S_0 in the forward, no
    do S_0^T in the backward, and its (q ⊙ exp(b))^T do only feeds d initial_state); with no final state asked for,
    the last chunk's write is not formed; with no gradient for the final state (an unused output arrives as None:
    materialize_grads off) nothing flows back after the last chunk. At T <= 2C that is half the state GEMMs or
    more (all of them at T <= C)."""

    @staticmethod
    def forward(
        ctx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        g: Tensor,
        scale: float,
        C: int,
        initial_state: Tensor | None,
        need_final: bool,
    ):
        ctx.set_materialize_grads(False)
        T = q.shape[1]
        q, k, v, g = _to_chunks(q, C, scale), _to_chunks(k, C), _to_chunks(v, C), _to_chunks(g, C)
        skip = q.shape[2] <= SKIP_ZERO_CHUNKS_UP_TO
        p = _forward_parts(q, k, v, g, initial_state, need_final=need_final or not skip)
        q_start = p.q_in if p.q_exp is p.q_decay else q * p.q_decay  # q ⊙ exp(b)
        first = 1 if initial_state is None and skip else 0  # from here on the start states are not all zero
        o = _add_chunk_products(p.A @ v, q_start, p.starts, first, q.shape[2])  # (B, H, N, C, V)
        # A and the chunk-start states are saved (two matmuls and the state scan fewer); the decays are recomputed.
        # When c = C the backward works in the frames of q_in, k_in only, so those replace q, k (same memory)
        if p.c == C > 1:  # the bounded backward needs exp(b), not b
            ctx.save_for_backward(p.q_in, p.k_in, v, p.q_decay, p.A, p.starts)
        else:
            ctx.save_for_backward(q, k, v, p.b, p.A, p.starts)
        ctx.c, ctx.T, ctx.scale, ctx.first, ctx.skip = p.c, T, scale, first, skip
        ctx.has_initial_state = initial_state is not None
        return _from_chunks(o, T), (p.final if need_final else None)

    @staticmethod
    def backward(ctx, do: Tensor | None, dfinal: Tensor | None):
        q, k, v, b, A, starts = ctx.saved_tensors  # q_in, k_in, exp(b) for q, k, b when c = C
        T, scale, first, skip = ctx.T, ctx.scale, ctx.first, ctx.skip
        C, N = q.shape[-2], q.shape[2]
        do = torch.zeros_like(v) if do is None else _to_chunks(do, C)  # None: only the final state was used
        bounded = ctx.c == C > 1
        if bounded:
            p = _bounded_parts(q, k, b, A, starts)
        else:
            p = _forward_parts(q, k, v, b, None, _Saved(b, ctx.c, A, starts))
        q_start = p.q_in if p.q_exp is p.q_decay else q * p.q_decay
        # reverse carry dH_n = a_n dH_{n+1} + (q ⊙ exp(b))^T do; after[n] = dH_{n+1}, the gradient after chunk n.
        # Chunk 0's own (q ⊙ exp(b))^T do only reaches d initial_state
        needs_dinitial = ctx.has_initial_state and ctx.needs_input_grad[6]
        read_from = 1 if skip and not needs_dinitial else 0
        from_outputs = q_start[:, :, read_from:].transpose(-1, -2) @ do[:, :, read_from:]  # (B, H, N - read_from, K, V)
        after = starts.new_empty(starts.shape)
        after[:, :, N - 1] = 0 if dfinal is None else dfinal
        for n in range(N - 1, 0, -1):
            into(after[:, :, n - 1], torch.addcmul, from_outputs[:, :, n - read_from], p.carry[:, :, n], after[:, :, n])
        dinitial = torch.addcmul(from_outputs[:, :, 0], p.carry[:, :, 0], after[:, :, 0]) if needs_dinitial else None
        last = N - 1 if skip and dfinal is None else N  # up to here the gradients after the chunks are not all zero
        carried = None  # (B, H, N, K): exp(b_last) rowsum(S_n ⊙ dH), the last row's term of db through the carry
        if ctx.needs_input_grad[3]:
            if first == 0 and last == N:
                carried = (starts * after).sum(-1).mul_(p.carry[..., 0])
            else:
                carried = starts.new_zeros(starts.shape[:-1])
                if first < last:
                    products = (starts[:, :, first:last] * after[:, :, first:last]).sum(-1)
                    carried[:, :, first:last] = products.mul_(p.carry[:, :, first:last, :, 0])
        if bounded:
            dq, dk, dv, db = _bounded_grads(do, v, p, after, carried, first, last)
        else:
            dq, dk, dv, db = _blocked_grads(do, q, k, v, p, after, carried, first, last)
        dg = None
        if db is not None:
            if b.shape[-1] == 1:
                db = db.sum(-1, keepdim=True)
            # b_i = sum_{r <= i} g_r, so dg_r = sum_{i >= r} db_i: a reverse cumsum, as a matmul with triu ones
            dg = torch.ones(C, C, dtype=db.dtype, device=db.device).triu() @ db
        dq, dk, dv = _from_chunks(dq, T, scale), _from_chunks(dk, T), _from_chunks(dv, T)
        dg = None if dg is None else _from_chunks(dg, T)
        return dq, dk, dv, dg, None, None, dinitial, None


def gla_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float,
    initial_state: Tensor | None,
    chunk_size: int = 64,
    output_final_state: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """q, k (B, T, H, K), g (B, T, H, K or 1), v (B, T, H, V), initial_state (B, H, K, V) or None -> (o, final state).

    Inputs are already in the accumulation dtype; ``chunk_size`` is a power of two (shrunk to the next power of two
    >= T for short inputs; the result does not depend on it beyond rounding). With ``output_final_state=False`` the
    state is None and the last chunk's write is skipped.
    """
    T = q.shape[1]
    C = min(chunk_size, 1 << max(T - 1, 0).bit_length())
    return _ChunkedGLA.apply(q, k, v, g, scale, C, initial_state, output_final_state)
