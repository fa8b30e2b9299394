"""Block-sparse softmax attention from a mask function: the op behind every mask-based local/sparse layer.

A pattern (:class:`BlockPattern`) is written once as a FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> bool``
plus the key blocks each query block may touch (``kv_blocks``, built analytically by the layer). For every query i

    o_i = sum_j softmax_j(scale * q_i k_j^T + bias(i, j) over {j : mask_mod(i, j) and key j is real}) v_j

with o_i = 0 when no real key is visible (as in ``attnzoo.layers.sdpa``). Backends:

* ``torch``: gathered key tiles and one batched ``F.scaled_dot_product_attention`` (the CPU path, and the training
  path everywhere except CUDA); cost O(T x m x block_size), autograd through SDPA.
* ``flex``: ``torch.nn.attention.flex_attention`` with a ``BlockMask`` (compiled on CUDA; eager elsewhere, forward
  only, because FlexAttention has no CPU backward).
* ``reference``: dense masked softmax in the inputs' dtype (the oracle; materialises T x S).

``auto`` picks ``flex`` for CUDA tensors without dropout (FlexAttention has no attention dropout) and ``torch``
otherwise. All three compute the same function (tested against each other).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnzoo.errors import unknown
from attnzoo.kernels.sparse_attention.blocks import sparse_attention_blocks
from attnzoo.kernels.sparse_attention.flex import sparse_attention_flex
from attnzoo.kernels.sparse_attention.pattern import (
    BiasMod,
    BlockPattern,
    MaskMod,
    band_kv_blocks,
    band_pattern,
    num_blocks,
)
from attnzoo.kernels.sparse_attention.reference import check_kv_blocks, dense_mask, sparse_attention_reference

__all__ = [
    "SPARSE_BACKENDS",
    "BiasMod",
    "BlockPattern",
    "MaskMod",
    "band_kv_blocks",
    "band_pattern",
    "check_kv_blocks",
    "dense_mask",
    "num_blocks",
    "sparse_attention",
]

SPARSE_BACKENDS = ("auto", "flex", "reference", "torch")
_IMPLEMENTATIONS = {
    "flex": sparse_attention_flex,
    "reference": sparse_attention_reference,
    "torch": sparse_attention_blocks,
}


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: BlockPattern,
    *,
    key_mask: Tensor | None = None,
    bias_mod: BiasMod | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> Tensor:
    """Softmax attention restricted to a block-sparse pattern.

    Args:
        q: (B, T, H, D) queries, position i = index i of the pattern's queries.
        k: (B, S, H, D) keys.
        v: (B, S, H, Dv) values.
        pattern: the pattern over ``q_len == T`` queries and ``kv_len == S`` keys (:func:`band_pattern` for bands).
        key_mask: (B, S) bool, True = real key; padded keys get zero weight.
        bias_mod: optional additive logit bias ``(b, h, q_idx, kv_idx) -> float`` on broadcasting index tensors, added
            after ``scale`` (a relative position bias; FlexAttention's ``score_mod`` ``score + bias``).
        scale: logit scale, default D^-1/2.
        dropout_p: attention-probability dropout (pass 0.0 in eval); torch and reference backends only.
        backend: ``"auto"`` (flex on CUDA without dropout, else torch), ``"torch"``, ``"flex"`` or ``"reference"``.

    Returns:
        (B, T, H, Dv) in v's dtype. A query with no visible real key gets a zero output rather than NaN.

    Example:
        >>> q = k = v = torch.randn(1, 100, 2, 16)
        >>> pattern = band_pattern(100, 100, 7, 0, causal=True, block_size=32)  # causal window of 8
        >>> sparse_attention(q, k, v, pattern).shape
        torch.Size([1, 100, 2, 16])
    """
    _check(q, k, v, pattern, key_mask, dropout_p)
    chosen = _choose(backend, q, k, v, dropout_p)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _IMPLEMENTATIONS[chosen](q, k, v, pattern, key_mask, bias_mod, scale, float(dropout_p))


def _choose(backend: str, q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> str:
    if backend not in SPARSE_BACKENDS:
        raise ValueError("sparse_attention: " + unknown("backend", backend, SPARSE_BACKENDS))
    if backend == "auto":
        return "flex" if q.device.type == "cuda" and dropout_p == 0.0 else "torch"
    if backend == "flex":
        if dropout_p > 0.0:
            raise ValueError(
                f"sparse_attention: backend='flex' has no attention dropout; got dropout_p={dropout_p}. "
                "Use backend='torch' (or 'auto', which picks it when dropout is on)."
            )
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if q.device.type != "cuda" and needs_grad:
            raise ValueError(
                f"sparse_attention: backend='flex' on {q.device.type} tensors that require grad: FlexAttention has "
                "no backward off CUDA. Use backend='torch' (the CPU training path) or run under torch.no_grad()."
            )
    return backend


def _check(q: Tensor, k: Tensor, v: Tensor, pattern: BlockPattern, key_mask: Tensor | None, dropout_p: float) -> None:
    """Validate shapes once, reporting expected against got."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 4:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"sparse_attention: {name} must be a 4-D floating-point tensor (B, T|S, H, D); got {got}.")
    B, T, H, D = q.shape
    S = k.shape[1]
    if tuple(k.shape) != (B, S, H, D):
        raise ValueError(
            f"sparse_attention: k must have shape (B, S, H, D) = ({B}, S, {H}, {D}); got {tuple(k.shape)}."
        )
    if tuple(v.shape[:3]) != (B, S, H):
        raise ValueError(
            f"sparse_attention: v must have shape (B, S, H, Dv) = ({B}, {S}, {H}, Dv); got {tuple(v.shape)}."
        )
    if not isinstance(pattern, BlockPattern):
        raise TypeError(f"sparse_attention: pattern must be a BlockPattern; got {type(pattern).__name__}.")
    if (pattern.q_len, pattern.kv_len) != (T, S):
        raise ValueError(
            f"sparse_attention: the pattern was built for q_len={pattern.q_len}, kv_len={pattern.kv_len}, but q has "
            f"T={T} and k has S={S}; build the pattern for these lengths."
        )
    blocks = pattern.kv_blocks
    if blocks.dim() == 4 and (blocks.shape[0] not in (1, B) or blocks.shape[1] not in (1, H)):
        raise ValueError(
            f"sparse_attention: per-sequence kv_blocks must have shape (B|1, H|1, num_q_blocks, m) with B={B}, H={H}; "
            f"got {tuple(blocks.shape)}."
        )
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != (B, S)):
        raise ValueError(
            f"sparse_attention: key_mask must be a bool tensor of shape (B, S) = ({B}, {S}) (True = real key); "
            f"got {key_mask.dtype} {tuple(key_mask.shape)}."
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"sparse_attention: dropout_p must be in [0, 1); got {dropout_p}.")
