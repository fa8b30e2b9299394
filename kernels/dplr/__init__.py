"""Diagonal-plus-low-rank (DPLR) delta rule with the semantics of FLA's ``chunk_dplr_delta_rule``.

The generalized delta rule of RWKV-7 (Peng et al. 2025, "RWKV-7 "Goose" with Expressive Dynamic State Evolution",
https://arxiv.org/abs/2503.14456): per batch and head, with g the log decay per key channel (<= 0),

    S_t = (diag(exp g_t) + b_t^T a_t) S_{t-1} + k_t^T v_t,      o_t = scale * q_t S_t

(state (K, V); a_t S_{t-1} is read through a and written back along b). RWKV-7 uses a = -kappa, b = kappa * alpha
with kappa the unit-norm "removal key" and alpha its in-context learning rate, which makes the transition
diag(w) - kappa^T (alpha * kappa); a = -beta k, b = k with g = 0 is the plain delta rule.

Backends: ``reference`` (token-by-token recurrence, the oracle) and ``torch`` (chunked: a unit-triangular solve per
chunk and a loop over chunks, see chunked.py). There is no Triton kernel yet: ``backend="auto"`` uses torch on every
device and ``backend="triton"`` raises.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnzoo.kernels.dispatch import choose_backend
from attnzoo.kernels.dplr.chunked import dplr_chunked
from attnzoo.kernels.dplr.reference import dplr_reference

__all__ = ["dplr_chunked", "dplr_delta_rule", "dplr_reference"]

_BACKENDS = {"reference": dplr_reference, "torch": dplr_chunked}


def dplr_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    g: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 16,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """DPLR delta rule (FLA's ``chunk_dplr_delta_rule(q, k, v, a, b, gk)``; RWKV-7's ``chunk_rwkv7`` with r = q).

    Args:
        q: (B, T, H, K) queries (RWKV-7's receptance r).
        k: (B, T, H, K) keys written with v.
        v: (B, T, H, V) values.
        a: (B, T, H, K) the low-rank read vector (RWKV-7: -kappa).
        b: (B, T, H, K) the low-rank write vector (RWKV-7: kappa * alpha).
        g: (B, T, H, K) log decay per key channel, <= 0 (RWKV-7: -exp(-0.5) * sigmoid(.)); used in float32 (float64
            for float64 inputs). To remove a padded position, zero its k, v, a, b and g.
        scale: multiplies q; default ``K ** -0.5`` as in FLA (RWKV-7 passes 1.0).
        initial_state: (B, H, K, V) state before position 0.
        output_final_state: also return the state after the last position.
        chunk_size: chunk length of the torch backend, a power of two (the result does not depend on it; its
            pairwise decay tensor is (C, C, K) per chunk, so small chunks are cheaper).
        backend: ``"auto"`` (torch), ``"reference"`` or ``"torch"``.

    Returns:
        ``(o, state)``: o (B, T, H, V) in v's dtype; state (B, H, K, V) in float32 (float64 for float64 inputs) if
        ``output_final_state`` else None.
    """
    _check(q, k, v, a, b, g, initial_state, chunk_size)
    name = choose_backend("dplr_delta_rule", backend, q.device)
    if name == "triton":
        if backend != "auto":
            raise ValueError("dplr_delta_rule: there is no triton backend yet; use backend='torch' or 'reference'.")
        name = "torch"
    impl = _BACKENDS[name]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out_dtype = v.dtype
    # accumulate in float32 whatever the input precision; float64 stays float64 (tests compare to 1e-10)
    acc = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32
    with torch.autocast(q.device.type, enabled=False):
        tensors = [t.to(acc) for t in (q, k, v, a, b, g)]
        state = None if initial_state is None else initial_state.to(acc)
        o, state = impl(*tensors, scale, state, chunk_size, output_final_state)
    return o.to(out_dtype), (state if output_final_state else None)


def _check(
    q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, g: Tensor, initial_state: Tensor | None, chunk_size: int
) -> None:
    """Validate shapes and arguments once, reporting expected against got."""
    named = (("q", q), ("k", k), ("v", v), ("a", a), ("b", b), ("g", g))
    for name, t in named:
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = f"{t.dtype} tensor" if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"dplr_delta_rule: {name} must be a floating-point tensor; got {got}.")
    if q.dim() != 4:
        raise ValueError(f"dplr_delta_rule: q must have shape (B, T, H, K); got {tuple(q.shape)}.")
    B, T, H, K = q.shape
    for name, t in named[1:]:
        if name != "v" and tuple(t.shape) != (B, T, H, K):
            raise ValueError(
                f"dplr_delta_rule: {name} must have shape (B, T, H, K) = {(B, T, H, K)} like q; got {tuple(t.shape)}."
            )
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(
            f"dplr_delta_rule: v must have shape (B, T, H, V) = ({B}, {T}, {H}, V) like q; got {tuple(v.shape)}."
        )
    if initial_state is not None:
        expected = (B, H, K, v.shape[-1])
        if not isinstance(initial_state, Tensor) or tuple(initial_state.shape) != expected:
            got = tuple(initial_state.shape) if isinstance(initial_state, Tensor) else type(initial_state).__name__
            raise ValueError(f"dplr_delta_rule: initial_state must have shape (B, H, K, V) = {expected}; got {got}.")
    if not isinstance(chunk_size, int) or chunk_size <= 0 or chunk_size & (chunk_size - 1):
        raise ValueError(
            f"dplr_delta_rule: chunk_size must be a positive power of two (8, 16, 32, ...); got {chunk_size!r}."
        )
