"""Selective scan (the S6 layer of Mamba) — Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces", https://arxiv.org/abs/2312.00752, with the signature, (batch, D, L) layout and semantics of mamba_ssm's
``selective_scan_fn`` (mamba_ssm/ops/selective_scan_interface.py), so callers can swap implementations.

Backends: ``reference`` (sequential loop, the oracle), ``torch`` (chunked, the CPU path), ``triton`` (CUDA, or the
interpreter under ``TRITON_INTERPRET=1``). Backends compute only the core scan; delta_bias, softplus, the D skip and
the z gate are applied here, identically for all of them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnzoo.kernels.dispatch import choose_backend
from attnzoo.kernels.selective_scan.chunked import selective_scan_chunked
from attnzoo.kernels.selective_scan.reference import selective_scan_reference

__all__ = ["selective_scan", "selective_scan_chunked", "selective_scan_reference"]


def _triton_backend(*args):
    from attnzoo.kernels.selective_scan.triton import selective_scan_triton  # triton is imported only on this path

    return selective_scan_triton(*args)


_BACKENDS = {"reference": selective_scan_reference, "torch": selective_scan_chunked, "triton": _triton_backend}


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    initial_state: Tensor | None = None,
    chunk_size: int = 32,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """The selective state-space scan, per batch element, channel e and state index n::

        delta <- softplus(delta + delta_bias)            (bias and softplus only if given / asked)
        h_t[e, n] = exp(delta_t[e] A[e, n]) h_{t-1}[e, n] + delta_t[e] u_t[e] B_t[n]      (ZOH for A, Euler for B)
        y_t[e] = sum_n h_t[e, n] C_t[n] + D[e] u_t[e]
        out = y * silu(z)                                (if z is given)

    Inside this function ``batch`` is the batch size: ``B`` is the SSM input matrix (mamba_ssm's names).

    Args:
        u: (batch, E, L) input of the scan (mamba: the conv output x).
        delta: (batch, E, L) step size Δ (before ``delta_bias``/softplus if those are given).
        A: (E, N) real state matrix (diagonal per channel; mamba: -exp(A_log)). Complex A is not supported.
        B: (batch, N, L) input matrix per step, shared by all channels; or (batch, G, N, L) grouped, channel e using
            group e // (E / G); or (E, N) time-invariant.
        C: (batch, N, L) output matrix, same forms as ``B``.
        D: (E,) skip connection weight, or None.
        z: (batch, E, L) gate: the output is multiplied by silu(z), or None.
        delta_bias: (E,) added to delta before the softplus, or None.
        delta_softplus: apply softplus to delta (+ bias).
        return_last_state: also return h_L.
        initial_state: (batch, E, N) state h_0 before position 0 (default zeros). An attnzoo extension beyond
            mamba_ssm: ``run(u[..., :t])`` then ``run(u[..., t:], initial_state=last)`` equals ``run(u)``, which is what
            cached prefill and multi-token decoding need.
        chunk_size: chunk length of the torch backend (results do not depend on it, up to rounding; 32 measured
            faster than 16 and 64 on a CPU at mamba's sizes).
        backend: ``"auto"`` (triton on CUDA, else torch), ``"reference"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``out`` (batch, E, L) in u's dtype, or ``(out, last_state)`` with last_state (batch, E, N) float32 (float64 for
        float64 inputs). The scan, state and gate run in float32 (float64 stays float64), also under autocast, which
        is switched off inside.

    Example:
        >>> u, delta = torch.randn(2, 8, 32), torch.rand(2, 8, 32) * 0.1
        >>> A, B, C = -torch.rand(8, 4), torch.randn(2, 4, 32), torch.randn(2, 4, 32)
        >>> out, last = selective_scan(u, delta, A, B, C, return_last_state=True)
        >>> out.shape, last.shape
        (torch.Size([2, 8, 32]), torch.Size([2, 8, 4]))
    """
    batch, E, L, N = _check(u, delta, A, B, C, D, z, delta_bias, initial_state, chunk_size)
    impl = _BACKENDS[choose_backend("selective_scan", backend, u.device)]
    out_dtype = u.dtype
    # the scan accumulates in float32 whatever the input precision; float64 stays float64 (tests compare to 1e-10)
    acc = torch.float64 if u.dtype == torch.float64 or delta.dtype == torch.float64 else torch.float32
    with torch.autocast(u.device.type, enabled=False):
        u, delta, A = u.to(acc), delta.to(acc), A.to(acc)
        B, C = (_grouped(M, batch, E, N, L).to(acc) for M in (B, C))
        if B.shape[1] != C.shape[1]:  # backends take one grouping for both: refine both to the lcm
            G = math.lcm(B.shape[1], C.shape[1])
            B, C = (M.repeat_interleave(G // M.shape[1], dim=1) for M in (B, C))
        if delta_bias is not None:
            delta = delta + delta_bias.to(acc)[:, None]
        if delta_softplus:
            delta = F.softplus(delta)
        if initial_state is not None:
            initial_state = initial_state.to(acc)
        y, last_state = impl(u, delta, A, B, C, initial_state, chunk_size)
        if D is not None:
            y = y + u * D.to(acc)[:, None]
        if z is not None:
            y = y * F.silu(z.to(acc))
    out = y.to(out_dtype)
    return (out, last_state) if return_last_state else out


def _grouped(M: Tensor, batch: int, E: int, N: int, L: int) -> Tensor:
    """B or C in any accepted form -> (batch, G, N, L)."""
    if M.dim() == 2:  # time-invariant (E, N): one group per channel
        return M[None, :, :, None].expand(batch, E, N, L)
    if M.dim() == 3:
        return M[:, None]
    return M


def _check(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
    chunk_size: int,
) -> tuple[int, int, int, int]:
    """Validate shapes once, reporting expected against got; returns (batch, E, L, N)."""

    def shape(t) -> str:
        return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__

    if not isinstance(u, Tensor) or u.dim() != 3 or not u.is_floating_point():
        raise ValueError(f"selective_scan: u must be a floating-point tensor (batch, E, L); got {shape(u)}.")
    batch, E, L = u.shape
    if not isinstance(delta, Tensor) or tuple(delta.shape) != (batch, E, L):
        raise ValueError(
            f"selective_scan: delta must have u's shape (batch, E, L) = {(batch, E, L)}; got {shape(delta)}."
        )
    if not isinstance(A, Tensor) or A.dim() != 2 or A.shape[0] != E:
        raise ValueError(f"selective_scan: A must have shape (E, N) = ({E}, N); got {shape(A)}.")
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported; pass a real (E, N) A (mamba: -exp(A_log)).")
    N = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        ok = isinstance(M, Tensor) and (
            (M.dim() == 2 and tuple(M.shape) == (E, N))
            or (M.dim() == 3 and tuple(M.shape) == (batch, N, L))
            or (
                M.dim() == 4
                and M.shape[0] == batch
                and M.shape[1] > 0
                and E % M.shape[1] == 0
                and tuple(M.shape[2:]) == (N, L)
            )
        )
        if not ok:
            raise ValueError(
                f"selective_scan: {name} must have shape (batch, N, L) = {(batch, N, L)}, grouped (batch, G, N, L) "
                f"with G dividing E={E}, or time-invariant (E, N) = {(E, N)}; got {shape(M)}."
            )
    for name, t, expected in (
        ("D", D, (E,)),
        ("delta_bias", delta_bias, (E,)),
        ("z", z, (batch, E, L)),
        ("initial_state", initial_state, (batch, E, N)),
    ):
        if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != expected):
            raise ValueError(f"selective_scan: {name} must have shape {expected} or be None; got {shape(t)}.")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"selective_scan: chunk_size must be a positive int; got {chunk_size!r}.")
    return batch, E, L, N
