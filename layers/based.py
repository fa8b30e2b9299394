"""Based (Taylor linear attention) — Arora et al. 2024, "Simple linear attention language models balance the
recall-throughput tradeoff", https://arxiv.org/abs/2402.18668

    phi(x) = [1, x / d'^(1/4), vec(x x^T) / sqrt(2 d')]        (x in R^d', d' = feature_dim)
    phi(q) . phi(k) = 1 + s + s^2 / 2,   s = q . k / sqrt(d')    (2nd-order Taylor of exp(s); always >= 1/2)
    o_i = sum_j phi(q_i) . phi(k_j) v_j / (sum_j phi(q_i) . phi(k_j) + eps)

with j <= i for causal patterns, all j otherwise. q and k are projected to H x d' (no bias), v to dim, as in
HazyResearch/based and fla's ``fla/layers/based.py``. The full map has 1 + d' + d'^2 features (273 at d' = 16, the
HazyResearch form); ``compact_features`` keeps the upper triangle of x x^T (diagonal x_i^2 / sqrt(2 d'), off-diagonal
x_i x_j / sqrt(d') for i < j: 1 + 16 + 136 = 153 features, fla's TaylorFeatureMap), which gives the same kernel and
so the same outputs with a smaller state. Defaults: feature_dim 16 and eps 1e-12 from HazyResearch/based
(``based/models/mixers/linear_attention.py``). The Based *architecture* alternates this layer with exact
sliding-window softmax (``sliding_window``): ``GPT(..., attention=["sliding_window", "based"])``. Math:
specs/attention.md §7.2. Runs through :func:`attnzoo.kernels.linear_attn`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnzoo.kernels import linear_attn
from attnzoo.layers.registry import ALL_PATTERNS, Attention, register_attention


def taylor_feature_map(x: Tensor, compact: bool = True) -> Tensor:
    """2nd-order Taylor features of x (..., d'): (..., 1 + d' + d'(d'+1)/2) if ``compact``, else (..., 1 + d' + d'^2).

    Computed in float32 at least: the squares of bf16 values lose too much before they enter the float32 state.
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    d = x.shape[-1]
    outer = x[..., :, None] * x[..., None, :]  # (..., d', d')
    if compact:
        i, j = torch.triu_indices(d, d, offset=1, device=x.device)
        # diagonal x_i^2 / sqrt(2 d'); each off-diagonal pair appears once with weight 1/sqrt(d') instead of twice
        quadratic = torch.cat(
            [outer.diagonal(dim1=-2, dim2=-1) / math.sqrt(2 * d), outer[..., i, j] / math.sqrt(d)], dim=-1
        )
    else:
        quadratic = outer.flatten(-2) / math.sqrt(2 * d)
    return torch.cat([torch.ones_like(x[..., :1]), x / d**0.25, quadratic], dim=-1)


def taylor_num_features(feature_dim: int, compact: bool = True) -> int:
    return 1 + feature_dim + (feature_dim * (feature_dim + 1) // 2 if compact else feature_dim**2)


@dataclass
class BasedCache:
    """Constant-size decoding state: per head S (F x V) and z (F), stored as (B, H, F, V + 1) float32."""

    batch_size: int
    state: Tensor | None = None  # (B, H, F, V + 1), last column = z; allocated by the first forward
    length: int = 0


@register_attention("based")
class BasedAttention(Attention):
    """Based: linear attention with 2nd-order Taylor features of exp (Arora et al. 2024); constant-size state."""

    patterns = ALL_PATTERNS

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        feature_dim: int = 16,
        eps: float = 1e-12,
        compact_features: bool = True,
    ) -> None:
        """
        Args:
            dim: model width.
            num_heads: heads; values use head_dim = dim // num_heads.
            causal: query i sees keys j <= i.
            cross: keys/values from ``context``.
            feature_dim: d', the projected q/k width per head before the Taylor map (HazyResearch/based: 16).
            eps: added to the denominator (HazyResearch/based: 1e-12; the kernel is >= 1/2 per key anyway).
            compact_features: use the 1 + d' + d'(d'+1)/2 map (fla) instead of 1 + d' + d'^2 (HazyResearch); same
                outputs, smaller state.
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        if not isinstance(feature_dim, int) or feature_dim <= 0:
            raise ValueError(f"based: feature_dim must be a positive int; got {feature_dim!r}.")
        if not eps >= 0:
            raise ValueError(f"based: eps must be >= 0; got {eps!r}.")
        self.feature_dim = feature_dim
        self.eps = eps
        self.compact_features = compact_features
        self.num_features = taylor_num_features(feature_dim, compact_features)
        self.q_proj = nn.Linear(dim, num_heads * feature_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_heads * feature_dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: BasedCache | None = None,
    ) -> Tensor:
        self.check_inputs(x, context, padding_mask, cache)
        B, T, _ = x.shape
        H, D, Fd = self.num_heads, self.head_dim, self.feature_dim
        source = context if self.cross else x
        S = source.shape[1]
        q = taylor_feature_map(self.q_proj(x).view(B, T, H, Fd), self.compact_features)  # (B, T, H, F)
        k = taylor_feature_map(self.k_proj(source).view(B, S, H, Fd), self.compact_features)  # (B, S, H, F)
        v = self.v_proj(source).view(B, S, H, D)  # (B, S, H, D)
        if padding_mask is not None:  # zero the key features (incl. the constant 1): no trace in S or z
            k = k * padding_mask[:, :, None, None]
        o, state = linear_attn(
            q,
            k,
            v,
            causal=self.causal,
            eps=self.eps,
            initial_state=None if cache is None else cache.state,
            output_final_state=cache is not None,
        )
        if cache is not None:
            cache.state, cache.length = state, cache.length + T
        return self.o_proj(o.reshape(B, T, self.dim))

    def new_cache(self, batch_size: int) -> BasedCache:
        if not self.causal:
            return super().new_cache(batch_size)  # raises: only causal layers decode
        return BasedCache(batch_size)

    def state_size(self, seq_len: int) -> int:
        return self.num_heads * self.num_features * (self.head_dim + 1)  # S and z per head, independent of seq_len

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feature_dim={self.feature_dim}, num_features={self.num_features}"
