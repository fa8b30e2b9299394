"""Chunked selective scan in torch: the CPU path, with a hand-written backward.

Per channel e and state n the scan is a diagonal linear recurrence (a GLA recurrence with d_k = N, d_v = 1):

    h_t = a_t h_{t-1} + x_t,     a_t = exp(delta_t A),     x_t = delta_t u_t B_t,     y_t = h_t · C_t.

Chunked form. Split the sequence into chunks of C steps; with the chunk-local cumulative step D_t = sum_{r<=t} delta_r,
h_0 the state before the chunk and a per-channel pivot p (the middle of the chunk's range of D),

    h_t = exp(A (D_t - p)) · [exp(A p) h_0 + sum_{s<=t} exp(-A (D_s - p)) x_s]  =  (S_t + exp(A p) h_0) / W_t,

with W_t = exp(-A (D_t - p)) and S the cumulative sum of W x over the chunk. d_v = 1 makes the pairwise
(attention-like) form wasteful (C·N per token against N for the recurrence), so this factored form is the fast path.
It is exact, and every exponent is bounded by |A|max · span(D) / 2; it is used where that bound is <=
``FACTOR_LIMIT`` (60 in float32: exp(±60) and their products stay normal numbers, exp's relative error is ~60 eps).
With mamba's initialisation (delta <= 0.1, |A| <= 16) chunks of 64 qualify.

Large steps. (batch, chunk, channel) rows that fail the bound take a form that only forms the per-step decays
a_t = exp(A delta_t) <= 1, stable at any step size (both give the same numbers, tested):
- a few failing rows (at most ``STEPWISE_SHARE`` of a segment's) are gathered and scanned by recursive doubling
  (``_doubling_scan``, log2 C rounds);
- past that, the whole segment takes the stepwise form: h_t = a_t h_{t-1} + x_t inside every chunk at once, one
  multiply-add (addcmul_) per position in the chunk (a loop as long as the chunk, over all of the segment's chunks),
  giving each chunk's end state from 0; then the chunk starts as below, and the same pass again from each chunk's
  start state (two cheap passes cost less than forming exp(A D_t) for the inflow). Trained Mamba layers need it: a
  mamba MQAR run at lr 2e-2 reaches mean steps of 5-14 with |A| up to 25, where a third of the rows fail the bound
  even in 2-step chunks.
The pairwise form (spec "Parallel forms") is stable too but costs C^2 N exponentials per row, and exp of arguments
below float32's range is 10-25x slower than in it (``kernels/numerics.py``). The states at chunk starts follow from a
short loop over chunks on (batch, E, N) tensors, h_{k+1} = exp(A D_end,k) h_k + local_end,k. Python loops run over
segments, chunks and positions within a chunk, never over the sequence's time steps.

Backward. With g_t = dL/dh_t (all paths), the adjoint is the same recurrence run backwards in time,

    g_t = C_t dy_t + a_{t+1} g_{t+1},

and it factors with the *same* W: g_t = W_t · [sum_{s>=t} x'_s / W_s + exp(A (D_end - p)) c],  x'_s = dy_s C_s, where
c = a_{next} g_{next} is the gradient entering the chunk from its end. Then, with m_t = g_t ⊙ (h_t - x_t) (= g_t ⊙
a_t h_{t-1}):

    dC_t = sum_e dy_t[e] h_t[e],   d(delta u)_t = g_t · B_t,   dB_t = sum_e (delta u)_t[e] g_t[e],
    d delta_t = sum_n A m_t  (+ d(delta u)_t u_t),   dA = sum_t delta_t m_t,   dh_0 = a_first g_first.

The stepwise form runs the adjoint recurrence itself inside each chunk (from 0 for the carries, then again with the
carry entering at the chunk's end) and forms m_t from h_{t-1} (with large steps h_t ≈ x_t, and h_t - x_t would
cancel).

Memory and speed. The sequence is processed in segments sized so that a segment's (batch, steps, E, N) tensors stay in
the CPU cache (``SEGMENT_ELEMENTS``), with in-place ops; the forward keeps only the inputs and the state at every
segment start, and the backward recomputes the states of one segment at a time. Memory is O(batch·L·(E + N)) plus one
segment, never O(batch·L·E·N) as an autograd graph of the same ops would hold.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnzoo.kernels.numerics import exp_

# largest |exponent| the factored form may meet, per accumulation dtype (see the module docstring)
FACTOR_LIMIT = {torch.float32: 60.0, torch.float64: 300.0}
CACHE_CHUNK_MIN = 8  # shortest chunk _cache_chunk goes down to
# (batch x steps x E x N) numbers per segment: a few tensors of this size stay in the L2/L3 cache
# (measured best among 2^18 .. 2^22 at batch 1 and 64, 1 and 2 threads)
SEGMENT_ELEMENTS = 2**20
SAFE_CHUNK_MIN = 4  # smallest chunk _safe_chunk goes down to (measured: 4 beats 8 and 2 with trained steps)
UNSAFE_SHARE = 0.01  # share of rows failing the factored bound above which _safe_chunk halves the chunk
# share of a segment's rows failing the bound above which the whole segment takes the stepwise form (measured, see
# _Layout._factors)
STEPWISE_SHARE = 0.03


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
    0 to send every row through the doubling scan).
    """
    limit = FACTOR_LIMIT.get(u.dtype, 60.0) if factor_limit is None else factor_limit
    h0 = u.new_zeros(u.shape[0], u.shape[1], A.shape[1]) if initial_state is None else initial_state
    chunk = _safe_chunk(delta, A, _cache_chunk(chunk_size, u.shape[0] * u.shape[1] * A.shape[1]), limit)
    return _SelectiveScan.apply(u, delta, A, B, C, h0, chunk, limit)


