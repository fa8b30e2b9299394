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

Everything but the state carry is a batched matmul over all chunks at once; the carry is a loop over chunks (never
over time) of two fused multiply-adds each, u_n = U_n - W_n S_n and S_n+1 = gamma_last S_n + (K ⊙ delta)^T u_n, on
(B H) small matrices. (Folding the carry into one matmul per chunk, S_n+1 = F_n S_n + E_n with
F_n = gamma_last I - (K ⊙ delta)^T W, costs three extra batched matmuls; on the CPU that is slower than the loop.)
The UT transform's inverse is formed by recursive 2 x 2 blocking (:func:`_unit_lower_inverse`), about twice as fast
on the CPU as one batched triangular solve of the full chunk.

The decays are only ever formed as differences b_i - b_j with j <= i (never exp(b_i) exp(-b_j)), so no gate,
however negative, overflows; with L2-normalised keys and beta in (0, 1) the entries of L lie in [-1, 1].
"""

from __future__ import annotations

from typing import NamedTuple

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


def _decays(b: Tensor | None, C: int, like: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(D, gamma, delta) from the chunk-local cumsum b (B, H, N, C); without a gate all three are None: D would be
    the causal mask of ones (applied by :func:`_decayed` as a ``tril``), gamma and delta all ones."""
    if b is None:
        return None, None, None
    causal = torch.ones(C, C, dtype=torch.bool, device=like.device).tril()
    # -inf above the diagonal BEFORE exp: exp(b_i - b_j) for j > i would overflow for very negative gates
    D = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    return D, b.exp(), (b[..., -1:] - b).exp()


def _unit_lower_inverse(A: Tensor, base: int = 16) -> Tensor:
    """The inverse of a batch of unit lower-triangular matrices A (..., C, C), C a power of two.

    With A = [[A11, 0], [A21, A22]], A^{-1} = [[A11^{-1}, 0], [-A22^{-1} A21 A11^{-1}, A22^{-1}]]: both diagonal
    blocks are inverted together (one level down), down to ``base`` x ``base`` blocks, which one batched triangular
    solve inverts. The strictly upper triangle of A is never read.
    """
    size = A.shape[-1]
    if size <= base:
        eye = torch.eye(size, dtype=A.dtype, device=A.device)
        return torch.linalg.solve_triangular(A, eye.expand_as(A), upper=False, unitriangular=True)
    h = size // 2
    top, bottom = _unit_lower_inverse(torch.stack((A[..., :h, :h], A[..., h:, h:])), base).unbind(0)
    out = A.new_zeros(A.shape)
    out[..., :h, :h] = top
    out[..., h:, h:] = bottom
    out[..., h:, :h] = (bottom @ A[..., h:, :h] @ top).neg_()
    return out


