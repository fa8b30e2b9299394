"""Triton kernels for (un-normalised) linear attention, forward and backward, in the (B, T, H, D) layout.

One kernel does every pass. A program owns one (batch, head) and one block of value columns and walks the sequence
chunk by chunk (chunk BT), keeping the K x BV state in registers (float32, float64 for float64 input):

    o_n = [ (q_n k_n^T) ⊙ tril ] v_n + q_n h        (INTRA adds the in-chunk term; STORE_O writes o)
    h  <- h + k_n^T v_n                              (UPDATE_STATE)

Causal forward is that with everything on. The backward reuses it (no other kernel to keep in sync):

    dq = causal pass over (do, v, k) from h0^T                          (dq_i = sum_{j<=i} (do_i . v_j) k_j + do_i h^T)
    dk = causal pass over (v, do, q) in reversed time from dh_T^T        (dk_j = sum_{i>=j} (v_j . do_i) q_i + v_j G^T)
    dv = causal pass over (k, q, do) in reversed time from dh_T;  its final state is dh_0

Non-causal uses the state-only pass (S = h0 + k^T v) and the output-only pass (o = q S), and their transposes for the
backward. ``REVERSE`` maps position p to T - 1 - p in every load and store, so no flipped copies are made; transposed
states are passed as strided views. ``import triton`` happens only in this module, so the package imports without
triton; on a machine without CUDA the kernels are tested under ``TRITON_INTERPRET=1`` against the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _linear_attn_kernel(
    q,  # (B, T, H, K) rows read as "queries" in this pass
    k,  # (B, T, H, K)
    v,  # (B, T, H, V)
    o,  # (B, T, H, V) output (STORE_O)
    h0,  # (B, H, K, V) initial state, any strides (USE_H0)
    ht,  # (B, H, K, V) final state, contiguous (STORE_HT)
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    stride_h0_b,
    stride_h0_h,
    stride_h0_k,
    stride_h0_v,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DTYPE: tl.constexpr,
    INTRA: tl.constexpr,
    UPDATE_STATE: tl.constexpr,
    STORE_O: tl.constexpr,
    USE_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    REVERSE: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    o_t = tl.arange(0, BT)

    b_h = tl.zeros([BK, BV], dtype=DTYPE)
    if USE_H0:
        p_h0 = h0 + i_b * stride_h0_b + i_h * stride_h0_h + o_k[:, None] * stride_h0_k + o_v[None, :] * stride_h0_v
        # [BK, BV]
        b_h += tl.load(p_h0, mask=m_k[:, None] & m_v[None, :], other=0).to(DTYPE)

    for i_t in range(0, tl.cdiv(T, BT)):
        pos = i_t * BT + o_t  # position in this pass's time order
        m_t = pos < T
        row = (T - 1 - pos) if REVERSE else pos  # position in memory
        base = (i_b * T + row) * H + i_h  # (B, T, H, .) row offsets
        if STORE_O:
            # [BT, BK]
            b_q = tl.load(q + base[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0).to(DTYPE)
            b_o = tl.dot(b_q, b_h.to(DTYPE), input_precision="ieee")  # [BT, BV]
        if INTRA or UPDATE_STATE:
            # [BT, BK]
            b_k = tl.load(k + base[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0).to(DTYPE)
            # [BT, BV]
            b_v = tl.load(v + base[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0).to(DTYPE)
        if INTRA:
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")  # [BT, BT]
            b_s = tl.where(o_t[:, None] >= o_t[None, :], b_s, 0)
            b_o += tl.dot(b_s, b_v, input_precision="ieee")
        if STORE_O:
            tl.store(o + base[:, None] * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
        if UPDATE_STATE:
            b_h += tl.dot(tl.trans(b_k), b_v, input_precision="ieee")  # [BK, BV]

    if STORE_HT:
        p_ht = ht + (i_bh * K + o_k[:, None]) * V + o_v[None, :]
        tl.store(p_ht, b_h.to(ht.dtype.element_ty), mask=m_k[:, None] & m_v[None, :])


def _pass(
    q: Tensor | None,
    k: Tensor | None,
    v: Tensor | None,
    h0: Tensor | None,
    *,
    intra: bool,
    update_state: bool,
    store_o: bool,
    store_ht: bool,
    reverse: bool = False,
    chunk_size: int = 64,
    T: int | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Launch one pass. q/k (B, T, H, K), v (B, T, H, V); h0 (B, H, K, V) with any strides. Returns (o, ht)."""
    ref = q if q is not None else k
    B, T_, H, K = ref.shape
    T = T_ if T is None else T
    V = v.shape[-1] if v is not None else h0.shape[-1]
    dtype = ref.dtype
    o = torch.empty(B, T, H, V, dtype=dtype, device=ref.device) if store_o else None
    ht = torch.empty(B, H, K, V, dtype=dtype, device=ref.device) if store_ht else None
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(64, triton.next_power_of_2(V)))
    BT = max(16, min(triton.next_power_of_2(chunk_size), 128))
    dummy = ref  # never read when its flag is off
    h0_strides = h0.stride() if h0 is not None else (0, 0, 0, 0)
    grid = (triton.cdiv(V, BV), B * H)
    _linear_attn_kernel[grid](
        q if q is not None else dummy,
        k if k is not None else dummy,
        v if v is not None else dummy,
        o if o is not None else dummy,
        h0 if h0 is not None else dummy,
        ht if ht is not None else dummy,
        T,
        H,
        K,
        V,
        *h0_strides,
        BT=BT,
        BK=BK,
        BV=BV,
        DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
        INTRA=intra,
        UPDATE_STATE=update_state,
        STORE_O=store_o,
        USE_H0=h0 is not None,
        STORE_HT=store_ht,
        REVERSE=reverse,
    )
    return o, ht


