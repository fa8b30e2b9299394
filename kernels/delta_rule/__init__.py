"""The delta rule with FLA's ``chunk_delta_rule`` / ``chunk_gated_delta_rule`` semantics.

Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length",
https://arxiv.org/abs/2406.06484 (DeltaNet), and Yang et al. 2025, "Gated Delta Networks: Improving Mamba2 with Delta
Rule", https://arxiv.org/abs/2412.06464 (Gated DeltaNet). Per batch and head, with beta_t in (0, 1) the writing
strength and g_t <= 0 the log decay (Gated DeltaNet only; the decay is applied before the delta update, as in FLA's
``naive_recurrent_gated_delta_rule``):

    S_t = exp(g_t) S_{t-1} (I - beta_t k_t^T k_t) + beta_t k_t^T v_t,     o_t = scale * q_t S_t

i.e. the state is first decayed, then moved towards v_t along k_t by beta_t times the error v_t - k_t S. The keys are
expected L2-normalised (the layers normalise q and k; FLA's ``use_qk_l2norm_in_kernel`` is not part of this op):
with ||k_t|| = 1 and beta_t in (0, 1), I - beta_t k_t^T k_t is a contraction and the state stays bounded.

Backends: ``reference`` (token-by-token recurrence, the oracle), ``torch`` (chunked WY / UT-transform form with a
hand-written backward: the CPU path, device-agnostic) and ``triton`` (the same chunked algorithm, its two sequential
passes over chunks as Triton kernels that keep the state on chip; CUDA, or the CPU interpreter with
``TRITON_INTERPRET=1``). ``backend="auto"`` picks triton for CUDA tensors when triton is installed, torch otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnzoo.kernels.delta_rule.chunked import delta_rule_chunked
from attnzoo.kernels.delta_rule.reference import delta_rule_reference
from attnzoo.kernels.dispatch import choose_backend

__all__ = ["delta_rule", "delta_rule_chunked", "delta_rule_reference"]


def _triton_backend(*args):
    from attnzoo.kernels.delta_rule.triton import delta_rule_triton  # triton is imported only on this path

    return delta_rule_triton(*args)


DEFAULT_CHUNK_SIZE = {"torch": 32, "triton": 64}  # chunk_size=None: the fastest measured per backend
_BACKENDS = {"reference": delta_rule_reference, "torch": delta_rule_chunked, "triton": _triton_backend}


def delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """The (gated) delta rule: FLA's ``chunk_delta_rule`` (``g=None``) or ``chunk_gated_delta_rule`` (g given).

    Args:
        q: (B, T, H, K) queries, L2-normalised by the caller (as in DeltaNet).
        k: (B, T, H, K) keys, L2-normalised by the caller. To remove a padded position, zero its k (and its g):
            a position with k = 0 and g = 0 neither writes nor decays the state.
        v: (B, T, H, V) values.
        beta: (B, T, H) writing strength in (0, 1) (``sigmoid`` of a projection in DeltaNet).
        g: (B, T, H) log decay, <= 0 (Gated DeltaNet: ``-exp(A_log) * softplus(a + dt_bias)``), or None for no
            decay. Used in float32 (float64 for float64 inputs) whatever its dtype.
        scale: multiplies q; default ``K ** -0.5`` as in FLA.
        initial_state: (B, H, K, V) state before position 0, so ``delta_rule(x[:t])`` then
            ``delta_rule(x[t:], initial_state=...)`` equals ``delta_rule(x)``.
        output_final_state: also return the state after the last position.
        chunk_size: chunk length of the torch/triton backends, a power of two (the result does not depend on it);
            None = the backend's own: 64 on triton (FLA's), 32 on torch (on one CPU core the C x C products inside
            a chunk shrink more than the longer loop over chunks costs: fwd+bwd measured 1.2-1.6x faster than 64 at
            T = 1024, the same at 8192).
        backend: ``"auto"`` (triton on CUDA, else torch), ``"reference"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``(o, state)``: o (B, T, H, V) in v's dtype; state (B, H, K, V) in float32 (float64 for float64 inputs) if
        ``output_final_state`` else None. States and sums are float32 under half precision (autocast is switched
        off inside); float64 stays float64.

    Example:
        >>> q = torch.nn.functional.normalize(torch.randn(2, 10, 4, 8), dim=-1)
        >>> k = torch.nn.functional.normalize(torch.randn(2, 10, 4, 8), dim=-1)
        >>> v, beta = torch.randn(2, 10, 4, 16), torch.rand(2, 10, 4)
        >>> o, state = delta_rule(q, k, v, beta, output_final_state=True)
        >>> o.shape, state.shape
        (torch.Size([2, 10, 4, 16]), torch.Size([2, 4, 8, 16]))
    """
    _check(q, k, v, beta, g, initial_state, chunk_size)
    resolved = choose_backend("delta_rule", backend, q.device)
    impl = _BACKENDS[resolved]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out_dtype = v.dtype
    # accumulate in float32 whatever the input precision; float64 stays float64 (tests compare to 1e-10)
    acc = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, beta = q.to(acc), k.to(acc), v.to(acc), beta.to(acc)
        g = None if g is None else g.to(acc)
        if initial_state is not None:
            initial_state = initial_state.to(acc)
        if chunk_size is None:
            chunk_size = DEFAULT_CHUNK_SIZE.get(resolved, 64)
        o, state = impl(q, k, v, beta, g, scale, initial_state, chunk_size, output_final_state)
    return o.to(out_dtype), (state if output_final_state else None)


def _check(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None,
    initial_state: Tensor | None,
    chunk_size: int | None,
) -> None:
    """Validate shapes and arguments once, reporting expected against got (shapes only: no host sync)."""
    named = [("q", q), ("k", k), ("v", v), ("beta", beta)] + ([("g", g)] if g is not None else [])
    for name, t in named:
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = f"{t.dtype} tensor" if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"delta_rule: {name} must be a floating-point tensor; got {got}.")
    if q.dim() != 4:
        raise ValueError(f"delta_rule: q must have shape (B, T, H, K); got {tuple(q.shape)}.")
    B, T, H, K = q.shape
    if tuple(k.shape) != (B, T, H, K):
        raise ValueError(f"delta_rule: k must have shape (B, T, H, K) = {(B, T, H, K)} like q; got {tuple(k.shape)}.")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(
            f"delta_rule: v must have shape (B, T, H, V) = ({B}, {T}, {H}, V) like q; got {tuple(v.shape)}."
        )
    for name, t in (("beta", beta), ("g", g)):
        if t is not None and tuple(t.shape) != (B, T, H):
            hint = " (one scalar per head and step; per-channel beta is not supported)" if t.dim() == 4 else ""
            raise ValueError(f"delta_rule: {name} must have shape (B, T, H) = {(B, T, H)}; got {tuple(t.shape)}{hint}.")
    if initial_state is not None:
        expected = (B, H, K, v.shape[-1])
        if not isinstance(initial_state, Tensor) or tuple(initial_state.shape) != expected:
            got = tuple(initial_state.shape) if isinstance(initial_state, Tensor) else type(initial_state).__name__
            raise ValueError(f"delta_rule: initial_state must have shape (B, H, K, V) = {expected}; got {got}.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0 or chunk_size & (chunk_size - 1)):
        raise ValueError(
            f"delta_rule: chunk_size must be a positive power of two (16, 32, 64, ...); got {chunk_size!r}."
        )
