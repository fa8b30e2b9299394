"""Triton kernels for the selective scan core, forward and backward, in mamba_ssm's (batch, E, L) layout.

A program owns one batch element and a block of BE channels (all inside one B/C group, so B_t and C_t are vectors)
and walks the sequence with the (BE, N) state in registers (float32, float64 for float64 input):

    h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t,      y_t = h_t · C_t

The forward stores the state at the start of every chunk of CHUNK (= ``chunk_size``) steps, so the backward keeps
batch * E * N * L / CHUNK numbers. The backward walks the chunks in reverse:
it recomputes the chunk's states from that checkpoint into a scratch buffer (the program's own rows, no races), then
runs the adjoint recurrence backwards in time with g = dL/dh_t:

    g += dy_t C_t;   dC_t = sum_e dy_t h_t;   dB_t = sum_e g delta_t u_t;   du_t = delta_t sum_n g B_t
    ddelta_t = sum_n g (u_t B_t + A a_t h_{t-1});   dA += g delta_t a_t h_{t-1};   g <- a_t g    (a_t = exp(delta_t A))

dB and dC are per-block partial sums, added up over the blocks of a group in torch. ``import triton`` happens only in
this module; on this CPU-only machine the kernels are tested under ``TRITON_INTERPRET=1`` against the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _fwd_kernel(
    u,  # (batch, E, L)
    delta,  # (batch, E, L)
    A,  # (E, N)
    B,  # (batch, G, N, L)
    C,  # (batch, G, N, L)
    h0,  # (batch, E, N)
    y,  # (batch, E, L) out
    ht,  # (batch, E, N) out: last state
    hc,  # (batch, NC, E, N) out: state at the start of every chunk
    L,
    NC,
    E: tl.constexpr,
    N: tl.constexpr,
    G: tl.constexpr,
    BE: tl.constexpr,
    BN: tl.constexpr,
    CHUNK: tl.constexpr,
    DTYPE: tl.constexpr,
):
    i_e, i_b = tl.program_id(0), tl.program_id(1)
    o_e = i_e * BE + tl.arange(0, BE)
    o_n = tl.arange(0, BN)
    m_n = o_n < N
    m_en = m_n[None, :] & (o_e[:, None] < E)
    i_g = (i_e * BE) // (E // G)  # the block lies inside one group
    p_en = o_e[:, None] * N + o_n[None, :]  # (BE, BN) offsets into an (E, N) matrix
    # [BE, BN]
    b_A = tl.load(A + p_en, mask=m_en, other=0).to(DTYPE)
    b_h = tl.load(h0 + i_b * E * N + p_en, mask=m_en, other=0).to(DTYPE)
    p_ue = (i_b * E + o_e) * L  # (BE,) row starts in (batch, E, L)
    p_bn = ((i_b * G + i_g) * N + o_n) * L  # (BN,) row starts in (batch, G, N, L)
    for i_c in range(0, NC):
        tl.store(hc + (i_b * NC + i_c) * E * N + p_en, b_h, mask=m_en)
        for i_t in range(i_c * CHUNK, tl.minimum(i_c * CHUNK + CHUNK, L)):
            # [BE]
            b_dt = tl.load(delta + p_ue + i_t).to(DTYPE)
            b_u = tl.load(u + p_ue + i_t).to(DTYPE)
            # [BN]
            b_B = tl.load(B + p_bn + i_t, mask=m_n, other=0).to(DTYPE)
            b_C = tl.load(C + p_bn + i_t, mask=m_n, other=0).to(DTYPE)
            b_h = tl.exp(b_dt[:, None] * b_A) * b_h + (b_dt * b_u)[:, None] * b_B[None, :]
            tl.store(y + p_ue + i_t, tl.sum(b_h * b_C[None, :], axis=1))
    tl.store(ht + i_b * E * N + p_en, b_h, mask=m_en)


@triton.jit
def _bwd_kernel(
    u,
    delta,
    A,
    B,
    C,
    hc,  # (batch, NC, E, N) chunk-start states from the forward
    dy,  # (batch, E, L)
    dht,  # (batch, E, N) gradient of the last state
    hbuf,  # (batch, E, CHUNK + 1, N) scratch: states h_{start-1 .. start+CHUNK-1} of the current chunk
    du,  # (batch, E, L) out
    ddelta,  # (batch, E, L) out
    dA,  # (batch, E, N) out, summed over batch in torch
    dB,  # (batch, E // BE, N, L) out: partial sums over this block's channels
    dC,  # (batch, E // BE, N, L) out
    dh0,  # (batch, E, N) out
    L,
    NC,
    E: tl.constexpr,
    N: tl.constexpr,
    G: tl.constexpr,
    BE: tl.constexpr,
    BN: tl.constexpr,
    CHUNK: tl.constexpr,
    DTYPE: tl.constexpr,
):
    i_e, i_b = tl.program_id(0), tl.program_id(1)
    o_e = i_e * BE + tl.arange(0, BE)
    o_n = tl.arange(0, BN)
    m_n = o_n < N
    m_en = m_n[None, :] & (o_e[:, None] < E)
    i_g = (i_e * BE) // (E // G)
    p_en = o_e[:, None] * N + o_n[None, :]
    # [BE, BN]
    b_A = tl.load(A + p_en, mask=m_en, other=0).to(DTYPE)
    b_g = tl.load(dht + i_b * E * N + p_en, mask=m_en, other=0).to(DTYPE)
    b_dA = tl.zeros([BE, BN], dtype=DTYPE)
    p_ue = (i_b * E + o_e) * L
    p_bn = ((i_b * G + i_g) * N + o_n) * L
    p_part = ((i_b * (E // BE) + i_e) * N + o_n) * L  # (BN,) rows of this block's dB/dC partials
    p_buf = ((i_b * E + o_e[:, None]) * (CHUNK + 1)) * N + o_n[None, :]  # (BE, BN) slot 0 of the scratch rows
    for i_r in range(0, NC):
        i_c = NC - 1 - i_r
        start = i_c * CHUNK
        end = tl.minimum(start + CHUNK, L)
        # recompute the chunk's states from its checkpoint: slot s holds h_{start + s - 1}
        b_h = tl.load(hc + (i_b * NC + i_c) * E * N + p_en, mask=m_en, other=0).to(DTYPE)
        tl.store(hbuf + p_buf, b_h, mask=m_en)
        for i_t in range(start, end):
            b_dt = tl.load(delta + p_ue + i_t).to(DTYPE)
            b_u = tl.load(u + p_ue + i_t).to(DTYPE)
            b_B = tl.load(B + p_bn + i_t, mask=m_n, other=0).to(DTYPE)
            b_h = tl.exp(b_dt[:, None] * b_A) * b_h + (b_dt * b_u)[:, None] * b_B[None, :]
            tl.store(hbuf + p_buf + (i_t - start + 1) * N, b_h, mask=m_en)
        tl.debug_barrier()
        for i_s in range(0, end - start):
            i_t = end - 1 - i_s
            # [BE]
            b_dt = tl.load(delta + p_ue + i_t).to(DTYPE)
            b_u = tl.load(u + p_ue + i_t).to(DTYPE)
            b_dy = tl.load(dy + p_ue + i_t).to(DTYPE)
            # [BN]
            b_B = tl.load(B + p_bn + i_t, mask=m_n, other=0).to(DTYPE)
            b_C = tl.load(C + p_bn + i_t, mask=m_n, other=0).to(DTYPE)
            # [BE, BN]
            b_h = tl.load(hbuf + p_buf + (i_t - start + 1) * N, mask=m_en, other=0).to(DTYPE)
            b_hp = tl.load(hbuf + p_buf + (i_t - start) * N, mask=m_en, other=0).to(DTYPE)
            b_a = tl.exp(b_dt[:, None] * b_A)
            b_g += b_dy[:, None] * b_C[None, :]
            tl.store(dC + p_part + i_t, tl.sum(b_dy[:, None] * b_h, axis=0), mask=m_n)
            tl.store(dB + p_part + i_t, tl.sum(b_g * (b_dt * b_u)[:, None], axis=0), mask=m_n)
            tl.store(du + p_ue + i_t, b_dt * tl.sum(b_g * b_B[None, :], axis=1))
            b_gah = b_g * b_A * b_a * b_hp
            tl.store(ddelta + p_ue + i_t, tl.sum(b_g * (b_u[:, None] * b_B[None, :]) + b_gah, axis=1))
            b_dA += b_g * b_dt[:, None] * b_a * b_hp
            b_g = b_g * b_a
        tl.debug_barrier()
    tl.store(dA + i_b * E * N + p_en, b_dA, mask=m_en)
    tl.store(dh0 + i_b * E * N + p_en, b_g, mask=m_en)


def _block_e(E: int, G: int) -> int:
    """Channels per program: a power of two dividing E / G (so a block never straddles two groups), at most 32."""
    per_group = E // G
    be = 1
    while be < 32 and per_group % (2 * be) == 0:
        be *= 2
    return be


def _meta(u: Tensor, B: Tensor, N: int, chunk: int) -> dict:
    E = u.shape[1]
    G = B.shape[1]
    return dict(
        E=E,
        N=N,
        G=G,
        BE=_block_e(E, G),
        BN=triton.next_power_of_2(N),
        CHUNK=chunk,
        DTYPE=tl.float64 if u.dtype == torch.float64 else tl.float32,
    )


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor, chunk: int):
        batch, E, L = u.shape
        N = A.shape[1]
        meta = _meta(u, B, N, chunk)
        NC = triton.cdiv(L, chunk)
        y = torch.empty_like(u)
        ht = u.new_empty(batch, E, N)
        hc = u.new_empty(batch, NC, E, N)
        grid = (E // meta["BE"], batch)
        _fwd_kernel[grid](u, delta, A, B, C, h0, y, ht, hc, L, NC, **meta)
        ctx.save_for_backward(u, delta, A, B, C, hc)
        ctx.chunk = chunk
        return y, ht

    @staticmethod
    def backward(ctx, dy: Tensor, dht: Tensor):
        u, delta, A, B, C, hc = ctx.saved_tensors
        batch, E, L = u.shape
        N = A.shape[1]
        meta = _meta(u, B, N, ctx.chunk)
        NC = hc.shape[1]
        G, BE = meta["G"], meta["BE"]
        dy = dy.contiguous()
        dht = torch.zeros_like(hc[:, 0]) if dht is None else dht.contiguous()
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dA, dh0 = u.new_empty(batch, E, N), u.new_empty(batch, E, N)
        dB_part = u.new_zeros(batch, E // BE, N, L)
        dC_part = u.new_zeros(batch, E // BE, N, L)
        hbuf = u.new_empty(batch, E, ctx.chunk + 1, N)
        grid = (E // BE, batch)
        _bwd_kernel[grid](u, delta, A, B, C, hc, dy, dht, hbuf, du, ddelta, dA, dB_part, dC_part, dh0, L, NC, **meta)
        # blocks of one group are consecutive: sum their partials
        dB = dB_part.view(batch, G, -1, N, L).sum(2)
        dC = dC_part.view(batch, G, -1, N, L).sum(2)
        return du, ddelta, dA.sum(0), dB, dC, dh0, None


def selective_scan_triton(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, initial_state: Tensor | None, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """Same contract as the reference backend; ``chunk_size`` is the distance between the states saved for backward."""
    h0 = u.new_zeros(u.shape[0], u.shape[1], A.shape[1]) if initial_state is None else initial_state
    u, delta, A, B, C, h0 = (t.contiguous() for t in (u, delta, A, B, C, h0))
    return _SelectiveScanTriton.apply(u, delta, A, B, C, h0, chunk_size)