def _causal(q, k, v, h0, chunk_size, reverse=False):
    return _pass(
        q, k, v, h0, intra=True, update_state=True, store_o=True, store_ht=True, reverse=reverse, chunk_size=chunk_size
    )


def _state(k, v, h0, chunk_size):
    """h0 + k^T v over the whole sequence."""
    return _pass(None, k, v, h0, intra=False, update_state=True, store_o=False, store_ht=True, chunk_size=chunk_size)[1]


def _apply_state(q, h, chunk_size):
    """q h for every position."""
    return _pass(
        q, None, None, h, intra=False, update_state=False, store_o=True, store_ht=False, chunk_size=chunk_size
    )[0]


class _LinearAttnTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, initial_state, causal: bool, chunk_size: int):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if causal:
            o, final = _causal(q, k, v, initial_state, chunk_size)
        else:
            final = _state(k, v, initial_state, chunk_size)
            o = _apply_state(q, final, chunk_size)
        ctx.save_for_backward(q, k, v, initial_state, None if causal else final)
        ctx.causal, ctx.chunk_size = causal, chunk_size
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, initial_state, final = ctx.saved_tensors
        C = ctx.chunk_size
        do = do.contiguous()
        if ctx.causal:
            h0_t = None if initial_state is None else initial_state.transpose(-1, -2)
            dq, _ = _causal(do, v, k, h0_t, C)
            dfinal_t = None if dfinal is None else dfinal.transpose(-1, -2)
            dk, _ = _causal(v, do, q, dfinal_t, C, reverse=True)
            dv, dinitial = _causal(k, q, do, dfinal, C, reverse=True)
        else:
            dinitial = _state(q, do, dfinal, C)  # dS = dfinal + q^T do
            dq = _apply_state(do, final.transpose(-1, -2), C)
            dk = _apply_state(v, dinitial.transpose(-1, -2), C)
            dv = _apply_state(k, dinitial, C)
        if initial_state is None or not ctx.needs_input_grad[3]:
            dinitial = None
        return dq, dk, dv, dinitial, None, None


def linear_attn_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    initial_state: Tensor | None,
    chunk_size: int = 64,
    output_final_state: bool = True,
) -> tuple[Tensor, Tensor]:
    """q (B, T, H, K), k (B, S, H, K), v (B, S, H, V), initial_state (B, H, K, V) or None -> (o, final state).

    ``output_final_state`` is accepted for the uniform backend signature; the state is always returned."""
    return _LinearAttnTriton.apply(q, k, v, initial_state, causal, chunk_size)
