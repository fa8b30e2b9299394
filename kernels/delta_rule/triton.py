"""Triton kernels for the two sequential passes of the chunked delta rule (FLA's ``chunk_gated_delta_rule_fwd_h`` /
``chunk_gated_delta_rule_bwd_dhu`` split of the work, same i_/o_/m_/b_ naming as kernels/gla/triton.py).

Everything that is one batched matmul over all chunks at once (K K^T, the UT transform T = (I + L)^{-1} by a batched
triangular solve, U = T diag(beta) V, W = T diag(beta gamma) K, the outputs and every input gradient) stays in torch:
on a GPU those are single cuBLAS calls. What the torch form does with a Python loop of one multiply-add per chunk
(N = T / C kernel launches each way) is done here by one program per (value tile, batch*head) that keeps the K x BV
state tile on chip for the whole sequence:

    _fwd_state_kernel   for n = 0 .. N-1:  h_n = h;  u_n = U_n - W_n h;  h <- gamma_last_n h + k_end_n^T u_n
    _bwd_state_kernel   for n = N-1 .. 0:  a_n = a;  du_n = Pdo_n + k_end_n a;  a <- gamma_last_n a + qdo_n - W_n^T du_n

(h_n: the state at chunk n's start; a_n: the gradient reaching the state after chunk n, a = d final state at the
start; qdo_n = (Q ⊙ gamma)^T dO and Pdo_n = ((Q K^T) ⊙ D)^T dO of chunk n, computed in torch.) A whole key row of
the state (K <= 256) sits in one tile, so each value tile is independent and the grid is (V / BV, B*H). ``import
triton`` happens only in this module; on this CPU-only machine the kernels are verified under ``TRITON_INTERPRET=1``
against the recurrent reference (forward, final state and every gradient).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnzoo.kernels.delta_rule.chunked import _ChunkedDeltaRule, _gamma_last, _Parts, _rows

MAX_KEY_DIM = 256  # one [BK, BV] state tile holds a whole key row


@triton.jit
def _fwd_state_kernel(
    U, W, k_end, g_last, h0, h, u, ht, N,
    C: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, GATED: tl.constexpr,
):  # fmt: skip
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    if USE_H0:
        # [BK, BV]
        b_h = tl.load(h0 + i_bh * K * V + p_kv, mask=m_kv, other=0)
    else:
        b_h = tl.zeros([BK, BV], dtype=h.dtype.element_ty)
    for i_n in range(N):
        tl.store(h + (i_bh * N + i_n) * K * V + p_kv, b_h, mask=m_kv)
        o_row = (i_bh * N + i_n) * C + o_c
        # [C, BK]
        b_w = tl.load(W + o_row[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0)
        b_ke = tl.load(k_end + o_row[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0)
        # [C, BV]: what each position writes, given the state at the chunk start
        b_u = tl.load(U + o_row[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0)
        b_u = b_u - tl.dot(b_w, b_h, input_precision="ieee")
        tl.store(u + o_row[:, None] * V + o_v[None, :], b_u, mask=m_v[None, :])
        if GATED:
            b_h = b_h * tl.load(g_last + i_bh * N + i_n)
        b_h = b_h + tl.dot(tl.trans(b_ke), b_u, input_precision="ieee")
    tl.store(ht + i_bh * K * V + p_kv, b_h, mask=m_kv)


@triton.jit
def _bwd_state_kernel(
    Pdo, qdo, W, k_end, g_last, dht, after, du, dh0, N,
    C: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_DHT: tl.constexpr, GATED: tl.constexpr,
):  # fmt: skip
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    if USE_DHT:
        # [BK, BV]
        b_a = tl.load(dht + i_bh * K * V + p_kv, mask=m_kv, other=0)
    else:
        b_a = tl.zeros([BK, BV], dtype=after.dtype.element_ty)
    for i_s in range(N):
        i_n = N - 1 - i_s
        tl.store(after + (i_bh * N + i_n) * K * V + p_kv, b_a, mask=m_kv)  # gradient reaching the state after chunk
        o_row = (i_bh * N + i_n) * C + o_c
        # [C, BK]
        b_w = tl.load(W + o_row[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0)
        b_ke = tl.load(k_end + o_row[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0)
        # [C, BV]
        b_du = tl.load(Pdo + o_row[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0)
        b_du = b_du + tl.dot(b_ke, b_a, input_precision="ieee")
        tl.store(du + o_row[:, None] * V + o_v[None, :], b_du, mask=m_v[None, :])
        # [BK, BV]
        b_qdo = tl.load(qdo + (i_bh * N + i_n) * K * V + p_kv, mask=m_kv, other=0)
        if GATED:
            b_a = b_a * tl.load(g_last + i_bh * N + i_n)
        b_a = b_a + b_qdo - tl.dot(tl.trans(b_w), b_du, input_precision="ieee")
    tl.store(dh0 + i_bh * K * V + p_kv, b_a, mask=m_kv)


def _tiles(K: int, V: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(K)), max(16, min(64, triton.next_power_of_2(V)))


def _flat(x: Tensor) -> Tensor:
    """The contiguous (B*H, N, ...) row layout the kernels index."""
    return _rows(x).contiguous()


def _gamma_last_arg(p: _Parts, like: Tensor) -> Tensor:
    """(B*H, N) decay over each whole chunk, or a placeholder the ungated kernels never read."""
    g_last = _gamma_last(p)
    return like.new_empty(1) if g_last is None else g_last.contiguous()


class TritonStatePasses:
    """The sequential passes of :class:`attnzoo.kernels.delta_rule.chunked.StatePasses`, as Triton kernels."""

    @staticmethod
    def forward(p: _Parts, initial: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, H, N, C, V = p.U.shape
        K = p.W.shape[-1]
        BK, BV = _tiles(K, V)
        h = p.U.new_empty(B, H, N, K, V)
        u = torch.empty_like(p.U)
        final = p.U.new_empty(B, H, K, V)
        _fwd_state_kernel[(triton.cdiv(V, BV), B * H)](
            _flat(p.U), _flat(p.W), _flat(p.k_end), _gamma_last_arg(p, p.U), initial.contiguous(), h, u, final, N,
            C=C, K=K, V=V, BK=BK, BV=BV, USE_H0=True, GATED=p.gamma is not None,
        )  # fmt: skip
        return h, u, final

    @staticmethod
    def backward(p: _Parts, qdo: Tensor, Pdo: Tensor, dfinal: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        B, H, N, C, V = p.U.shape
        K = p.W.shape[-1]
        BK, BV = _tiles(K, V)
        after = qdo.new_empty(B, H, N, K, V)
        du = torch.empty_like(Pdo)
        dinitial = qdo.new_empty(B, H, K, V)
        use_dht = dfinal is not None
        _bwd_state_kernel[(triton.cdiv(V, BV), B * H)](
            _flat(Pdo), _flat(qdo), _flat(p.W), _flat(p.k_end), _gamma_last_arg(p, qdo),
            dfinal.contiguous() if use_dht else dinitial, after, du, dinitial, N,
            C=C, K=K, V=V, BK=BK, BV=BV, USE_DHT=use_dht, GATED=p.gamma is not None,
        )  # fmt: skip
        return after, du, dinitial


def delta_rule_triton(
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
    """Same signature and result as :func:`attnzoo.kernels.delta_rule.chunked.delta_rule_chunked`; the chunk is at
    least 16 (``tl.dot``'s smallest tile) and at most the next power of two >= T."""
    K = q.shape[-1]
    if K > MAX_KEY_DIM:
        raise ValueError(
            f"delta_rule: the triton backend keeps a whole key row of the state in one tile, so K <= {MAX_KEY_DIM}; "
            f"got K={K}. Use backend='torch' or more heads."
        )
    T = q.shape[1]
    C = max(16, min(chunk_size, triton.next_power_of_2(T)))
    return _ChunkedDeltaRule.apply(q, k, v, beta, g, scale, C, initial_state, TritonStatePasses)
