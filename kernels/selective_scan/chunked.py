"""Chunked selective scan in torch: the CPU path.

Per channel e and state n the scan is a GLA recurrence with d_k = N, d_v = 1 (specs/attention.md §6). With the
within-chunk cumulative step size D_t = sum_{r<=t} delta_r (chunk-local) and the log-decay b_t = A[e, n] * D_t,

    h_t = exp(b_t) h_0 + sum_{s<=t} exp(b_t - b_s) x_s,      x_s = delta_s u_s B_s,      y_t = h_t · C_t.

d_v = 1 makes the pairwise (attention-like) form wasteful: it costs C·N per token against N for the recurrence. So the
fast path factors the decay around a per-channel pivot p (the middle of the chunk's range of D):

    exp(b_t - b_s) = exp(A (D_t - p)) · exp(-A (D_s - p)),
    h_t = exp(A (D_t - p)) · [exp(A p) h_0 + cumsum_{s<=t} exp(-A (D_s - p)) x_s]

which is one cumulative sum per chunk (O(C·N) per channel, no exponent difference materialised). It is exact, and
every exponent is bounded by |A|max · span(D) / 2; the path is used only where that bound is <= ``FACTOR_LIMIT``
(60 in float32: exp(±60) and their products stay normal numbers, and the relative error of exp is ~60 eps). With
mamba's initialisation (delta <= 0.1, |A| <= 16) every chunk of 64 qualifies. Channels whose chunk fails the bound
(large steps) go through the always-stable pairwise form instead: exponents A (D_t - D_s) are formed for s <= t only,
the rest masked to -inf before exp (spec "Parallel forms"), in sub-chunks of ``PAIRWISE_CHUNK`` to bound memory. Both
give the same numbers (tested); the Python loop runs over chunks, never over time steps.

Backward: autograd through the chunk loop. The graph keeps O(batch · L · E · N) numbers (a few per state entry, like
the sequential reference's precomputed decays), not the O(L · C · E · N) a materialised pairwise form would need.
"""

from __future__ import annotations

import torch
from torch import Tensor

# largest |exponent| the factored form may meet, per accumulation dtype (see the module docstring)
FACTOR_LIMIT = {torch.float32: 60.0, torch.float64: 300.0}
PAIRWISE_CHUNK = 16


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
    # time-major layout: a chunk is a contiguous slab, and y_t = H_t C_t is one batched matmul over (batch, t, group)
    dlt = delta.transpose(1, 2).reshape(batch, L, G, Eg)
    du = (delta * u).transpose(1, 2).reshape(batch, L, G, Eg)
    Bt = B.permute(0, 3, 1, 2).contiguous()[:, :, :, None, :]  # (batch, L, G, 1, N)
    Ct = C.permute(0, 3, 1, 2).contiguous()[..., None]  # (batch, L, G, N, 1)
    Ag = A.view(G, Eg, N)
    A_max = A.abs().amax(-1).view(G, Eg)  # bounds every exponent of a channel
    h = u.new_zeros(batch, G, Eg, N) if initial_state is None else initial_state.view(batch, G, Eg, N)
    ys = []
    for c0 in range(0, L, chunk_size):
        t = slice(c0, min(c0 + chunk_size, L))
        y, h = _chunk(dlt[:, t], du[:, t], Bt[:, t], Ct[:, t], Ag, A_max, h, limit)
        ys.append(y)
    y = torch.cat(ys, dim=1).reshape(batch, L, E).transpose(1, 2)
    return y, h.reshape(batch, E, N)


