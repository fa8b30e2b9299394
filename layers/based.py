"""Based (Taylor linear attention) — Arora et al. 2024, "Simple linear attention language models balance the
recall-throughput tradeoff", https://arxiv.org/abs/2402.18668

    phi(x) = [1, x / d'^(1/4), vec(x x^T) / sqrt(2 d')]        (x in R^d', d' = feature_dim)
    phi(q) . phi(k) = 1 + s + s^2 / 2,   s = q . k / sqrt(d')    (2nd-order Taylor of exp(s); always >= 1/2)
    o_i = sum_j phi(q_i) . phi(k_j) v_j / (sum_j phi(q_i) . phi(k_j) + eps)

with j <= i for causal_self, j <= i + S - T for causal_cross (bottom-right aligned, :mod:`attnzoo.layers.cross`),
all j otherwise. q and k are projected to H x d' (no bias), v to dim, as in
HazyResearch/based and fla's ``fla/layers/based.py``. The full map has 1 + d' + d'^2 features (273 at d' = 16, the
HazyResearch form); ``compact_features`` keeps the upper triangle of x x^T (diagonal x_i^2 / sqrt(2 d'), off-diagonal
x_i x_j / sqrt(d') for i < j: 1 + 16 + 136 = 153 features, fla's TaylorFeatureMap), which gives the same kernel and
so the same outputs with a smaller state. Defaults: feature_dim 16 and eps 1e-12 from HazyResearch/based
(``based/models/mixers/linear_attention.py``). The Based *architecture* alternates this layer with exact
sliding-window softmax (``sliding_window``): ``GPT(..., attention=["sliding_window", "based"])``. It runs
through :func:`attnzoo.kernels.linear_attn`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from attnzoo.kernels.numerics import into
from attnzoo.layers.linear import LinearAttentionCache, feature_linear_attention
from attnzoo.layers.registry import ALL_PATTERNS, Attention, register_attention


@functools.lru_cache(maxsize=16)
def _quadratic_terms(
    feature_dim: int, compact: bool, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Tables of the quadratic features w_ij x_i x_j, in the map's order (compact: the diagonal, then the pairs i < j
    row by row; full: every (i, j) row-major):

    * ``weights`` (P,): each feature's scale w_ij, in ``dtype``;
    * ``feature_of`` (d'^2,), ``coefficients`` (d'^2,): for the backward, dL/dx_a = sum_b M_ab x_b with
      M_ab = ``coefficients[a d' + b] * g[feature_of[a d' + b]]`` (g: the features' gradient). Compact: (a, b) and
      (b, a) read the same feature, the diagonal with weight 2 (d(x_a^2) = 2 x_a dx_a). The full map has both
      x_a x_b and x_b x_a, which the backward adds itself (``feature_of`` is then the identity).
    """
    d = feature_dim
    if compact:
        upper_i, upper_j = torch.triu_indices(d, d, offset=1)
        rows, cols = torch.cat([torch.arange(d), upper_i]), torch.cat([torch.arange(d), upper_j])
        diagonal, off_diagonal = torch.full((d,), 2 * d, dtype=dtype), torch.full((len(upper_i),), d, dtype=dtype)
        weights = torch.cat([diagonal, off_diagonal]).rsqrt()
        feature_of = torch.empty(d, d, dtype=torch.long)
        feature_of[rows, cols] = torch.arange(len(rows))
        feature_of[cols, rows] = torch.arange(len(rows))
        coefficients = weights[feature_of] * (1 + torch.eye(d, dtype=dtype))
    else:
        weights = torch.full((d * d,), 2 * d, dtype=dtype).rsqrt()
        feature_of = torch.arange(d * d)
        coefficients = weights
    return weights.to(device), feature_of.flatten().to(device), coefficients.flatten().to(device)


