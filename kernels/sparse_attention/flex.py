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

from attnzoo.kernels.sparse_attention.pattern import BiasMod, BlockPattern, num_blocks


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


# The compiled kernel walks a BlockMask in tiles of 128 (or 64) queries and keys, and its sparse blocks must be whole
# multiples of those tiles; a pattern cut into other blocks (a Swin window of 49, a stride of 24) is therefore
# re-blocked onto a coarser grid of FLEX_BLOCK_SIZE whose blocks hold every fine block listed, while mask_mod keeps
# the pattern exact inside them.
FLEX_BLOCK_SIZE = 128


def flex_block_size(block_size: int) -> int:
    """The BlockMask block size for a pattern of ``block_size``: itself if a multiple of 128, else 128."""
    return block_size if block_size % FLEX_BLOCK_SIZE == 0 else FLEX_BLOCK_SIZE


def coarse_kv_blocks(pattern: BlockPattern, coarse: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """The pattern's listed key blocks on a grid of ``coarse`` positions per block.

    A coarse query block lists every coarse key block that overlaps a fine key block listed for any fine query block
    overlapping it. Returns ``(kv_num_blocks, kv_indices)`` as ``BlockMask.from_kv_blocks`` takes them, int32 of
    shapes (B|1, H|1, nqc) and (B|1, H|1, nqc, nkc), the listed blocks first in increasing order.
    """
    blocks = pattern.kv_blocks.to(device) if device is not None else pattern.kv_blocks
    if blocks.dim() == 2:
        blocks = blocks[None, None]
    fine, dev = pattern.block_size, blocks.device
    nqc, nkc = num_blocks(pattern.q_len, coarse), num_blocks(pattern.kv_len, coarse)

    def spans(first: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """Coarse blocks covered by fine blocks ``first`` (clamped to ``length``): (index, valid), one more dim."""
        start = first * fine // coarse
        end = (torch.clamp((first + 1) * fine, max=length) - 1) // coarse
        width = (fine + coarse - 2) // coarse + 1  # most coarse blocks one fine block can touch
        index = start[..., None] + torch.arange(width, device=dev)
        return index, index <= end[..., None]

    listed = blocks >= 0
    key_index, key_valid = spans(blocks.clamp(min=0), pattern.kv_len)  # (B, H, nqb, m, wk)
    key_valid &= listed[..., None]
    query_index, query_valid = spans(torch.arange(blocks.shape[-2], device=dev), pattern.q_len)  # (nqb, wq)
    # every (coarse query block, coarse key block) pair; invalid pairs land in a spill column nkc, dropped after
    keys, keys_valid = key_index.flatten(-2)[..., None, :], key_valid.flatten(-2)[..., None, :]  # (B, H, nqb, 1, m wk)
    cell = query_index[:, :, None] * (nkc + 1) + keys  # (B, H, nqb, wq, m wk)
    valid = query_valid[:, :, None] & keys_valid
    cell = torch.where(valid, cell, nkc)  # (B, H, nqb, wq, m * wk)
    dense = torch.zeros(*blocks.shape[:2], nqc * (nkc + 1), dtype=torch.bool, device=dev)
    dense.scatter_(-1, cell.flatten(2), True)
    dense = dense.view(*blocks.shape[:2], nqc, nkc + 1)[..., :nkc]
    kv_num_blocks = dense.sum(-1).to(torch.int32)
    # listed blocks first, each row in increasing block order (a stable sort on "not listed")
    kv_indices = torch.sort((~dense).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return kv_num_blocks.contiguous(), kv_indices.contiguous()


def block_mask_from_pattern(pattern: BlockPattern, key_mask: Tensor | None, batch_size: int, num_heads: int, device):
    """The ``BlockMask`` of ``pattern`` (re-blocked to :func:`flex_block_size`, the key padding mask folded into its
    mask_mod)."""
    from torch.nn.attention.flex_attention import BlockMask

    coarse = flex_block_size(pattern.block_size)
    kv_num_blocks, kv_indices = coarse_kv_blocks(pattern, coarse, device)
    mask_mod = pattern.mask_mod
    if key_mask is not None:
        pattern_mask = mask_mod

        def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return pattern_mask(b, h, q_idx, kv_idx) & key_mask[b, kv_idx]

    return BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices,
        BLOCK_SIZE=coarse,
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
