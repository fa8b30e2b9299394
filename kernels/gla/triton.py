"""Triton kernels for GLA, forward and backward, chunked as in FLA's ``chunk_gla`` (same i_/o_/m_/p_/b_ naming).

Inputs are prepared in torch: front-padded to a multiple of the chunk BT (zero q, k, v and g = 0 before position 0
change nothing, and every chunk's last row is then a real position), laid out (B*H, T, D), q already scaled, and
b = cumsum of g restarted in every chunk (a scalar gate is broadcast over K). Per chunk, with h the state at its
start (all exponents <= 0 for g <= 0; the intra-chunk decay exp(b_i - b_j) is formed pairwise, masked with -inf
BEFORE exp, never as exp(b_i) exp(-b_j)):

    _fwd_h_kernel    h <- diag(exp(b_last)) h + (k ⊙ exp(b_last - b))^T v     (stores h at every chunk start)
    _fwd_o_kernel    o = (q ⊙ exp(b)) h + A v,   A_ij = sum_c q_ic k_jc exp(b_ic - b_jc) [j <= i]
    _bwd_dh_kernel   dh <- diag(exp(b_last)) dh + (q ⊙ exp(b))^T do           (reverse; dh_0 = d initial_state)
    _bwd_dv_kernel   dv = A^T do + (k ⊙ exp(b_last - b)) dh
    _bwd_dqk_kernel  dq, dk and db = q ⊙ dq - k ⊙ dk (+ the carried-state term on the last row), as in chunked.py

The chunk-local cumsum that makes b is a torch op, so autograd turns db into dg. Grid axes follow FLA:
(tile, chunk, batch*head).
The pairwise [BT, BT, BK] decay block favours clarity over GPU speed; ``import triton`` happens only in this module,
and on this CPU-only machine the kernels are verified under ``TRITON_INTERPRET=1`` against the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _pairwise_decay(b_g, b_gk, o_t, STRICT: tl.constexpr):
    # exp(g_i - g_j) for j <= i (j < i if STRICT), else 0; masked with -inf BEFORE exp  # [BT, BT, BK]
    m_ij = o_t[:, None] > o_t[None, :] if STRICT else o_t[:, None] >= o_t[None, :]
    b_diff = b_g[:, None, :] - b_gk[None, :, :]
    return tl.exp(tl.where(m_ij[:, :, None], b_diff, float("-inf")))


@triton.jit
def _fwd_h_kernel(
    k, v, g, h0, h, ht, T, NT,
    K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr,
):  # fmt: skip
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    if USE_H0:
        # [BK, BV]
        b_h = tl.load(h0 + i_bh * K * V + p_kv, mask=m_kv, other=0)
    else:
        b_h = tl.zeros([BK, BV], dtype=h.dtype.element_ty)
    for i_t in range(NT):
        tl.store(h + (i_bh * NT + i_t) * K * V + p_kv, b_h, mask=m_kv)
        o_row = i_bh * T + i_t * BT + o_t
        # [BT, BK]
        b_k = tl.load(k + o_row[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0)
        b_g = tl.load(g + o_row[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0)
        # [BK]
        b_glast = tl.load(g + (i_bh * T + i_t * BT + BT - 1) * K + o_k, mask=m_k, other=0)
        # [BT, BV]
        b_v = tl.load(v + o_row[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0)
        b_kout = b_k * tl.exp(b_glast[None, :] - b_g)
        b_h = b_h * tl.exp(b_glast)[:, None] + tl.dot(tl.trans(b_kout), b_v, input_precision="ieee")
    tl.store(ht + i_bh * K * V + p_kv, b_h, mask=m_kv)


@triton.jit
def _fwd_o_kernel(
    q, k, v, g, h, o, T, NT,
    K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_row = i_bh * T + i_t * BT + o_t
    b_o = tl.zeros([BT, BV], dtype=o.dtype.element_ty)
    b_A = tl.zeros([BT, BT], dtype=o.dtype.element_ty)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        p_tk = o_row[:, None] * K + o_k[None, :]
        # [BT, BK]
        b_q = tl.load(q + p_tk, mask=m_k[None, :], other=0)
        b_k = tl.load(k + p_tk, mask=m_k[None, :], other=0)
        b_g = tl.load(g + p_tk, mask=m_k[None, :], other=0)
        # [BK, BV]
        b_h = tl.load(
            h + (i_bh * NT + i_t) * K * V + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0
        )
        b_o += tl.dot(b_q * tl.exp(b_g), b_h, input_precision="ieee")
        # [BT, BT]
        b_A += tl.sum(b_q[:, None, :] * b_k[None, :, :] * _pairwise_decay(b_g, b_g, o_t, False), axis=2)
    # [BT, BV]
    b_v = tl.load(v + o_row[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0)
    b_o += tl.dot(b_A, b_v, input_precision="ieee")
    tl.store(o + o_row[:, None] * V + o_v[None, :], b_o, mask=m_v[None, :])


@triton.jit
def _bwd_dh_kernel(
    q, g, do, dht, dh, dh0, T, NT,
    K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_DHT: tl.constexpr,
):  # fmt: skip
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    if USE_DHT:
        # [BK, BV]
        b_dh = tl.load(dht + i_bh * K * V + p_kv, mask=m_kv, other=0)
    else:
        b_dh = tl.zeros([BK, BV], dtype=dh.dtype.element_ty)
    for i_s in range(NT):
        i_t = NT - 1 - i_s
        tl.store(dh + (i_bh * NT + i_t) * K * V + p_kv, b_dh, mask=m_kv)  # gradient reaching the state after chunk
        o_row = i_bh * T + i_t * BT + o_t
        # [BT, BK]
        b_q = tl.load(q + o_row[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0)
        b_g = tl.load(g + o_row[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0)
        # [BK]
        b_glast = tl.load(g + (i_bh * T + i_t * BT + BT - 1) * K + o_k, mask=m_k, other=0)
        # [BT, BV]
        b_do = tl.load(do + o_row[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0)
        b_dh = b_dh * tl.exp(b_glast)[:, None] + tl.dot(tl.trans(b_q * tl.exp(b_g)), b_do, input_precision="ieee")
    tl.store(dh0 + i_bh * K * V + p_kv, b_dh, mask=m_kv)


@triton.jit
def _bwd_dv_kernel(
    q, k, g, do, dh, dv, T, NT,
    K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_row = i_bh * T + i_t * BT + o_t
    b_dv = tl.zeros([BT, BV], dtype=dv.dtype.element_ty)
    b_A = tl.zeros([BT, BT], dtype=dv.dtype.element_ty)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        p_tk = o_row[:, None] * K + o_k[None, :]
        # [BT, BK]
        b_q = tl.load(q + p_tk, mask=m_k[None, :], other=0)
        b_k = tl.load(k + p_tk, mask=m_k[None, :], other=0)
        b_g = tl.load(g + p_tk, mask=m_k[None, :], other=0)
        # [BK]
        b_glast = tl.load(g + (i_bh * T + i_t * BT + BT - 1) * K + o_k, mask=m_k, other=0)
        # [BK, BV]
        b_dh = tl.load(
            dh + (i_bh * NT + i_t) * K * V + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0
        )
        b_dv += tl.dot(b_k * tl.exp(b_glast[None, :] - b_g), b_dh, input_precision="ieee")
        # [BT, BT]
        b_A += tl.sum(b_q[:, None, :] * b_k[None, :, :] * _pairwise_decay(b_g, b_g, o_t, False), axis=2)
    # [BT, BV]
    b_do = tl.load(do + o_row[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0)
    b_dv += tl.dot(tl.trans(b_A), b_do, input_precision="ieee")
    tl.store(dv + o_row[:, None] * V + o_v[None, :], b_dv, mask=m_v[None, :])


@triton.jit
def _bwd_dqk_kernel(
    q, k, v, g, h, do, dh, dq, dk, db, T, NT,
    K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    o_row = i_bh * T + i_t * BT + o_t
    p_tk = o_row[:, None] * K + o_k[None, :]
    dtype = dq.dtype.element_ty
    b_dA = tl.zeros([BT, BT], dtype=dtype)  # do v^T
    b_dA_diag = tl.zeros([BT], dtype=dtype)  # its diagonal
    b_dq_state = tl.zeros([BT, BK], dtype=dtype)  # do h^T
    b_dk_out = tl.zeros([BT, BK], dtype=dtype)  # v dh^T
    b_carried = tl.zeros([BK], dtype=dtype)  # rowsum(h ⊙ dh)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        p_kv = (i_bh * NT + i_t) * K * V + o_k[:, None] * V + o_v[None, :]
        # [BT, BV]
        b_v = tl.load(v + o_row[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0)
        b_do = tl.load(do + o_row[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0)
        # [BK, BV]
        b_h = tl.load(h + p_kv, mask=m_k[:, None] & m_v[None, :], other=0)
        b_dh = tl.load(dh + p_kv, mask=m_k[:, None] & m_v[None, :], other=0)
        b_dA += tl.dot(b_do, tl.trans(b_v), input_precision="ieee")
        b_dA_diag += tl.sum(b_do * b_v, axis=1)
        b_dq_state += tl.dot(b_do, tl.trans(b_h), input_precision="ieee")
        b_dk_out += tl.dot(b_v, tl.trans(b_dh), input_precision="ieee")
        b_carried += tl.sum(b_h * b_dh, axis=1)
    # [BT, BK]
    b_q = tl.load(q + p_tk, mask=m_k[None, :], other=0)
    b_k = tl.load(k + p_tk, mask=m_k[None, :], other=0)
    b_g = tl.load(g + p_tk, mask=m_k[None, :], other=0)
    # [BK]
    b_glast = tl.load(g + (i_bh * T + i_t * BT + BT - 1) * K + o_k, mask=m_k, other=0)
    # strictly lower part of A (the diagonal has decay 1 and no b-dependence)  # [BT, BT, BK]
    b_E = _pairwise_decay(b_g, b_g, o_t, True)
    b_dAE = b_dA[:, :, None] * b_E
    b_dq = tl.sum(b_dAE * b_k[None, :, :], axis=1) + b_dq_state * tl.exp(b_g)
    b_dk = tl.sum(b_dAE * b_q[:, None, :], axis=0)
    b_kdecay = tl.exp(b_glast[None, :] - b_g)
    b_through_end = b_k * b_kdecay * b_dk_out  # k ⊙ (gradient through exp(b_last - b))
    # b-dependent terms only (chunked.py): A's diagonal and the last row's own write are left out
    m_last = o_t == BT - 1
    b_end = tl.sum(tl.where(m_last[:, None], 0, b_through_end), axis=0) + tl.exp(b_glast) * b_carried
    b_db = b_q * b_dq - b_k * b_dk - tl.where(m_last[:, None], 0, b_through_end)
    b_db += tl.where(m_last[:, None], b_end[None, :], 0)
    b_dq += b_dA_diag[:, None] * b_k
    b_dk += b_dk_out * b_kdecay + b_dA_diag[:, None] * b_q
    tl.store(dq + p_tk, b_dq, mask=m_k[None, :])
    tl.store(dk + p_tk, b_dk, mask=m_k[None, :])
    tl.store(db + p_tk, b_db, mask=m_k[None, :])


def _blocks(K: int, V: int) -> tuple[int, int]:
    """Feature tiles: powers of two in [16, 64] (tl.dot needs >= 16); masks cover K, V that are not multiples."""
    return min(64, max(16, triton.next_power_of_2(K))), min(64, max(16, triton.next_power_of_2(V)))


class _TritonGLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, b: Tensor, initial_state: Tensor | None, BT: int):
        # (BH, T, D) contiguous, T a multiple of BT; b = chunk-local cumsum of g
        BH, T, K = q.shape
        V, NT = v.shape[-1], T // BT
        BK, BV = _blocks(K, V)
        h = q.new_empty(BH, NT, K, V)
        ht = q.new_empty(BH, K, V)
        h0 = initial_state.reshape(BH, K, V).contiguous() if initial_state is not None else ht
        _fwd_h_kernel[(triton.cdiv(K, BK), triton.cdiv(V, BV), BH)](
            k, v, b, h0, h, ht, T, NT, K=K, V=V, BT=BT, BK=BK, BV=BV, USE_H0=initial_state is not None
        )
        o = torch.empty_like(v)
        _fwd_o_kernel[(triton.cdiv(V, BV), NT, BH)](q, k, v, b, h, o, T, NT, K=K, V=V, BT=BT, BK=BK, BV=BV)
        ctx.save_for_backward(q, k, v, b, h)
        ctx.BT, ctx.state_shape = BT, (initial_state.shape if initial_state is not None else None)
        return o, ht

    @staticmethod
    def backward(ctx, do: Tensor, dht: Tensor | None):
        q, k, v, b, h = ctx.saved_tensors
        BT = ctx.BT
        BH, T, K = q.shape
        V, NT = v.shape[-1], T // BT
        BK, BV = _blocks(K, V)
        do = do.contiguous()
        dh = q.new_empty(BH, NT, K, V)
        dh0 = q.new_empty(BH, K, V)
        use_dht = dht is not None
        dht = dht.contiguous() if use_dht else dh0
        _bwd_dh_kernel[(triton.cdiv(K, BK), triton.cdiv(V, BV), BH)](
            q, b, do, dht, dh, dh0, T, NT, K=K, V=V, BT=BT, BK=BK, BV=BV, USE_DHT=use_dht
        )
        dv = torch.empty_like(v)
        _bwd_dv_kernel[(triton.cdiv(V, BV), NT, BH)](q, k, b, do, dh, dv, T, NT, K=K, V=V, BT=BT, BK=BK, BV=BV)
        dq, dk, db = torch.empty_like(q), torch.empty_like(k), torch.empty_like(q)
        _bwd_dqk_kernel[(triton.cdiv(K, BK), NT, BH)](
            q, k, v, b, h, do, dh, dq, dk, db, T, NT, K=K, V=V, BT=BT, BK=BK, BV=BV
        )
        # db is the gradient of b; autograd turns it into dg through the chunk-local cumsum that made b
        dinitial = dh0.view(ctx.state_shape) if ctx.state_shape is not None else None
        return dq, dk, dv, db, dinitial, None


def gla_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float,
    initial_state: Tensor | None,
    chunk_size: int = 64,
    output_final_state: bool = True,
) -> tuple[Tensor, Tensor]:
    """q, k (B, T, H, K), g (B, T, H, K or 1), v (B, T, H, V), initial_state (B, H, K, V) or None -> (o, final state).

    Inputs are already in the accumulation dtype; the chunk is ``chunk_size`` (at least 16, at most the next power
    of two >= T; the result does not depend on it beyond rounding). ``output_final_state`` is accepted for the
    uniform backend signature; the state is always returned.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT = max(16, min(chunk_size, triton.next_power_of_2(T)))
    pad = (-T) % BT
    Tp = T + pad

    def to_rows(x: Tensor) -> Tensor:  # (B, T, H, D) -> (B*H, Tp, D), zero-padded at the front
        return F.pad(x, (0, 0, 0, 0, pad, 0)).transpose(1, 2).reshape(B * H, Tp, x.shape[-1]).contiguous()

    g = g.expand(B, T, H, K)  # a scalar gate broadcast over K; autograd sums its gradient back
    b = to_rows(g).view(B * H, Tp // BT, BT, K).cumsum(2).view(B * H, Tp, K)
    o, final = _TritonGLA.apply(to_rows(q * scale), to_rows(k), to_rows(v), b, initial_state, BT)
    o = o.view(B, H, Tp, V)[:, :, pad:].transpose(1, 2)
    return o, final.view(B, H, K, V)