class _TaylorFeatures(torch.autograd.Function):
    """The Taylor map with a hand-written backward. Autograd of an outer product and a gather of its upper triangle
    scatters the gradient back through a zero-filled (..., d', d') buffer: a third of the based layer's fwd + bwd at
    T = 1024 (measured). Here the forward writes the products straight into the output, one slice per row of the
    triangle, and the backward is one gather and a d' x d' contraction per token."""

    @staticmethod
    def forward(ctx, x: Tensor, compact: bool) -> Tensor:
        d = x.shape[-1]
        weights, _, _ = _quadratic_terms(d, compact, x.dtype, x.device)
        out = x.new_empty(*x.shape[:-1], 1 + d + len(weights))
        rows, features = x.reshape(-1, d), out.view(-1, out.shape[-1])  # 2-d: slicing a 4-d view costs 3x (measured)
        features[:, 0] = 1
        into(features[:, 1 : 1 + d], torch.mul, rows, d**-0.25)
        quadratic = features[:, 1 + d :]
        if compact:
            into(quadratic[:, :d], torch.mul, rows, rows)
            start = d
            for i in range(d - 1):  # row i of the strict upper triangle: x_i x_j for j > i
                into(quadratic[:, start : start + d - 1 - i], torch.mul, rows[:, i : i + 1], rows[:, i + 1 :])
                start += d - 1 - i
        else:
            into(quadratic.unflatten(-1, (d, d)), torch.mul, rows[:, :, None], rows[:, None, :])
        quadratic.mul_(weights)
        ctx.save_for_backward(x)
        ctx.compact = compact
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        d = x.shape[-1]
        _, feature_of, coefficients = _quadratic_terms(d, ctx.compact, x.dtype, x.device)
        rows, grad = x.reshape(-1, d), grad.reshape(-1, grad.shape[-1])
        quadratic = grad[:, 1 + d :]
        if ctx.compact:  # gather, not index_select: 3x faster along the last dim (measured)
            matrix = torch.gather(quadratic, 1, feature_of.expand(len(rows), -1))
        else:
            square = quadratic.unflatten(-1, (d, d))
            matrix = (square + square.transpose(-1, -2)).flatten(-2)
        matrix.mul_(coefficients)
        dx = (matrix.unflatten(-1, (d, d)) * rows[:, None, :]).sum(-1)
        return dx.add_(grad[:, 1 : 1 + d], alpha=d**-0.25).view_as(x), None


def taylor_feature_map(x: Tensor, compact: bool = True) -> Tensor:
    """2nd-order Taylor features of x (..., d'): (..., 1 + d' + d'(d'+1)/2) if ``compact``, else (..., 1 + d' + d'^2).

    Computed in float32 at least: the squares of bf16 values lose too much before they enter the float32 state.
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return _TaylorFeatures.apply(x, compact)


def taylor_num_features(feature_dim: int, compact: bool = True) -> int:
    return 1 + feature_dim + (feature_dim * (feature_dim + 1) // 2 if compact else feature_dim**2)


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
        cache: LinearAttentionCache | None = None,
    ) -> Tensor:
        self.check_inputs(x, context, padding_mask, cache)
        B, T, _ = x.shape
        H, D, Fd = self.num_heads, self.head_dim, self.feature_dim
        source = context if self.cross else x
        S = source.shape[1]
        q = taylor_feature_map(self.q_proj(x).view(B, T, H, Fd), self.compact_features)  # (B, T, H, F)
        k = taylor_feature_map(self.k_proj(source).view(B, S, H, Fd), self.compact_features)  # (B, S, H, F)
        v = self.v_proj(source).view(B, S, H, D)  # (B, S, H, D)
        o = feature_linear_attention(self, q, k, v, padding_mask, cache)
        return self.o_proj(o.reshape(B, T, self.dim))

    def new_cache(self, batch_size: int) -> LinearAttentionCache:
        if not self.causal:
            return super().new_cache(batch_size)  # raises: only causal layers decode
        return LinearAttentionCache(batch_size)

    def state_size(self, seq_len: int) -> int:
        return self.num_heads * self.num_features * (self.head_dim + 1)  # S and z per head, independent of seq_len

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feature_dim={self.feature_dim}, num_features={self.num_features}"
