"""Chunked selective scan in torch: the CPU path.

Per channel e and state n the scan is a GLA recurrence with d_k = N, d_v = 1 (specs/attention.md §6). Split the
sequence into chunks of C steps; with the chunk-local cumulative step D_t = sum_{r<=t} delta_r and h_0 the state
before the chunk,

    h_t = exp(A D_t) h_0 + sum_{s<=t} exp(A (D_t - D_s)) x_s,      x_s = delta_s u_s B_s,      y_t = h_t · C_t.

d_v = 1 makes the pairwise (attention-like) form wasteful: it costs C·N per token against N for the recurrence. So the
fast path factors the decay around a per-channel pivot p (the middle of the chunk's range of D):

    exp(A (D_t - D_s)) = exp(A (D_t - p)) · exp(-A (D_s - p)),
    h_t = exp(A (D_t - p)) · [exp(A p) h_0 + sum_{s<=t} exp(-A (D_s - p)) x_s]

and the sum over s <= t is one GEMM with a lower-triangular ones matrix per chunk (O(C·N) per channel and token, no
exponent difference materialised). It is exact, and every exponent is bounded by |A|max · span(D) / 2; the path is
used only where that bound is <= ``FACTOR_LIMIT`` (60 in float32: exp(±60) and their products stay normal numbers,
and exp's relative error is ~60 eps). With mamba's initialisation (delta <= 0.1, |A| <= 16) chunks of 64 qualify.
Channel-chunks that fail the bound (large steps) use the always-stable pairwise form instead: exponents
A (D_t - D_s) are formed for s <= t only, the rest masked to -inf before exp (spec "Parallel forms"), in sub-chunks
of ``PAIRWISE_CHUNK`` steps to bound memory. Both give the same numbers (tested).

All chunks of a segment (``SEGMENT`` steps) are computed at once with a handful of large ops, chunk-local states
assuming h_0 = 0; then the states at the chunk starts follow from a short loop over chunks on (batch, E, N) tensors,
h_{k+1} = exp(A D_end,k) h_k + local_end,k, and one more pass adds each chunk's exp(A D_t) h_k term. Few large ops
(instead of a dozen per chunk) keep thread synchronisation rare, which matters on a loaded multi-core CPU. The Python
loops run over segments and chunks, never over time steps.

Backward: autograd through these ops; the graph holds a few numbers per (position, channel, state), O(batch·L·E·N)
like the sequential reference's precomputed decays, never the O(L·C·E·N) a materialised pairwise form would need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# largest |exponent| the factored form may meet, per accumulation dtype (see the module docstring)
FACTOR_LIMIT = {torch.float32: 60.0, torch.float64: 300.0}
PAIRWISE_CHUNK = 16
SEGMENT = 512  # steps computed at once: bounds the intermediates (measured best among 128..2048, 1 thread)


def selective_scan_chunked(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    initial_state: Tensor | None,
    chunk_size: int,
    factor_limit: float | None = None,
) -> tuple[Tensor, Tensor]:
    """u, delta (batch, E, L); A (E, N); B, C (batch, G, N, L) with G | E; initial_state (batch, E, N) or None.

    Returns y (batch, E, L) and the last state (batch, E, N). ``factor_limit`` overrides ``FACTOR_LIMIT`` (tests use
    0 to force the pairwise path everywhere).
    """
    batch, E, L = u.shape
    G, N = B.shape[1], B.shape[2]
    Eg = E // G  # channels per B/C group
    limit = FACTOR_LIMIT.get(u.dtype, 60.0) if factor_limit is None else factor_limit
    # time-major layout: y_t = H_t C_t is one batched matmul over (batch, t, group)
    dlt = delta.transpose(1, 2).reshape(batch, L, G, Eg)
    du = (delta * u).transpose(1, 2).reshape(batch, L, G, Eg)
    Bt = B.permute(0, 3, 1, 2).contiguous()  # (batch, L, G, N)
    Ct = C.permute(0, 3, 1, 2).contiguous()
    Ag = A.view(G, Eg, N)
    A_max = A.abs().amax(-1).view(G, Eg)  # bounds every exponent of a channel
    h = u.new_zeros(batch, G, Eg, N) if initial_state is None else initial_state.view(batch, G, Eg, N)
    segment = max(chunk_size, SEGMENT // chunk_size * chunk_size)
    ys = []
    for s0 in range(0, L, segment):
        t = slice(s0, min(s0 + segment, L))
        y, h = _segment(dlt[:, t], du[:, t], Bt[:, t], Ct[:, t], Ag, A_max, h, limit, chunk_size)
        ys.append(y)
    y = torch.cat(ys, dim=1).reshape(batch, L, E).transpose(1, 2)
    return y, h.reshape(batch, E, N)


def _segment(
    dlt: Tensor,
    du: Tensor,
    Bt: Tensor,
    Ct: Tensor,
    Ag: Tensor,
    A_max: Tensor,
    h: Tensor,
    limit: float,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """dlt, du (batch, T, G, Eg); Bt, Ct (batch, T, G, N); h (batch, G, Eg, N) -> y (batch, T, G, Eg), last state."""
    batch, T, G, Eg = dlt.shape
    N = Ag.shape[-1]
    Lc = min(chunk_size, T)
    pad = (-T) % Lc  # padded steps have delta = 0: no decay, no write
    if pad:
        dlt, du = F.pad(dlt, (0, 0, 0, 0, 0, pad)), F.pad(du, (0, 0, 0, 0, 0, pad))
        Bt, Ct = F.pad(Bt, (0, 0, 0, 0, 0, pad)), F.pad(Ct, (0, 0, 0, 0, 0, pad))
    nC = (T + pad) // Lc
    dlt, du = dlt.view(batch, nC, Lc, G, Eg), du.view(batch, nC, Lc, G, Eg)
    Bt, Ct = Bt.view(batch, nC, Lc, G, 1, N), Ct.view(batch, nC, Lc, G, N, 1)

    Dc = dlt.cumsum(2)  # (batch, nC, Lc, G, Eg) chunk-local cumulative step
    hi, lo = Dc.amax(2).clamp(min=0), Dc.amin(2).clamp(max=0)  # the range of D, including D = 0 before the chunk
    pivot = (hi + lo) / 2  # (batch, nC, G, Eg): halves the largest exponent
    unsafe = A_max * (hi - lo) / 2 > limit
    any_unsafe = bool(unsafe.any())
    rel = Dc - pivot[:, :, None]
    if any_unsafe:  # neutral values there (exp(0) = 1) so no inf reaches the graph; replaced below
        rel = rel.masked_fill(unsafe[:, :, None], 0)
        pivot = pivot.masked_fill(unsafe, 0)
    arg = rel[..., None] * Ag  # (batch, nC, Lc, G, Eg, N)
    w = (du[..., None] * Bt) * torch.exp(-arg)  # x_s exp(-A (D_s - p))
    tril = torch.ones(Lc, Lc, dtype=w.dtype, device=w.device).tril()
    # cumulative sum over each chunk as one GEMM (torch's cumsum along a non-last dim is several times slower)
    S = (tril @ w.reshape(batch, nC, Lc, -1)).view(w.shape)
    P = torch.exp(arg)
    local_end = P[:, :, -1] * S[:, :, -1]  # (batch, nC, G, Eg, N): chunk-end state if the chunk started at 0
    decay = torch.exp(Dc[:, :, -1, ..., None] * Ag)  # (batch, nC, G, Eg, N): the whole chunk's decay
    if any_unsafe:
        idx = unsafe.nonzero(as_tuple=True)  # (batch, chunk, group, channel) tuples that need the stable form
        rows = _Rows(idx, dlt, du, Bt, Ct, Ag)
        local_end = local_end.index_put(idx, rows.local[:, -1])

    starts = []
    for k in range(nC):  # state at every chunk start: a short loop on (batch, G, Eg, N) tensors
        starts.append(h)
        h = decay[:, k] * h + local_end[:, k]
    h0 = torch.stack(starts, dim=1)  # (batch, nC, G, Eg, N)

    S = S + (torch.exp(pivot[..., None] * Ag) * h0)[:, :, None]  # add exp(A p) h_0 inside the bracket
    y = ((P * S) @ Ct).squeeze(-1)  # (batch, nC, Lc, G, Eg)
    if any_unsafe:
        y = y.permute(0, 1, 3, 4, 2).index_put(idx, rows.outputs(h0[idx])).permute(0, 1, 4, 2, 3)
    return y.reshape(batch, nC * Lc, G, Eg)[:, :T], h


class _Rows:
    """The stable pairwise form for selected (batch, chunk, group, channel) rows."""

    def __init__(self, idx: tuple[Tensor, ...], dlt: Tensor, du: Tensor, Bt: Tensor, Ct: Tensor, Ag: Tensor) -> None:
        bi, ki, gi, ei = idx
        dlt, du = dlt[bi, ki, :, gi, ei], du[bi, ki, :, gi, ei]  # (rows, Lc)
        self.B, self.C = Bt[bi, ki, :, gi, 0], Ct[bi, ki, :, gi, :, 0]  # (rows, Lc, N)
        self.A = Ag[gi, ei]  # (rows, N)
        self.Dc = dlt.cumsum(1)  # (rows, Lc)
        hs, h = [], torch.zeros_like(self.A)
        for c0 in range(0, dlt.shape[1], PAIRWISE_CHUNK):
            t = slice(c0, min(c0 + PAIRWISE_CHUNK, dlt.shape[1]))
            Dc = dlt[:, t].cumsum(1)  # (rows, n)
            n = Dc.shape[1]
            future = ~torch.ones(n, n, dtype=torch.bool, device=Dc.device).tril()  # s > t
            expo = (Dc[:, :, None] - Dc[:, None, :])[..., None] * self.A[:, None, None]  # (rows, t, s, N)
            # mask before exp: A (D_t - D_s) for s > t may be huge, and inf * 0 would poison the backward
            decay = torch.exp(expo.masked_fill(future[..., None], float("-inf")))
            x = du[:, t, None] * self.B[:, t]  # (rows, s, N)
            H = (decay * x[:, None]).sum(2) + torch.exp(Dc[..., None] * self.A[:, None]) * h[:, None]  # (rows, t, N)
            hs.append(H)
            h = H[:, -1]
        self.local = torch.cat(hs, dim=1)  # (rows, Lc, N): states if the chunk started from 0

    def outputs(self, h0: Tensor) -> Tensor:
        """y (rows, Lc) given each row's state h0 (rows, N) at the chunk start."""
        H = self.local + torch.exp(self.Dc[..., None] * self.A[:, None]) * h0[:, None]
        return (H * self.C).sum(-1)
