"""Dense masked softmax attention from a pattern's ``mask_mod``: the oracle (any dtype, float64 in tests).

It evaluates the full (B, H, T, S) mask and score matrix, so it is for small shapes only (tests and baselines).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnzoo.kernels.sparse_attention.pattern import BiasMod, BlockPattern


def dense_mask(pattern: BlockPattern, batch_size: int = 1, num_heads: int = 1, device=None) -> Tensor:
    """``mask_mod`` evaluated on every (query, key) pair: bool (B|1, H|1, T, S), True = may attend. Test oracle only."""
    b = torch.arange(batch_size, device=device).view(-1, 1, 1, 1)
    h = torch.arange(num_heads, device=device).view(1, -1, 1, 1)
    q_idx = torch.arange(pattern.q_len, device=device).view(1, 1, -1, 1)
    kv_idx = torch.arange(pattern.kv_len, device=device).view(1, 1, 1, -1)
    mask = pattern.mask_mod(b, h, q_idx, kv_idx)
    return torch.broadcast_to(mask, torch.broadcast_shapes(mask.shape, (1, 1, pattern.q_len, pattern.kv_len)))


def check_kv_blocks(pattern: BlockPattern, batch_size: int = 1, num_heads: int = 1) -> None:
    """Raise ``ValueError`` if ``mask_mod`` allows a pair outside the key blocks listed for its query block.

    Evaluates the dense mask, so it is a test helper for small shapes.
    """
    mask = dense_mask(pattern, batch_size, num_heads, device=pattern.kv_blocks.device)
    bs, T, S = pattern.block_size, pattern.q_len, pattern.kv_len
    nqb, nkb = pattern.num_q_blocks, pattern.num_kv_blocks
    blocks = pattern.kv_blocks
    listed = torch.zeros(*blocks.shape[:-1], nkb + 1, dtype=torch.bool, device=blocks.device)
    listed.scatter_(-1, torch.where(blocks < 0, nkb, blocks), True)  # slot nkb collects the -1 entries
    listed = listed[..., :nkb].repeat_interleave(bs, dim=-2)[..., :T, :].repeat_interleave(bs, dim=-1)[..., :S]
    if listed.dim() == 2:
        listed = listed[None, None]
    outside = mask & ~listed
    if outside.any():
        b, h, i, j = (int(x) for x in outside.nonzero()[0])
        raise ValueError(
            f"kv_blocks misses allowed pairs: e.g. batch {b}, head {h}, query {i} (block {i // bs} of {nqb}) may "
            f"attend key {j} (block {j // bs}), which is not listed for that query block."
        )


def sparse_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: BlockPattern,
    key_mask: Tensor | None,
    bias_mod: BiasMod | None,
    scale: float,
    dropout_p: float,
) -> Tensor:
    """q (B, T, H, D), k (B, S, H, D), v (B, S, H, Dv) -> (B, T, H, Dv) in the inputs' dtype; no-key rows are zero."""
    B, _, H, _ = q.shape
    mask = dense_mask(pattern, B, H, device=q.device)  # (B|1, H|1, T, S)
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :]
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale  # (B, H, T, S)
    if bias_mod is not None:
        scores = scores + _dense_bias(bias_mod, pattern, B, H, q.device).to(scores.dtype)
    scores = scores.masked_fill(~mask, float("-inf"))
    has_key = mask.any(dim=-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1) * has_key
    if dropout_p > 0.0:
        weights = torch.nn.functional.dropout(weights, dropout_p)
    return torch.einsum("bhts,bshd->bthd", weights, v)


def _dense_bias(bias_mod: BiasMod, pattern: BlockPattern, B: int, H: int, device) -> Tensor:
    b = torch.arange(B, device=device).view(-1, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, -1, 1, 1)
    q_idx = torch.arange(pattern.q_len, device=device).view(1, 1, -1, 1)
    kv_idx = torch.arange(pattern.kv_len, device=device).view(1, 1, 1, -1)
    return bias_mod(b, h, q_idx, kv_idx)
