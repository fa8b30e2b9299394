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
        q_offset: position of the first query among the keys' (the cache length before this call; in causal_cross
            the bottom-right aligned position, negative when the first queries come before every key).
        window: with ``causal``, a query at p sees only keys in (p - window, p] (sliding-window attention).
        dropout_p: attention-probability dropout (pass 0.0 in eval).
        scale: logit scale, default D^-1/2.

    Returns:
        (B, T, H, Dv). A query with no visible real key gets a zero output rather than NaN.
    """
    T, S = q.shape[1], k.shape[1]
    if causal and window is not None and q_offset == 0 and T == S and 2 * window < T:
        return _banded(q, k, v, key_mask, window, dropout_p, scale)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    mask = None
    if causal and key_mask is None and window is None:
        if q_offset == 0 and T == S:
            out = F.scaled_dot_product_attention(qh, kh, vh, dropout_p=dropout_p, is_causal=True, scale=scale)
            return out.transpose(1, 2)
        if T == 1 and q_offset == S - 1:  # one decoding step: the newest query sees every key, no mask to build
            return F.scaled_dot_product_attention(qh, kh, vh, dropout_p=dropout_p, scale=scale).transpose(1, 2)
    if causal:
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


def _banded(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, window: int, dropout_p: float, scale: float | None
) -> Tensor:
    """Causal sliding-window attention in O(T · window): blocks of ``window`` queries attend to their own block and
    the one before (every key a query can see), under the band mask. Same result as the full masked form."""
    B, T, H = q.shape[:3]
    pad = (-T) % window
    if pad:  # padded keys are masked out below; padded queries are dropped
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
    n = (T + pad) // window

    def blocks(t: Tensor) -> Tensor:  # (B, T', H, D) -> (B, H, n, window, D)
        return t.view(B, n, window, H, t.shape[-1]).permute(0, 3, 1, 2, 4)

    def with_previous(t: Tensor) -> Tensor:  # (B, H, n, window, D) -> (B, H, n, 2 * window, D)
        return torch.cat([F.pad(t, (0, 0, 0, 0, 1, 0))[:, :, :-1], t], dim=3)

    qb, kb, vb = blocks(q), with_previous(blocks(k)), with_previous(blocks(v))
    offset = torch.arange(window, device=q.device)[:, None]  # query a of a block sits at key index window + a
    key = torch.arange(2 * window, device=q.device)[None, :]
    band = (key <= offset + window) & (key > offset)  # (window, 2 * window): keys in (p - window, p]
    real = torch.ones(B, T + pad, dtype=torch.bool, device=q.device) if key_mask is None else F.pad(key_mask, (0, pad))
    real[:, T:] = False
    real = with_previous(real.view(B, 1, n, window, 1)).transpose(-1, -2)  # (B, 1, n, 1, 2 * window)
    real[:, :, 0, :, :window] = False  # the first block has no block before it
    mask = band & real  # (B, 1, n, window, 2 * window)
    has_key = mask.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask | ~has_key, dropout_p=dropout_p, scale=scale)
    out = out * has_key.to(out.dtype)
    return out.permute(0, 2, 3, 1, 4).reshape(B, T + pad, H, -1)[:, :T]
