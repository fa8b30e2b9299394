"""Linear attention — Katharopoulos et al. 2020, "Transformers are RNNs: Fast Autoregressive Transformers with Linear
Attention", https://arxiv.org/abs/2006.16236

    phi(x) = elu(x) + 1  (> 0)
    o_i = phi(q_i) S / (phi(q_i) . z + eps),   S = sum_j phi(k_j)^T v_j,   z = sum_j phi(k_j)

with the sums over j <= i for causal patterns (streaming: S_t = S_{t-1} + phi(k_t)^T v_t, z_t = z_{t-1} + phi(k_t);
causal_cross: j <= i + S - T, bottom-right aligned, :mod:`attnzoo.layers.cross`), over all keys otherwise. No
1/sqrt(D) scale (the paper's form; a scale on q would cancel in the ratio except against eps). Defaults: eps = 1e-6
(paper / fast-transformers), projections with bias as fast-transformers' AttentionLayer (``nn.Linear`` defaults).
Padded keys get zero features, so they leave both S and z untouched. The math runs through
:func:`attnzoo.kernels.linear_attn` (chunked on CPU, O(T) time and memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnzoo.kernels import linear_attn
from attnzoo.layers.cross import aligned_causal_linear_attn, aligned_start
from attnzoo.layers.registry import ALL_PATTERNS, Attention, register_attention


def elu_feature_map(x: Tensor) -> Tensor:
    """phi(x) = elu(x) + 1, computed in float32 at least (it feeds float32 state sums).

    Written as x + 1 for x > 0 and exp(x) otherwise: the same function, but ``(exp(x) - 1) + 1`` rounds to 0 below
    x ~ -17 in float32, while exp(x) stays positive (and relatively exact) down to its underflow.
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return torch.where(x > 0, x + 1, torch.exp(x.clamp(max=0)))


@dataclass
class LinearAttentionCache:
    """Constant-size decoding state of a feature-map linear attention: per head S (F x V) and z (F), stored together
    as (B, H, F, V + 1) float32 (F = the feature count: head_dim for ``linear``)."""

    batch_size: int
    state: Tensor | None = None  # (B, H, K, V + 1), last column = z; allocated by the first forward
    length: int = 0  # key positions consumed (context positions in causal_cross)


def feature_linear_attention(
    layer: Attention,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    padding_mask: Tensor | None,
    cache: LinearAttentionCache | None,
) -> Tensor:
    """``o_t = phi(q_t) S_t / (phi(q_t) . z_t + eps)`` for every pattern of ``layer``, on features already mapped.

    The shared core of the feature-map layers (``linear``, ``based``, ``hedgehog``): q (B, T, H, F) and k (B, S, H, F)
    are phi(q), phi(k) (non-negative), v (B, S, H, V). Padded keys have their features zeroed, so they add nothing to
    S or z; ``causal_cross`` is aligned bottom-right (:mod:`attnzoo.layers.cross`); with a cache the state is read,
    advanced and stored back. Uses ``layer.causal``, ``layer.cross``, ``layer.eps`` and ``layer.name``.
    """
    T, S = q.shape[1], k.shape[1]
    if padding_mask is not None:
        k = k * padding_mask[:, :, None, None]
    state = None if cache is None else cache.state
    if layer.causal and layer.cross:  # bottom-right alignment: query t sees context j <= t + S - T
        aligned_start(T, S, context_seen=0 if cache is None else cache.length, name=layer.name)
        o, state = aligned_causal_linear_attn(
            q, k, v, eps=layer.eps, initial_state=state, output_final_state=cache is not None
        )
    else:
        o, state = linear_attn(
            q, k, v, causal=layer.causal, eps=layer.eps, initial_state=state, output_final_state=cache is not None
        )
    if cache is not None:
        cache.state, cache.length = state, cache.length + S
    return o


@register_attention("linear")
class LinearAttention(Attention):
    """Linear attention with elu+1 features (Katharopoulos et al. 2020); O(T), constant-size decoding state."""

    patterns = ALL_PATTERNS

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        eps: float = 1e-6,
        bias: bool = True,
    ) -> None:
        """
        Args:
            dim: model width.
            num_heads: heads; head_dim = dim // num_heads is both the feature and the value dimension.
            causal: query i sees keys j <= i.
            cross: keys/values from ``context``.
            eps: added to the denominator phi(q) . z (paper: 1e-6).
            bias: bias in the q/k/v/o projections (fast-transformers' AttentionLayer uses nn.Linear's default, True).
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        if not eps >= 0:
            raise ValueError(f"linear: eps must be >= 0; got {eps!r}.")
        self.eps = eps
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)

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
        H, D = self.num_heads, self.head_dim
        source = context if self.cross else x
        S = source.shape[1]
        q = elu_feature_map(self.q_proj(x).view(B, T, H, D))  # (B, T, H, D)
        k = elu_feature_map(self.k_proj(source).view(B, S, H, D))  # (B, S, H, D)
        v = self.v_proj(source).view(B, S, H, D)  # (B, S, H, D)
        o = feature_linear_attention(self, q, k, v, padding_mask, cache)
        return self.o_proj(o.reshape(B, T, self.dim))

    def new_cache(self, batch_size: int) -> LinearAttentionCache:
        if not self.causal:
            return super().new_cache(batch_size)  # raises: only causal layers decode
        return LinearAttentionCache(batch_size)

    def state_size(self, seq_len: int) -> int:
        return self.num_heads * self.head_dim * (self.head_dim + 1)  # S and z per head, independent of seq_len
