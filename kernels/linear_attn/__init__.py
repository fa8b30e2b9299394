"""Linear attention over feature-mapped queries and keys (Katharopoulos et al. 2020, "Transformers are RNNs",
https://arxiv.org/abs/2006.16236), causal and non-causal, with optional normalisation and a carried state.

Backends: ``reference`` (quadratic masked form, the oracle), ``torch`` (chunked, the CPU path), ``triton`` (CUDA, or
the interpreter under ``TRITON_INTERPRET=1``). Backends implement only the un-normalised op; normalisation is done here
by appending a ones column to v, so the denominator z_t = sum k_j rides along as the state's last value column.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnzoo.kernels.dispatch import choose_backend
from attnzoo.kernels.linear_attn.chunked import linear_attn_chunked, linear_attn_chunked_normalized
from attnzoo.kernels.linear_attn.reference import linear_attn_reference

__all__ = ["linear_attn", "linear_attn_chunked", "linear_attn_reference"]


def _triton_backend(*args):
    from attnzoo.kernels.linear_attn.triton import linear_attn_triton  # triton is imported only on this path

    return linear_attn_triton(*args)


_BACKENDS = {"reference": linear_attn_reference, "torch": linear_attn_chunked, "triton": _triton_backend}


def linear_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Linear attention with the feature maps already applied by the caller.

    Un-normalised (``normalize=False``), per batch and head::

        causal:      o_t = q_t S_t,  S_t = S_0 + sum_{j<=t} k_j^T v_j
        non-causal:  o_t = q_t S,    S   = S_0 + sum_{j<=S} k_j^T v_j

    Normalised (``normalize=True``): ``o_t = (q_t S_t) / (q_t . z_t + eps)`` with ``z_t = z_0 + sum_{j<=t} k_j``. It is
    computed by running the un-normalised op on ``v' = [v, 1]``, so the state then has ``V + 1`` value columns and its
    last column is z. Layers that want another denominator (a clamp, eps added to z) call with ``normalize=False`` and
    append their own ones column. No ``1/sqrt(K)`` scale is applied; scale q before calling if you want one.

    Args:
        q: (B, T, H, K) feature-mapped queries.
        k: (B, S, H, K) feature-mapped keys (zero the features of padded keys to remove them).
        v: (B, S, H, V) values.
        causal: query t sees keys j <= t; requires S == T.
        normalize: divide by ``q_t . z_t + eps`` (see above).
        eps: added to the denominator when ``normalize``; 1e-6 as in Katharopoulos et al.
        initial_state: (B, H, K, V) state to continue from (``V + 1`` columns when ``normalize``, last = z). Causal: the
            state before position 0, so ``run(x[:t])`` then ``run(x[t:], initial_state=final)`` equals ``run(x)``.
            Non-causal: simply added to the sum over keys.
        output_final_state: also return the state after the last key.
        chunk_size: chunk length of the torch/triton backends (the result does not depend on it).
        backend: ``"auto"`` (triton on CUDA, else torch), ``"reference"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``(o, state)``: o (B, T, H, V) in v's dtype; state (B, H, K, V[+1]) in float32 (float64 for float64 inputs)
        if ``output_final_state`` else None. All accumulation is in float32 (float64 stays float64), also under
        bf16/fp16 autocast, which is switched off inside.

    Example:
        >>> q, k = torch.rand(2, 10, 4, 8), torch.rand(2, 10, 4, 8)
        >>> v = torch.randn(2, 10, 4, 16)
        >>> o, state = linear_attn(q, k, v, causal=True, output_final_state=True)
        >>> o.shape, state.shape
        (torch.Size([2, 10, 4, 16]), torch.Size([2, 4, 8, 17]))
    """
    _check(q, k, v, causal, normalize, eps, initial_state, chunk_size)
    impl = _BACKENDS[choose_backend("linear_attn", backend, q.device)]
    out_dtype = v.dtype
    # accumulate in float32 whatever the input precision; float64 stays float64 (tests compare to 1e-10)
    acc = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.to(acc), k.to(acc), v.to(acc)
        if initial_state is not None:
            initial_state = initial_state.to(acc)
        if normalize and causal and impl is linear_attn_chunked:  # the CPU path carries z beside S (no V + 1 GEMMs)
            o, state = linear_attn_chunked_normalized(q, k, v, initial_state, chunk_size, eps, output_final_state)
        elif normalize:
            v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # (B, S, H, V + 1): last column accumulates z
            o, state = impl(q, k, v, causal, initial_state, chunk_size, output_final_state)
            o = o[..., :-1] / (o[..., -1:] + eps)  # q_t . z_t is the last column of q_t S_t
        else:  # output_final_state lets the chunked backend skip the last chunk's write
            o, state = impl(q, k, v, causal, initial_state, chunk_size, output_final_state)
    return o.to(out_dtype), (state if output_final_state else None)


def _check(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    normalize: bool,
    eps: float,
    initial_state: Tensor | None,
    chunk_size: int,
) -> None:
    """Validate shapes and arguments once, reporting expected against got."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4 or not t.is_floating_point():
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"linear_attn: {name} must be a floating-point tensor (B, T, H, D); got {got}.")
    B, T, H, K = q.shape
    S = k.shape[1]
    if tuple(k.shape) != (B, S, H, K):
        raise ValueError(
            f"linear_attn: k must have shape (B, S, H, K) = ({B}, S, {H}, {K}) like q; got {tuple(k.shape)}."
        )
    if tuple(v.shape[:3]) != (B, S, H):
        raise ValueError(
            f"linear_attn: v must have shape (B, S, H, V) = ({B}, {S}, {H}, V) like k; got {tuple(v.shape)}."
        )
    if causal and S != T:
        raise ValueError(
            f"linear_attn: causal=True pairs query t with keys j <= t, so k and v need the query length T={T}; "
            f"got S={S}. Use causal=False for cross-attention of other lengths."
        )
    if initial_state is not None:
        V = v.shape[-1] + (1 if normalize else 0)
        expected = (B, H, K, V)
        if not isinstance(initial_state, Tensor) or tuple(initial_state.shape) != expected:
            got = tuple(initial_state.shape) if isinstance(initial_state, Tensor) else type(initial_state).__name__
            note = " (V + 1 columns because normalize=True: the last column is z)" if normalize else ""
            raise ValueError(f"linear_attn: initial_state must have shape (B, H, K, V) = {expected}{note}; got {got}.")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"linear_attn: chunk_size must be a positive int; got {chunk_size!r}.")
    if normalize and not eps >= 0:
        raise ValueError(f"linear_attn: eps must be >= 0; got {eps!r}.")