def _cache_chunk(chunk_size: int, per_step: int) -> int:
    """``chunk_size``, halved (down to ``CACHE_CHUNK_MIN``) until one chunk of (batch, E, N) states fits a segment.

    A segment holds whole chunks; when one chunk alone outgrows ``SEGMENT_ELEMENTS`` (large batch x E x N), every pass
    streams from memory instead of the cache. Measured at batch 64, E = 128, N = 16, L = 128 (1 thread, fwd+bwd):
    0.35 s at chunk 32, 0.24 s at chunk 8, the most that fits.
    """
    chunk = chunk_size
    while chunk > CACHE_CHUNK_MIN and chunk * per_step > SEGMENT_ELEMENTS:
        chunk //= 2
    return chunk


def _safe_chunk(delta: Tensor, A: Tensor, chunk_size: int, limit: float) -> int:
    """The chunk to use: ``chunk_size``, halved (down to ``SAFE_CHUNK_MIN``) while more than ``UNSAFE_SHARE`` of the
    (batch, chunk, channel) rows would fail the factored form's bound and be gathered for the doubling scan.

    The factored form costs about the same per step at any chunk length (only the short loop over chunks grows), while
    a gathered row costs several times a factored one. Trained Mamba layers grow their steps (delta ~ 1 on some
    channels, against <= 0.1 at initialisation), and then most rows of a 32-step chunk fail the bound; halving the
    chunk halves every span. Measured (batch 64, E = 128, N = 16, L = 128, delta = softplus(1.5 z + 0.3), mean 1.1,
    1 thread, fwd+bwd): 0.57 s at chunk 8 (a quarter of the rows gathered), 0.30 s at chunk 4, 0.32 s at chunk 2.
    If more than ``STEPWISE_SHARE`` of the rows still fail at ``SAFE_CHUNK_MIN``, the segments take the stepwise
    form, whose cost does not fall with the chunk, and the requested chunk is kept. The bound used here,
    |A|max sum |delta| / 2 over the chunk, is at least the one ``_Layout`` checks, so rows it calls safe are safe.
    One pass over delta (batch, E, L), no N factor. Under ``torch.compile`` the chunk is kept (the share is read from
    the data, a host sync that cannot be traced), and ``_Layout._factors`` takes the stepwise form, exact at any step.
    """
    if limit <= 0 or chunk_size <= SAFE_CHUNK_MIN or torch.compiler.is_compiling():
        return chunk_size
    L = delta.shape[-1]
    weight = A.abs().amax(-1).to(delta.dtype)[:, None] / 2  # (E, 1)
    steps = delta.detach().abs()
    chunk = chunk_size
    while True:
        padded = F.pad(steps, (0, (-L) % chunk)).unflatten(-1, (-1, chunk)).sum(-1)  # (batch, E, L / chunk)
        share = (padded * weight > limit).float().mean().item()
        if share <= UNSAFE_SHARE:
            return chunk
        if chunk <= SAFE_CHUNK_MIN:  # many rows still fail: the segments take the stepwise form at the full chunk
            return chunk_size if share > STEPWISE_SHARE else chunk
        chunk //= 2


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, chunk_size: int, limit: float):
        scan = _Layout(u, delta, A, B, C, chunk_size, limit)
        ys, starts, h = [], [], h0.view(scan.h_shape)
        for t in scan.segments():
            starts.append(h)
            H, h, _ = scan.states(t, h)
            T = t.stop - t.start
            H = H.view(scan.batch, -1, scan.G, scan.Eg, scan.N)[:, :T]  # drop the padding
            ys.append(H.mul_(scan.Ct[:, t, :, None]).sum(-1))  # y_t = H_t C_t: (batch, T, G, Eg)
        ctx.save_for_backward(u, delta, A, B, C, *starts)
        ctx.chunk_size, ctx.limit = chunk_size, limit
        return scan.output(torch.cat(ys, dim=1)), h.reshape(h0.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor | None, dlast: Tensor | None):
        u, delta, A, B, C, *starts = ctx.saved_tensors
        scan = _Layout(u, delta, A, B, C, ctx.chunk_size, ctx.limit)
        dyt = scan.time_major(dy if dy is not None else torch.zeros_like(u))
        grads = {name: [] for name in ("du", "dB", "dC", "ddelta")}
        dA = torch.zeros_like(scan.Ag)
        # dL/dh at the last step of each segment from the steps after it (for the last segment: d last_state)
        carry = torch.zeros(scan.h_shape, dtype=u.dtype, device=u.device) if dlast is None else dlast
        carry = carry.reshape(scan.h_shape)
        for t, h in reversed(list(zip(scan.segments(), starts))):
            seg = scan.backward_segment(t, h, dyt[:, t], carry)
            carry = seg.pop("carry")  # a_first g_first: what the segment before receives; after the first, dh_0
            for name, value in seg.items():
                if name == "dA":
                    dA += value
                else:
                    grads[name].insert(0, value)
        ddu, dBt, dCt, ddlt = (torch.cat(grads[name], dim=1) for name in ("du", "dB", "dC", "ddelta"))
        du_full, ddlt = scan.output(ddu), scan.output(ddlt)
        d_u = du_full * delta  # x = delta u B: the write's scale is delta * u
        d_delta = ddlt + du_full * u
        dB, dC = (M.permute(0, 2, 3, 1) for M in (dBt, dCt))  # (batch, L, G, N) -> (batch, G, N, L)
        return d_u, d_delta, dA.view(A.shape), dB, dC, carry.reshape(u.shape[0], u.shape[1], -1), None, None