def _chunk(
    dlt: Tensor, du: Tensor, Bt: Tensor, Ct: Tensor, Ag: Tensor, A_max: Tensor, h: Tensor, limit: float
) -> tuple[Tensor, Tensor]:
    """One chunk: dlt, du (batch, Lc, G, Eg); Bt (batch, Lc, G, 1, N); Ct (batch, Lc, G, N, 1); h (batch, G, Eg, N)."""
    Dc = dlt.cumsum(1)  # (batch, Lc, G, Eg) chunk-local cumulative step
    hi, lo = Dc.amax(1).clamp(min=0), Dc.amin(1).clamp(max=0)  # the range of D, including D = 0 before the chunk
    pivot = (hi + lo) / 2  # (batch, G, Eg): halves the largest exponent
    unsafe = A_max * (hi - lo) / 2 > limit  # (batch, G, Eg)
    any_unsafe = bool(unsafe.any())
    rel = Dc - pivot[:, None]
    if any_unsafe:  # neutral values there (exp(0) = 1) so no inf reaches the graph; overwritten below
        rel = rel.masked_fill(unsafe[:, None], 0)
        pivot = pivot.masked_fill(unsafe, 0)
    arg = rel[..., None] * Ag  # (batch, Lc, G, Eg, N)
    w = (du[..., None] * Bt) * torch.exp(-arg)  # x_s exp(-A (D_s - p))
    w[:, 0] += torch.exp(pivot[..., None] * Ag) * h  # carried state, rebased to the pivot
    # cumulative sum over the chunk as one GEMM with a lower-triangular ones matrix (torch's cumsum along a
    # non-last dim is several times slower than this on CPU)
    Lc = w.shape[1]
    tril = torch.ones(Lc, Lc, dtype=w.dtype, device=w.device).tril()
    S = (tril @ w.reshape(w.shape[0], Lc, -1)).view(w.shape)
    H = torch.exp(arg) * S  # (batch, Lc, G, Eg, N): the state after every step
    y = (H @ Ct).squeeze(-1)  # (batch, Lc, G, Eg)
    h_end = H[:, -1]
    if any_unsafe:
        idx = unsafe.nonzero(as_tuple=True)  # (batch, group, channel) triples that need the stable form
        y_rows, h_rows = _pairwise_rows(dlt, du, Bt, Ct, Ag, h, idx)
        y = y.permute(0, 2, 3, 1).index_put(idx, y_rows).permute(0, 3, 1, 2)
        h_end = h_end.index_put(idx, h_rows)
    return y, h_end


def _pairwise_rows(
    dlt: Tensor, du: Tensor, Bt: Tensor, Ct: Tensor, Ag: Tensor, h: Tensor, idx: tuple[Tensor, Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """Stable pairwise form for the selected channels: y (rows, Lc) and last state (rows, N)."""
    bi, gi, ei = idx
    dlt, du = dlt[bi, :, gi, ei], du[bi, :, gi, ei]  # (rows, Lc)
    Br, Cr = Bt[bi, :, gi, 0], Ct[bi, :, gi, :, 0]  # (rows, Lc, N)
    Ar, hr = Ag[gi, ei], h[bi, gi, ei]  # (rows, N)
    ys = []
    for c0 in range(0, dlt.shape[1], PAIRWISE_CHUNK):
        t = slice(c0, min(c0 + PAIRWISE_CHUNK, dlt.shape[1]))
        Dc = dlt[:, t].cumsum(1)  # (rows, n)
        n = Dc.shape[1]
        future = ~torch.ones(n, n, dtype=torch.bool, device=Dc.device).tril()  # s > t
        expo = (Dc[:, :, None] - Dc[:, None, :])[..., None] * Ar[:, None, None]  # (rows, t, s, N)
        # mask before exp: A (D_t - D_s) for s > t may be huge, and inf * 0 would poison the backward
        decay = torch.exp(expo.masked_fill(future[..., None], float("-inf")))
        x = du[:, t, None] * Br[:, t]  # (rows, s, N)
        H = (decay * x[:, None]).sum(2) + torch.exp(Dc[..., None] * Ar[:, None]) * hr[:, None]  # (rows, t, N)
        ys.append((H * Cr[:, t]).sum(-1))
        hr = H[:, -1]
    return torch.cat(ys, dim=1), hr
