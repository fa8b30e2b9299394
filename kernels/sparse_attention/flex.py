"""The FlexAttention lowering of a block-sparse pattern (the CUDA path).

``kv_blocks`` becomes a ``BlockMask`` (``BlockMask.from_kv_blocks``: listed blocks first, the -1 slots dropped), the
pattern's ``mask_mod`` (ANDed with the key padding mask) masks inside the blocks and ``bias_mod`` becomes an additive
``score_mod``. On CUDA ``flex_attention`` is compiled once (the fused kernel); elsewhere it runs eagerly, which
materialises the scores and has no backward on CPU, so it is a test of the lowering there, never a training path.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from attnzoo.kernels.sparse_attention.pattern import BiasMod, BlockPattern


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def block_mask_from_pattern(pattern: BlockPattern, key_mask: Tensor | None, batch_size: int, num_heads: int, device):
    """The ``BlockMask`` of ``pattern`` (with the key padding mask folded into its mask_mod)."""
    from torch.nn.attention.flex_attention import BlockMask

    blocks = pattern.kv_blocks.to(device)
    if blocks.dim() == 2:
        blocks = blocks[None, None]
    blocks = blocks.expand(batch_size if blocks.shape[0] != 1 else 1, blocks.shape[1], -1, -1)
    listed = blocks >= 0
    past_end = pattern.num_kv_blocks  # sorts the unused slots last, then they become block 0 beyond kv_num_blocks
    ordered = torch.where(listed, blocks, past_end).sort(dim=-1).values
    kv_indices = torch.where(ordered == past_end, 0, ordered).to(torch.int32).contiguous()
    kv_num_blocks = listed.sum(dim=-1).to(torch.int32).contiguous()
    mask_mod = pattern.mask_mod
    if key_mask is not None:
        pattern_mask = mask_mod

        def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return pattern_mask(b, h, q_idx, kv_idx) & key_mask[b, kv_idx]

    return BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices,
        BLOCK_SIZE=pattern.block_size,
        mask_mod=mask_mod,
        seq_lengths=(pattern.q_len, pattern.kv_len),
    )


def sparse_attention_flex(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: BlockPattern,
    key_mask: Tensor | None,
    bias_mod: BiasMod | None,
    scale: float,
    dropout_p: float,
) -> Tensor:
    """q (B, T, H, D), k (B, S, H, D), v (B, S, H, Dv) -> (B, T, H, Dv); a query with no visible key gets zeros."""
    from torch.nn.attention.flex_attention import flex_attention

    B, _, H, _ = q.shape
    block_mask = block_mask_from_pattern(pattern, key_mask, B, H, q.device)
    score_mod = None
    if bias_mod is not None:

        def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return score + bias_mod(b, h, q_idx, kv_idx).to(score.dtype)

    run = _compiled_flex_attention() if q.device.type == "cuda" else flex_attention
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    out = run(qh, kh, vh, score_mod=score_mod, block_mask=block_mask, scale=scale)  # (B, H, T, Dv)
    return out.transpose(1, 2)
