"""Scaled dot-product attention with the contract's masks: causal offset for cached decoding and key padding.

All softmax-family layers (softmax, gated_softmax, moh, sliding_window) attend through :func:`sdpa`, so the masking
rules live in one place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    key_mask: Tensor | None = None,
    q_offset: int = 0,
    window: int | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> Tensor:
    """Softmax attention in the (B, T, H, D) layout.

    Args:
        q: (B, T, H, D) queries at absolute positions ``q_offset .. q_offset + T - 1``.
        k: (B, S, H, D) keys at positions ``0 .. S - 1``.
        v: (B, S, H, Dv) values.
        causal: query at position p sees keys at positions <= p.
        key_mask: (B, S) bool, True = real key; padded keys get zero weight.
        q_offset: position of the first query (the cache length before this call).
        window: with ``causal``, a query at p sees only keys in (p - window, p] (sliding-window attention).
        dropout_p: attention-probability dropout (pass 0.0 in eval).
        scale: logit scale, default D^-1/2.

    Returns:
        (B, T, H, Dv). A query with no visible real key gets a zero output rather than NaN.
    """
    T, S = q.shape[1], k.shape[1]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    mask = None
    if causal:
        if key_mask is None and window is None and q_offset == 0 and T == S:
            out = F.scaled_dot_product_attention(qh, kh, vh, dropout_p=dropout_p, is_causal=True, scale=scale)
            return out.transpose(1, 2)
        q_pos = torch.arange(q_offset, q_offset + T, device=q.device)[:, None]  # (T, 1)
        k_pos = torch.arange(S, device=q.device)[None, :]  # (1, S)
        mask = k_pos <= q_pos
        if window is not None:
            mask = mask & (k_pos > q_pos - window)
    if key_mask is not None:
        padded = key_mask[:, None, None, :]  # (B, 1, 1, S)
        mask = padded if mask is None else mask & padded
    if mask is None:
        out = F.scaled_dot_product_attention(qh, kh, vh, dropout_p=dropout_p, scale=scale)
        return out.transpose(1, 2)
    # a row with no visible key would be softmax over nothing (NaN): let it attend anywhere, then zero it
    has_key = mask.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask | ~has_key, dropout_p=dropout_p, scale=scale)
    out = out * has_key.to(out.dtype)
    return out.transpose(1, 2)
