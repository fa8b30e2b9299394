"""The torch lowering of a block-sparse pattern: gathered key tiles and one batched SDPA call (the CPU path).

Per query block n the key/value blocks listed in ``kv_blocks[n]`` are gathered into a tile of m * block_size keys,
``mask_mod`` is evaluated on the gathered absolute indices (and ANDed with the key padding mask and the unused -1
slots), and ``F.scaled_dot_product_attention`` runs over (B, H, num_q_blocks, block_size, m * block_size). Cost and
memory grow with T x m * block_size, never T x S; autograd goes through the gather and SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnzoo.kernels.sparse_attention.pattern import BiasMod, BlockPattern


def sparse_attention_blocks(
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
    B, T, H, D = q.shape
    S, Dv = k.shape[1], v.shape[-1]
    bs, nqb, nkb = pattern.block_size, pattern.num_q_blocks, pattern.num_kv_blocks
    dev = q.device
    q_pad, kv_pad = nqb * bs - T, nkb * bs - S
    qb = F.pad(q, (0, 0, 0, 0, 0, q_pad)).view(B, nqb, bs, H, D).permute(0, 3, 1, 2, 4)  # (B, H, nqb, bs, D)
    kb = F.pad(k, (0, 0, 0, 0, 0, kv_pad)).view(B, nkb, bs, H, D).permute(0, 3, 1, 2, 4)  # (B, H, nkb, bs, D)
    vb = F.pad(v, (0, 0, 0, 0, 0, kv_pad)).view(B, nkb, bs, H, Dv).permute(0, 3, 1, 2, 4)

    blocks = pattern.kv_blocks.to(dev)
    listed = blocks >= 0
    blocks = blocks.clamp(min=0)  # unused slots read block 0 and are masked out below
    m = blocks.shape[-1]
    offsets = torch.arange(bs, device=dev)
    kv_idx = (blocks[..., None] * bs + offsets).flatten(-2)  # (nqb, m*bs) or (B, H, nqb, m*bs)
    real = (listed[..., None] & (kv_idx.view(*blocks.shape, bs) < S)).flatten(-2)  # key exists and slot is used
    if blocks.dim() == 2:
        k_tile = kb[:, :, blocks].flatten(3, 4)  # (B, H, nqb, m*bs, D)
        v_tile = vb[:, :, blocks].flatten(3, 4)
        kv_idx, real = kv_idx[None, None], real[None, None]  # (1, 1, nqb, m*bs)
    else:
        flat = blocks.expand(B, H, nqb, m).reshape(B, H, nqb * m)
        k_tile = _gather_blocks(kb, flat).view(B, H, nqb, m * bs, D)
        v_tile = _gather_blocks(vb, flat).view(B, H, nqb, m * bs, Dv)
        kv_idx, real = kv_idx.expand(B, H, nqb, m * bs), real.expand(B, H, nqb, m * bs)
    b = torch.arange(B, device=dev).view(B, 1, 1, 1, 1)
    if key_mask is not None:
        padded_keys = F.pad(key_mask, (0, kv_pad))  # (B, nkb*bs), False beyond S
        real = real & padded_keys[b[..., 0], kv_idx]  # (B, H|1, nqb, m*bs)
    h = torch.arange(H, device=dev).view(1, H, 1, 1, 1)
    q_idx = (torch.arange(nqb, device=dev)[:, None] * bs + offsets).view(1, 1, nqb, bs, 1)
    k_idx = kv_idx[..., None, :]  # (., ., nqb, 1, m*bs)
    mask = pattern.mask_mod(b, h, q_idx, k_idx) & real[..., None, :]  # (B|1, H|1, nqb, bs, m*bs)
    has_key = mask.any(dim=-1, keepdim=True)
    if bias_mod is None:
        attn_mask = mask | ~has_key  # a row with no key would be softmax over nothing: let it see all, zero it below
    else:
        bias = bias_mod(b, h, q_idx, k_idx).to(qb.dtype)
        attn_mask = bias.masked_fill(~(mask | ~has_key), float("-inf"))
    out = F.scaled_dot_product_attention(qb, k_tile, v_tile, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    out = out * has_key.to(out.dtype)  # (B, H, nqb, bs, Dv)
    return out.permute(0, 2, 3, 1, 4).reshape(B, nqb * bs, H, Dv)[:, :T]


def _gather_blocks(x: Tensor, blocks: Tensor) -> Tensor:
    """x (B, H, nkb, bs, D), blocks (B, H, n) long -> (B, H, n, bs, D): per batch and head, x[b, h, blocks[b, h]]."""
    B, H, _, bs, D = x.shape
    index = blocks[..., None, None].expand(B, H, blocks.shape[-1], bs, D)
    return torch.gather(x, 2, index)
