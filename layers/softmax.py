"""Softmax attention — Vaswani et al. 2017, "Attention Is All You Need", https://arxiv.org/abs/1706.03762

    o = softmax(q k^T * D^-1/2 + mask) v,   per head, heads concatenated, then proj

Parameter names are timm's (``qkv``, ``proj``, ``q_norm``, ``k_norm``; timm/layers/attention.py) so timm ViT weights
load without renaming; cross-attention splits the projection into ``q`` and ``kv``. Defaults follow timm's
``Attention`` (qkv_bias False, proj_bias True, qk_norm as LayerNorm over the head dim). RoPE (``rope=True``,
base 10000, RoFormer) rotates q and k by their own positions; in causal_cross a query takes the context position it
is aligned to (bottom-right: query i of T sits at i + S - T of S), in noncausal_cross it is a locality prior between
the two streams indexed from 0. The math runs through ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

from torch import Tensor, nn

from attnzoo.layers.cross import query_start, rotate_from
from attnzoo.layers.kv_cache import KVCache
from attnzoo.layers.registry import ALL_PATTERNS, Attention, register_attention
from attnzoo.layers.rope import RotaryEmbedding
from attnzoo.layers.sdpa import sdpa


@register_attention("softmax")
class SoftmaxAttention(Attention):
    """Multi-head softmax attention through SDPA, with optional RoPE and qk-norm; timm parameter names."""

    patterns = ALL_PATTERNS

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        qk_norm: bool = False,
        rope: bool = False,
        rope_base: float = 10000.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        """
        Args:
            dim: model width.
            num_heads: heads; head_dim = dim // num_heads.
            causal: query i sees keys j <= i.
            cross: keys/values from ``context``.
            qkv_bias: bias in the q/k/v projection (timm default False; ViTs use True).
            proj_bias: bias in the output projection.
            qk_norm: LayerNorm over the head dim on q and k (ViT-22B).
            rope: rotary position embedding on q and k.
            rope_base: RoPE frequency base.
            attn_drop: dropout on attention probabilities (training only).
            proj_drop: dropout after the output projection.
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        if cross:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.rope = RotaryEmbedding(self.head_dim, rope_base) if rope else None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def project(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, T, H, D) from ``x``; k, v (B, S, H, D) from ``context`` (cross) or ``x``."""
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        if self.cross:
            k, v = self.kv(context).view(B, context.shape[1], 2, H, D).unbind(2)  # (B, S, H, D) each
            return self.q(x).view(B, T, H, D), k, v
        q, k, v = self.qkv(x).view(B, T, 3, H, D).unbind(2)  # (B, T, H, D) each
        return q, k, v

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, *, padding_mask: Tensor | None = None, cache: KVCache | None = None
    ) -> Tensor:
        """qk-norm, RoPE at the cache's offset, the cache update and masked SDPA: (B, T, H, D).

        Positions count keys: the cache's length is the keys (context positions, in cross) it holds. In causal_cross
        the first query sits at context position ``aligned_start`` (bottom-right alignment, possibly negative).
        """
        q, k = self.q_norm(q), self.k_norm(k)
        offset = cache.length if cache is not None else 0  # keys before this call's first key
        q_offset = query_start(q.shape[1], k.shape[1], offset, causal=self.causal, cross=self.cross, name=self.name)
        if self.rope is not None:
            q, k = rotate_from(self.rope, q, q_offset), self.rope(k, offset)
        key_mask = padding_mask
        if cache is not None:
            k, v, key_mask = cache.update(k, v, padding_mask)
        dropout_p = self.attn_drop if self.training else 0.0
        return sdpa(q, k, v, causal=self.causal, key_mask=key_mask, q_offset=q_offset, dropout_p=dropout_p)

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        self.check_inputs(x, context, padding_mask, cache)
        B, T, _ = x.shape
        q, k, v = self.project(x, context)
        o = self.attend(q, k, v, padding_mask=padding_mask, cache=cache)  # (B, T, H, D)
        return self.proj_drop(self.proj(o.reshape(B, T, self.dim)))

    def new_cache(self, batch_size: int) -> KVCache:
        if not self.causal:
            return super().new_cache(batch_size)  # raises: only causal layers decode
        return KVCache(batch_size)

    def state_size(self, seq_len: int) -> int:
        return 2 * seq_len * self.dim  # keys and values of every head