class _Layout:
    """Time-major views of one scan's inputs and the per-segment computations."""

    def __init__(self, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, limit: float):
        self.batch, self.E, self.L = u.shape
        self.G, self.N = B.shape[1], B.shape[2]
        self.Eg = self.E // self.G  # channels per B/C group
        self.limit = limit
        self.dlt = self.time_major(delta)  # (batch, L, G, Eg)
        self.du = self.time_major(delta * u)
        self.Bt = B.permute(0, 3, 1, 2).contiguous()  # (batch, L, G, N)
        self.Ct = C.permute(0, 3, 1, 2).contiguous()
        self.Ag = A.reshape(self.G, self.Eg, self.N)
        self.A_max = A.abs().amax(-1).view(self.G, self.Eg)  # bounds every exponent of a channel
        self.h_shape = (self.batch, self.G, self.Eg, self.N)
        per_step = self.batch * self.E * self.N
        self.chunk = max(1, min(chunk_size, self.L))
        self.segment = max(self.chunk, SEGMENT_ELEMENTS // (per_step * self.chunk) * self.chunk)
        self._buffers: dict[str, Tensor] = {}

    def buffer(self, name: str, like: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
        """Workspace with ``like``'s dtype and shape (or ``shape``), reused by every segment: fresh multi-MB tensors
        cost page faults on the CPU (about 1 ms per 4 MB here), more than the arithmetic done in them."""
        shape = tuple(like.shape) if shape is None else shape
        numel = math.prod(shape)
        flat = self._buffers.get(name)
        if flat is None or flat.numel() < numel:
            flat = self._buffers[name] = like.new_empty(numel)
        return flat[:numel].view(shape)

    def time_major(self, x: Tensor) -> Tensor:
        """(batch, E, L) -> (batch, L, G, Eg)."""
        return x.transpose(1, 2).reshape(self.batch, self.L, self.G, self.Eg)

    def output(self, x: Tensor) -> Tensor:
        """(batch, L, G, Eg) -> (batch, E, L)."""
        return x.reshape(self.batch, self.L, self.E).transpose(1, 2)

    def segments(self) -> list[slice]:
        return [slice(s, min(s + self.segment, self.L)) for s in range(0, self.L, self.segment)]

    def _chunks(self, t: slice, *xs: Tensor) -> list[Tensor]:
        """Pad a segment's (batch, T, ...) tensors to whole chunks (zeros: no decay, no write) and split them."""
        T = t.stop - t.start
        C = min(self.chunk, T)
        pad = (-T) % C
        nC = (T + pad) // C
        out = []
        for x in xs:
            if pad:
                x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
            out.append(x.reshape(self.batch, nC, C, *x.shape[2:]))
        return out

    def _factors(self, dlt: Tensor) -> dict[str, Tensor | None]:
        """The form of one segment, from its chunked steps dlt (batch, nC, C, G, Eg): chunk-local cumulative steps D,
        and either the factored form's pivots and W = exp(-A (D - p)) with the rows that fail its bound (``idx``, for
        the doubling scan), or, when more than ``STEPWISE_SHARE`` of the rows fail, the per-step decays
        a_t = exp(A delta_t) of the stepwise form (``decay``; ``W`` is None).

        Why a second form: a mamba MQAR run at lr 2e-2 drives its steps to delta ~ 5-14 on average with |A| up to 25
        (decays exp(-100) and below: the state is nearly rewritten every step), and then a third of the rows fail the
        bound even in chunks of 2. Measured on tensors captured from that run (batch 64, E = 128, N = 16, L = 128,
        1 thread, fwd+bwd): stepwise 0.20-0.21 s against 0.47-0.64 s for the factored form with gathered rows; with
        delta = softplus(1.5 z + 0.3) (5% of 4-step rows fail) 0.18-0.21 s against 0.26-0.33 s. With no failing
        row the two cost the same at batch 64 (0.19 s), and the factored form is 1.3-1.5x faster at batch 1 with
        chunks of 32 (E = 256, L = 1024 and 4096, 2 threads), so it stays where the bound holds.

        Under ``torch.compile`` every segment takes the stepwise form: choosing a form (and gathering failing rows)
        reads the data, which a traced graph cannot, and the stepwise form is exact at every step size.
        """
        D = dlt.cumsum(2)
        shape = (*D.shape, self.N)  # (batch, nC, C, G, Eg, N)
        if torch.compiler.is_compiling():
            decay = exp_(torch.mul(dlt[..., None], self.Ag, out=self.buffer("W", D, shape)))
            return dict(D=D, pivot=None, W=None, idx=None, decay=decay)
        hi, lo = D.amax(2).clamp(min=0), D.amin(2).clamp(max=0)  # the range of D, including D = 0 before the chunk
        unsafe = self.A_max * (hi - lo) / 2 > self.limit
        if unsafe.float().mean().item() > STEPWISE_SHARE:
            decay = exp_(torch.mul(dlt[..., None], self.Ag, out=self.buffer("W", D, shape)))
            return dict(D=D, pivot=None, W=None, idx=None, decay=decay)
        pivot = (hi + lo) / 2  # (batch, nC, G, Eg): halves the largest exponent
        rel = D - pivot[:, :, None]
        idx = None
        if bool(unsafe.any()):  # neutral values there (exp(0) = 1) so nothing overflows; replaced by the doubling scan
            rel = rel.masked_fill(unsafe[:, :, None], 0)
            pivot = pivot.masked_fill(unsafe, 0)
            idx = unsafe.nonzero(as_tuple=True)  # (batch, chunk, group, channel) rows
        W = torch.mul(rel[..., None], -self.Ag, out=self.buffer("W", rel, shape)).exp_()
        return dict(D=D, pivot=pivot, W=W, idx=idx, decay=None)

    def states(self, t: slice, h: Tensor, f: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """All states h_t of segment ``t``, chunked (batch, nC, C, G, Eg, N), from the state h before the segment; the
        segment's last state; and the state before every chunk (batch, nC, G, Eg, N). ``f``: the segment's factors,
        if already computed."""
        dlt, du, Bt = self._chunks(t, self.dlt[:, t], self.du[:, t], self.Bt[:, t])
        f = f or self._factors(dlt)
        D, W, idx, a = f["D"], f["W"], f["idx"], f["decay"]
        Bt = Bt[..., None, :]  # (batch, nC, C, G, 1, N)
        X = torch.mul(du[..., None], Bt, out=self.buffer("S", D, (*D.shape, self.N)))  # the writes x_t
        if W is not None:  # chunk-local states S_t / W_t, with S_t = sum_{s<=t} W_s x_s
            S = self._scan_(X.mul_(W), None, reverse=False)
            local_end = S[:, :, -1] / W[:, :, -1]  # chunk-end states if each chunk started from 0
        else:  # stepwise: h_t = a_t h_{t-1} + x_t from 0, one step of every chunk at a time
            local_end = self._scan_(X, a, reverse=False)[:, :, -1]
        # (batch, nC, G, Eg, N): each chunk's whole decay
        decay = exp_(D[:, :, -1, ..., None] * self.Ag, exact_zero=False)
        if idx is not None:
            rows = _rows_scan(D, du, Bt[..., 0, :], self.Ag, idx, reverse=False)
            local_end = local_end.index_put(idx, rows[:, -1])
        starts = []
        for k in range(D.shape[1]):  # state at every chunk start: a short loop on (batch, G, Eg, N) tensors
            starts.append(h)
            h = torch.addcmul(local_end[:, k], decay[:, k], h)
        h_start = torch.stack(starts, dim=1)  # (batch, nC, G, Eg, N)
        if W is None:  # the same recurrence again, now from each chunk's start state: no exp(A D_t) pass
            torch.mul(du[..., None], Bt, out=X)
            X[:, :, 0].addcmul_(a[:, :, 0], h_start)
            return self._scan_(X, a, reverse=False), h, h_start
        H = S.add_((torch.exp(f["pivot"][..., None] * self.Ag) * h_start)[:, :, None]).div_(W)
        if idx is not None:  # rows' states: local + exp(A D_t) h_start
            inflow = exp_(D.permute(0, 1, 3, 4, 2)[idx][..., None] * self.Ag[idx[2], idx[3]][:, None], exact_zero=False)
            _put_rows(H, idx, rows + inflow * h_start[idx][:, None])
        return H, h, h_start

    @staticmethod
    def _scan_(x: Tensor, decay: Tensor | None, reverse: bool) -> Tensor:
        """x_t += decay_t x_{t-1} over dim 2 of (batch, nC, C, ...) in place (reverse: x_t += decay_{t+1} x_{t+1});
        ``decay`` None: a plain cumulative sum.

        One multiply-add per position in the chunk, each over every chunk of the segment at once: C - 1 ops on 1/C of
        the numbers, a loop as long as the chunk, never the sequence. As the factored form's cumulative sum, measured
        (1 thread) against the block-of-8 triangle GEMMs it replaced: 0.26 vs 0.43 ms at batch 64 x chunk 8, 0.5-0.7
        vs 1.1-2.2 ms at batch 1 x chunk 32 (1M numbers); torch's cumsum along a non-last dim is slower than both
        (0.8-3.7 ms).
        """
        C = x.shape[2]
        for i in range(C - 2, -1, -1) if reverse else range(1, C):
            src, step = (i + 1, i + 1) if reverse else (i - 1, i)
            if decay is None:
                x[:, :, i] += x[:, :, src]
            else:
                x[:, :, i].addcmul_(decay[:, :, step], x[:, :, src])
        return x

    def backward_segment(self, t: slice, h: Tensor, dy: Tensor, carry: Tensor) -> dict[str, Tensor]:
        """Gradients of segment ``t`` from h (the state before it), dy (batch, T, G, Eg) and carry = dL/dh at the
        segment's last step from the steps after it (a_next g_next)."""
        dlt, du, Bt, Ct, dyc = self._chunks(t, self.dlt[:, t], self.du[:, t], self.Bt[:, t], self.Ct[:, t], dy)
        T = t.stop - t.start
        f = self._factors(dlt)
        D, W, idx, a = f["D"], f["W"], f["idx"], f["decay"]
        nC, C = D.shape[1], D.shape[2]
        H, _, h_start = self.states(t, h, f)
        dC = torch.mul(H, dyc[..., None], out=self.buffer("X", H)).sum(-2)  # sum_e dy_t[e] h_t[e]

        # the adjoint g inside each chunk as if nothing entered from its end (x'_t = dy_t C_t), then the carry c
        R = torch.mul(dyc[..., None], Ct[..., None, :], out=self.buffer("G", H))
        if W is not None:
            # sum over s >= t of x'_s / W_s (a direct sum: the terms shrink with s, so total - sum_{s<t} would cancel)
            Gr = self._scan_(R.div_(W), None, reverse=True)
            first = Gr[:, :, 0] * torch.exp(f["pivot"][..., None] * self.Ag)  # a_first g_first if c = 0
        else:  # stepwise: g_t = x'_t + a_{t+1} g_{t+1}, one step of every chunk at a time
            Gr = self._scan_(R, a, reverse=True)
            first = a[:, :, 0] * Gr[:, :, 0]
        if idx is not None:
            rows = _rows_scan(D, dyc, Ct, self.Ag, idx, reverse=True)
            D_first = D[:, :, 0][idx]  # (rows,)
            first = first.index_put(
                idx, rows[:, 0] * exp_(D_first[:, None] * self.Ag[idx[2], idx[3]], exact_zero=False)
            )
        decay = exp_(D[:, :, -1, ..., None] * self.Ag, exact_zero=False)
        carries = [None] * nC
        for k in reversed(range(nC)):  # gradient entering every chunk from its end: a short reverse loop
            carries[k] = carry
            carry = torch.addcmul(first[:, k], decay[:, k], carry)
        c = torch.stack(carries, dim=1)  # (batch, nC, G, Eg, N)
        if W is None:  # the adjoint recurrence again, now with the carry entering at each chunk's end
            Gadj = torch.mul(dyc[..., None], Ct[..., None, :], out=Gr)
            Gadj[:, :, -1] += c
            self._scan_(Gadj, a, reverse=True)
        else:
            to_end = torch.exp((D[:, :, -1] - f["pivot"])[..., None] * self.Ag)  # exp(A (D_end - p))
            Gadj = Gr.add_((to_end * c)[:, :, None]).mul_(W)
        if idx is not None:
            D_rows = D.permute(0, 1, 3, 4, 2)[idx]  # (rows, C)
            from_end = exp_((D_rows[:, -1:] - D_rows)[..., None] * self.Ag[idx[2], idx[3]][:, None], exact_zero=False)
            _put_rows(Gadj, idx, rows + from_end * c[idx][:, None])

        tmp = self.buffer("X", H)
        ddu = torch.mul(Gadj, Bt[..., None, :], out=tmp).sum(-1)  # (batch, nC, C, G, Eg)
        dB = torch.mul(Gadj, du[..., None], out=tmp).sum(-2)  # (batch, nC, C, G, N)
        if W is not None:  # m_t = g_t ⊙ a_t h_{t-1} = g_t ⊙ (h_t - x_t)
            M = H.addcmul_(du[..., None], Bt[..., None, :], value=-1).mul_(Gadj)
        else:  # formed from h_{t-1} itself: with the large steps that lead here h_t ≈ x_t, and h_t - x_t would cancel
            M = tmp
            M[:, :, 1:] = H[:, :, :-1]
            M[:, :, 0] = h_start
            M.mul_(a).mul_(Gadj)
            tmp = H
        dA = torch.mul(M, dlt[..., None], out=tmp).sum((0, 1, 2))  # (G, Eg, N)
        ddelta = M.mul_(self.Ag).sum(-1)

        def unchunk(x: Tensor) -> Tensor:
            return x.reshape(self.batch, nC * C, *x.shape[3:])[:, :T]

        return dict(du=unchunk(ddu), dB=unchunk(dB), dC=unchunk(dC), ddelta=unchunk(ddelta), dA=dA, carry=carry)


def _put_rows(X: Tensor, idx: tuple[Tensor, ...], rows: Tensor) -> None:
    """X (batch, nC, C, G, Eg, N)[b, k, :, g, e] = rows (n_rows, C, N), in place."""
    bi, ki, gi, ei = idx
    X.permute(0, 1, 3, 4, 2, 5).index_put_((bi, ki, gi, ei), rows)


def _rows_scan(D: Tensor, scale: Tensor, vec: Tensor, Ag: Tensor, idx: tuple[Tensor, ...], reverse: bool) -> Tensor:
    """The stable form for selected (batch, chunk, group, channel) rows, each chunk starting from 0.

    D, scale (batch, nC, C, G, Eg): chunk-local cumulative steps and the writes' per-channel scale; vec
    (batch, nC, C, G, N): the writes' per-state factor (write x_s = scale_s vec_s, gathered per row, never formed for
    every row). Returns (rows, C, N): forward: sum_{s<=t} exp(A (D_t - D_s)) x_s;  reverse: sum_{s>=t} ... (D_s - D_t).
    """
    bi, ki, gi, ei = idx
    Dr = D.permute(0, 1, 3, 4, 2)[idx]  # (rows, C)
    xr = scale.permute(0, 1, 3, 4, 2)[idx][..., None] * vec.permute(0, 1, 3, 2, 4)[bi, ki, gi]  # (rows, C, N)
    A = Ag[gi, ei]  # (rows, N)
    if reverse:  # run the forward form on the time-reversed chunk: D'_t = -D_{C-1-t} keeps D'_t - D'_s = D_s - D_t
        return _doubling_scan(-Dr.flip(1), xr.flip(1), A).flip(1)
    return _doubling_scan(Dr, xr, A)


def _doubling_scan(D: Tensor, x: Tensor, A: Tensor) -> Tensor:
    """h_t = a_t h_{t-1} + x_t from h = 0, with a_t = exp(A (D_t - D_{t-1})), for rows D (rows, C), x (rows, C, N),
    A (rows, N): a prefix scan by recursive doubling (Hillis and Steele, 1986) over the pairs (a, x), composed as
    (a2, x2) after (a1, x1) = (a2 a1, a2 x1 + x2).

    Only the per-step decays and their products are formed, all in (0, 1] for A <= 0 and steps >= 0, so nothing
    overflows at any step size: the rows whose span is too large for the factored form come here. log2(C) rounds of
    three passes over (rows, C, N), against C^2 N exponentials for the pairwise form (spec "Parallel forms").
    """
    steps = torch.diff(D, dim=1, prepend=D[:, :1])  # the first step's decay multiplies h = 0: any value will do
    decay = exp_(steps[..., None] * A[:, None], exact_zero=False)  # (rows, C, N)
    h = x.clone()
    span = 1
    while span < D.shape[1]:  # after this round, h_t sums the writes of steps t - 2 span < s <= t
        h[:, span:] += decay[:, span:] * h[:, :-span]  # the product is formed before h is updated: no aliasing
        if 2 * span < D.shape[1]:
            decay[:, span:] = decay[:, span:] * decay[:, :-span]
        span *= 2
    return h