def _baddbmm(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """x + a @ b over (B, H, N) batches of matrices in one fused call."""
    return torch.baddbmm(x.flatten(0, 2), a.flatten(0, 2), b.flatten(0, 2)).view(x.shape)


def _decayed(x: Tensor, D: Tensor | None) -> Tensor:
    """x ⊙ D in place (x is a fresh (..., C, C) product): a ``tril`` without a gate, where D is the causal mask."""
    return x.tril_() if D is None else x.mul_(D)


class _Parts(NamedTuple):
    """What forward and backward share; the backward gets the products back from the forward and recomputes the
    decays (elementwise)."""

    D: Tensor | None  # (B, H, N, C, C) decay exp(b_i - b_j) for j <= i, else 0; None without a gate (a tril)
    gamma: Tensor | None  # (B, H, N, C) exp(b), decay since the chunk start; None without a gate
    delta: Tensor | None  # (B, H, N, C) exp(b_last - b), decay to the chunk end; None without a gate
    KK: Tensor  # (B, H, N, C, C) K K^T
    Tm: Tensor  # (B, H, N, C, C) (I + L)^{-1}
    U: Tensor  # (B, H, N, C, V) T diag(beta) V
    W: Tensor  # (B, H, N, C, K) T diag(beta ⊙ gamma) K
    k_end: Tensor  # (B, H, N, C, K) K ⊙ delta: each key as seen at the chunk end


def _parts(k: Tensor, v: Tensor, beta: Tensor, b: Tensor | None) -> _Parts:
    C = k.shape[-2]
    D, gamma, delta = _decays(b, C, k)
    KK = k @ k.transpose(-1, -2)
    eye = torch.eye(C, dtype=k.dtype, device=k.device)
    L = _decayed(KK * beta[..., None], D).tril_(-1)
    Tm = _unit_lower_inverse(L.add_(eye))  # (I + L)^{-1}
    U = Tm @ (v * beta[..., None])
    k_beta = k * (beta if gamma is None else beta * gamma)[..., None]
    W = Tm @ k_beta
    k_end = k if delta is None else k * delta[..., None]
    return _Parts(D, gamma, delta, KK, Tm, U, W, k_end)


def _rows(x: Tensor) -> Tensor:
    """(B, H, N, ...) -> (B*H, N, ...): the per-(batch, head) layout of the state passes (a view when contiguous)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _gamma_last(p: _Parts) -> Tensor | None:
    """(B*H, N) decay over each whole chunk, or None without a gate."""
    return None if p.gamma is None else _rows(p.gamma[..., -1])


class StatePasses:
    """The two sequential passes over chunks, the only part that is not one batched matmul over all chunks: the
    torch form below (a loop of two fused multiply-adds per chunk on (B H) K x V states), or Triton kernels that
    keep the state on chip."""

    @staticmethod
    def forward(p: _Parts, initial: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(S_n at every chunk start (B, H, N, K, V), u = U - W S_n (B, H, N, C, V), the final state)."""
        B, H, N, C, V = p.U.shape
        K = p.W.shape[-1]
        U, W, k_end_t, g_last = _rows(p.U), _rows(p.W), _rows(p.k_end).transpose(-1, -2), _gamma_last(p)
        g_last = None if g_last is None else g_last[..., None, None]  # (B*H, N, 1, 1)
        S, u = U.new_empty(B * H, N, K, V), torch.empty_like(U)
        h = initial.reshape(B * H, K, V)
        for n in range(N):
            S[:, n] = h
            u_n = torch.baddbmm(U[:, n], W[:, n], h, alpha=-1.0)
            u[:, n] = u_n
            h = torch.baddbmm(h if g_last is None else h * g_last[:, n], k_end_t[:, n], u_n)
        return S.view(B, H, N, K, V), u.view(B, H, N, C, V), h.view(B, H, K, V)

    @staticmethod
    def backward(p: _Parts, qdo: Tensor, Pdo: Tensor, dfinal: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The reverse pass. With a_n the gradient reaching S_{n+1} (a_{N-1} = dfinal), qdo = (Q ⊙ gamma)^T dO and
        Pdo = ((Q K^T) ⊙ D)^T dO per chunk: du_n = Pdo_n + k_end a_n and a_{n-1} = gamma_last a_n + qdo_n - W^T du_n.
        Returns (a_n for every chunk, du, the gradient of the initial state)."""
        B, H, N, C, V = Pdo.shape
        K = p.W.shape[-1]
        Pdo_rows, qdo_rows, g_last = _rows(Pdo), _rows(qdo), _gamma_last(p)
        g_last = None if g_last is None else g_last[..., None, None]
        W_t, k_end = _rows(p.W).transpose(-1, -2), _rows(p.k_end)
        after, du = qdo_rows.new_empty(B * H, N, K, V), torch.empty_like(Pdo_rows)
        a = dfinal.reshape(B * H, K, V)
        for n in reversed(range(N)):
            after[:, n] = a
            du_n = torch.baddbmm(Pdo_rows[:, n], k_end[:, n], a)
            du[:, n] = du_n
            a = torch.baddbmm((a if g_last is None else a * g_last[:, n]) + qdo_rows[:, n], W_t[:, n], du_n, alpha=-1.0)
        return after.view(B, H, N, K, V), du.view(B, H, N, C, V), a.view(B, H, K, V)


class _ChunkedDeltaRule(torch.autograd.Function):
    """Saves the chunked inputs, the chunk-start states and every per-chunk product of the forward that costs a
    matmul (T, K K^T, (Q K^T) ⊙ D, U, W, u): memory O(T (K + V + C) + (T / C) K V), the same order as the inputs,
    and the backward recomputes only elementwise decays. (FLA keeps T and recomputes U, W and u on the GPU, where
    memory is the scarce resource; on the CPU the extra matmuls cost ~15% of fwd+bwd.)"""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, scale: float, C: int, initial_state, passes: StatePasses):
        B, T, H, K = q.shape
        q, k, v, beta = _to_chunks(q * scale, C), _to_chunks(k, C), _to_chunks(v, C), _to_chunks(beta, C)
        b = None if g is None else _to_chunks(g, C).cumsum(-1)
        p = _parts(k, v, beta, b)
        initial = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state
        S, u, final = passes.forward(p, initial)
        q_start = q if p.gamma is None else q * p.gamma[..., None]
        P = _decayed(q @ k.transpose(-1, -2), p.D)  # (Q K^T) ⊙ D, causal within the chunk
        o = _baddbmm(q_start @ S, P, u)
        ctx.save_for_backward(q, k, v, beta, b, S, u, P, p.KK, p.Tm, p.U, p.W)
        ctx.scale, ctx.T, ctx.has_initial_state, ctx.passes = scale, T, initial_state is not None, passes
        return _from_chunks(o, T), final

    @staticmethod
    def backward(ctx, do: Tensor, dfinal: Tensor):
        q, k, v, beta, b, S, u, P, KK, Tm, U, W = ctx.saved_tensors
        T, C = ctx.T, q.shape[-2]
        do = _to_chunks(do, C)
        D, gamma, delta = _decays(b, C, k)
        k_end = k if delta is None else k * delta[..., None]
        p = _Parts(D, gamma, delta, KK, Tm, U, W, k_end)
        gated = p.gamma is not None
        need_dg = gated and ctx.needs_input_grad[4]
        q_start = q if not gated else q * p.gamma[..., None]
        Pdo = P.transpose(-1, -2) @ do  # (B, H, N, C, V): the part of du from the outputs
        after, du, dinitial = ctx.passes.backward(p, q_start.transpose(-1, -2) @ do, Pdo, dfinal)
        dP = do @ u.transpose(-1, -2)
        dD_D = dP * P if need_dg else None  # dD_ij D_ij from the outputs: dP ⊙ (Q K^T) ⊙ D
        dQK = _decayed(dP, p.D)
        X = do @ S.transpose(-1, -2)  # (B, H, N, C, K) gradient of q_start
        dq = _baddbmm(X if not gated else X * p.gamma[..., None], dQK, k)
        dk_end = u @ after.transpose(-1, -2)  # (B, H, N, C, K)
        dk = _baddbmm(dk_end if not gated else dk_end * p.delta[..., None], dQK.transpose(-1, -2), q)
        # u = U - W S, U = T diag(beta) V, W = T diag(beta gamma) K, T = (I + L)^{-1}:
        # d(beta V) = T^T du, d(beta gamma K) = -T^T du S^T = -d(beta V) S^T, and
        # dL = -strictly_lower(d(beta V) U^T + d(beta gamma K) W^T) = -strictly_lower(d(beta V) (U - W S)^T), i.e.
        # d(beta V) u^T: one matmul instead of three
        dvb = p.Tm.transpose(-1, -2) @ du
        minus_dkb = dvb @ S.transpose(-1, -2)  # d(beta gamma K) = -minus_dkb; the sign folds into its two uses
        dL = (dvb @ u.transpose(-1, -2)).neg_().tril_(-1)
        dv = dvb * beta[..., None]
        kb_rows = (minus_dkb * k).sum(-1).neg_()  # (B, H, N, C)
        gamma = p.gamma if gated else 1.0
        dk.addcmul_(minus_dkb, (beta * gamma)[..., None], value=-1.0)
        dLD = dL if not gated else dL * p.D  # gradient of (K K^T ⊙ D) rows scaled by beta, strictly lower
        dKK = dLD * beta[..., None]
        dk = _baddbmm(_baddbmm(dk, dKK, k), dKK.transpose(-1, -2), k)
        dbeta = (dvb * v).sum(-1) + kb_rows * gamma + (dLD * p.KK).sum(-1)
        dg = None
        if need_dg:
            # b-dependent terms only: D's diagonal and delta_last are exactly 1, and their opposite contributions to
            # the same db_i cancel, so they are left out (which keeps dg accurate when exp(g) is tiny)
            E = dD_D.add_(dL * p.KK * beta[..., None] * p.D).tril_(-1)  # dD_ij D_ij for j < i
            db = E.sum(-1) - E.sum(-2)
            db += p.gamma * ((q * X).sum(-1) + beta * kb_rows)
            through_end = p.delta * (k * dk_end).sum(-1)  # delta_j d delta_j
            db[..., :-1] -= through_end[..., :-1]
            db[..., -1] += through_end[..., :-1].sum(-1) + p.gamma[..., -1] * (S * after).sum((-1, -2))
            dg = _from_chunks(db.flip(-1).cumsum(-1).flip(-1), T)  # b = cumsum g: dg is the reverse cumsum of db
        dq = _from_chunks(dq, T) * ctx.scale
        dinitial = dinitial if ctx.has_initial_state else None
        return dq, _from_chunks(dk, T), _from_chunks(dv, T), _from_chunks(dbeta, T), dg, None, None, dinitial, None


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
    >= T for short inputs; the result does not depend on it beyond rounding). ``output_final_state`` is accepted for
    the uniform backend signature; the state is always returned.
    """
    T = q.shape[1]
    C = min(chunk_size, 1 << max(T - 1, 0).bit_length())
    return _ChunkedDeltaRule.apply(q, k, v, beta, g, scale, C, initial_state, StatePasses)
