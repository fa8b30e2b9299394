"""Gated linear attention ops with the semantics of FLA's ``chunk_gla`` and ``chunk_simple_gla``.

Yang et al. 2023, "Gated Linear Attention Transformers with Hardware-Efficient Training",
https://arxiv.org/abs/2312.06635. Per batch and head, with g the log forget gate (<= 0):

    S_t = diag(exp g_t) S_{t-1} + k_t^T v_t,     o_t = scale * q_t S_t

``gla`` takes one gate per key channel, g (B, T, H, K); ``simple_gla`` one scalar per head and step, g (B, T, H): the
decay of RetNet (constant) and Mamba-2 / SSD (data-dependent). Both share one
implementation (the scalar gate broadcasts over K, with a cheaper (C, C) decay matrix in the chunked form).

Backends: ``reference`` (token-by-token recurrence, the oracle), ``torch`` (chunked, the CPU path), ``triton`` (CUDA,
or the CPU interpreter under ``TRITON_INTERPRET=1``). All three compute the same function and its gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnzoo.kernels.dispatch import choose_backend
from attnzoo.kernels.gla.chunked import gla_chunked
from attnzoo.kernels.gla.reference import gla_reference

__all__ = ["gla", "gla_chunked", "gla_reference", "simple_gla"]


def _triton_backend(*args):
    from attnzoo.kernels.gla.triton import gla_triton  # triton is imported only on this path

    return gla_triton(*args)


_BACKENDS = {"reference": gla_reference, "torch": gla_chunked, "triton": _triton_backend}


def gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Gated linear attention with a per-key-channel forget gate (FLA's ``chunk_gla``).

    Args:
        q: (B, T, H, K) queries.
        k: (B, T, H, K) keys. To remove a padded position, zero its k and its g (no write, no decay).
        v: (B, T, H, V) values.
        g: (B, T, H, K) log forget gate, <= 0 (e.g. ``logsigmoid(x) / 16``); float32 recommended, it is used in
            float32 (float64 for float64 inputs) whatever its dtype.
        scale: multiplies q; default ``K ** -0.5`` as in FLA.
        initial_state: (B, H, K, V) state before position 0, so ``gla(x[:t])`` then ``gla(x[t:], initial_state=...)``
            equals ``gla(x)``.
        output_final_state: also return the state after the last position.
        chunk_size: chunk length of the torch/triton backends, a power of two (the result does not depend on it).
        backend: ``"auto"`` (triton on CUDA, else torch), ``"reference"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``(o, state)``: o (B, T, H, V) in v's dtype; state (B, H, K, V) in float32 (float64 for float64 inputs) if
        ``output_final_state`` else None. States and sums are float32 under half precision (autocast is switched
        off inside); float64 stays float64.

    Example:
        >>> q, k, v = torch.randn(2, 10, 4, 8), torch.randn(2, 10, 4, 8), torch.randn(2, 10, 4, 16)
        >>> g = torch.nn.functional.logsigmoid(torch.randn(2, 10, 4, 8)) / 16
        >>> o, state = gla(q, k, v, g, output_final_state=True)
        >>> o.shape, state.shape
        (torch.Size([2, 10, 4, 16]), torch.Size([2, 4, 8, 16]))
    """
    _check("gla", q, k, v, g, "(B, T, H, K)", initial_state, chunk_size)
    return _run("gla", q, k, v, g, scale, initial_state, output_final_state, chunk_size, backend)


def simple_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Gated linear attention with one scalar log decay per head and step (FLA's ``chunk_simple_gla``).

    Same as :func:`gla` with g broadcast over K: S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t.

    Args:
        q: (B, T, H, K) queries.
        k: (B, T, H, K) keys.
        v: (B, T, H, V) values.
        g: (B, T, H) log decay, <= 0: log gamma_h for RetNet, dt_t * A_h for Mamba-2.
        scale: multiplies q; default ``K ** -0.5`` as in FLA (Mamba-2 uses 1.0).
        initial_state: (B, H, K, V) state before position 0.
        output_final_state: also return the state after the last position.
        chunk_size: chunk length of the torch/triton backends, a power of two (the result does not depend on it).
        backend: ``"auto"``, ``"reference"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``(o, state)`` as for :func:`gla`.
    """
    _check("simple_gla", q, k, v, g, "(B, T, H)", initial_state, chunk_size)
    return _run("simple_gla", q, k, v, g[..., None], scale, initial_state, output_final_state, chunk_size, backend)


def _run(
    op: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None,
    initial_state: Tensor | None,
    output_final_state: bool,
    chunk_size: int,
    backend: str,
) -> tuple[Tensor, Tensor | None]:
    impl = _BACKENDS[choose_backend(op, backend, q.device)]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out_dtype = v.dtype
    # accumulate in float32 whatever the input precision; float64 stays float64 (tests compare to 1e-10)
    acc = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, g = q.to(acc), k.to(acc), v.to(acc), g.to(acc)
        if initial_state is not None:
            initial_state = initial_state.to(acc)
        # output_final_state lets the chunked backend skip the last chunk's write
        o, state = impl(q, k, v, g, scale, initial_state, chunk_size, output_final_state)
    return o.to(out_dtype), (state if output_final_state else None)


def _check(
    op: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    g_layout: str,
    initial_state: Tensor | None,
    chunk_size: int,
) -> None:
    """Validate shapes and arguments once, reporting expected against got."""
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = f"{t.dtype} tensor" if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{op}: {name} must be a floating-point tensor; got {got}.")
    if q.dim() != 4:
        raise ValueError(f"{op}: q must have shape (B, T, H, K); got {tuple(q.shape)}.")
    B, T, H, K = q.shape
    if tuple(k.shape) != (B, T, H, K):
        raise ValueError(f"{op}: k must have shape (B, T, H, K) = {(B, T, H, K)} like q; got {tuple(k.shape)}.")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"{op}: v must have shape (B, T, H, V) = ({B}, {T}, {H}, V) like q; got {tuple(v.shape)}.")
    expected_g = (B, T, H, K) if g_layout == "(B, T, H, K)" else (B, T, H)
    if tuple(g.shape) != expected_g:
        hint = " (use simple_gla for one scalar gate per head)" if g.shape == (B, T, H) else ""
        raise ValueError(f"{op}: g must have shape {g_layout} = {expected_g}; got {tuple(g.shape)}{hint}.")
    if initial_state is not None:
        expected = (B, H, K, v.shape[-1])
        if not isinstance(initial_state, Tensor) or tuple(initial_state.shape) != expected:
            got = tuple(initial_state.shape) if isinstance(initial_state, Tensor) else type(initial_state).__name__
            raise ValueError(f"{op}: initial_state must have shape (B, H, K, V) = {expected}; got {got}.")
    if not isinstance(chunk_size, int) or chunk_size <= 0 or chunk_size & (chunk_size - 1):
        raise ValueError(f"{op}: chunk_size must be a positive power of two (16, 32, 64, ...); got {chunk_size!r}.")
