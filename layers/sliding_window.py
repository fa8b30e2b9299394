"""Sliding-window softmax attention — the exact local attention of Based (Arora et al. 2024, "Simple linear attention
language models balance the recall-throughput tradeoff", https://arxiv.org/abs/2402.18668), as in Longformer /
Mistral's causal local attention:

    o_i = softmax_{j in (i - w, i]}(q_i k_j^T / sqrt(D)) v_j

Query i sees its own position and the w - 1 before it, so a decoder keeps only the last w keys and values: the cache is
a fixed-size window buffer (ring buffer semantics, kept in position order) and decoding costs O(w) per token. Default
window 64: the Based paper's ablations use 64-128, its 360M config 256 (``based-360m.yaml``). RoPE on q and k (base
10000, as in Based's attention layers) is on by default, because the layer has no other position signal. Patterns:
causal_self and causal_cross (query i of T reads context positions (p - w, p] of S, p = i + S - T: the window is
counted on the bottom-right aligned positions). The masks run through
:func:`attnzoo.layers.sdpa.sdpa` with ``window=``. The Based recipe alternates it with ``based`` per layer:
``GPT(..., attention=["sliding_window", "based"])``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnzoo.layers.cross import query_start, rotate_from
from attnzoo.layers.registry import Attention, register_attention
from attnzoo.layers.rope import RotaryEmbedding
from attnzoo.layers.sdpa import sdpa


@dataclass
class SlidingWindowCache:
    """The last ``window`` (rotated) keys and values, their padding mask, and how many positions were seen."""

    batch_size: int
    window: int
    length: int = 0
    keys: Tensor | None = None  # (B, <= window, H, D), oldest first
    values: Tensor | None = None  # (B, <= window, H, D)
    key_mask: Tensor | None = None  # (B, <= window) bool, True = real key

    def update(self, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Prepend the kept window to the T new keys/values; return (keys, values, mask) to attend over, and keep only
        the newest ``window`` of them for the next call."""
        B, T = k.shape[:2]
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=k.device)
        if self.keys is not None:
            k = torch.cat([self.keys, k], dim=1)
            v = torch.cat([self.values, v], dim=1)
            mask = torch.cat([self.key_mask, mask], dim=1)
        self.keys, self.values = k[:, -self.window :], v[:, -self.window :]
        self.key_mask = mask[:, -self.window :]
        self.length += T
        return k, v, mask


@register_attention("sliding_window")
class SlidingWindowAttention(Attention):
    """Exact softmax attention over the last ``window`` positions (Based's local attention); constant-size cache."""

    patterns = frozenset({"causal_self", "causal_cross"})
    pattern_note = "A sliding window is defined over past positions only; use softmax for non-causal attention."

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        window: int = 64,
        rope: bool = True,
        rope_base: float = 10000.0,
        bias: bool = False,
    ) -> None:
        """
        Args:
            dim: model width.
            num_heads: heads; head_dim = dim // num_heads.
            causal: must be True (the window looks back).
            cross: keys/values from a ``context`` stream, aligned bottom-right (causal_cross).
            window: w, number of positions each query sees, itself included (Based ablations 64-128; 360M config 256).
            rope: rotary position embedding on q and k.
            rope_base: RoPE frequency base.
            bias: bias in the q/k/v/o projections.
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"sliding_window: window must be a positive int; got {window!r}.")
        self.window = window
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)
        self.rope = RotaryEmbedding(self.head_dim, rope_base) if rope else None

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: SlidingWindowCache | None = None,
    ) -> Tensor:
        self.check_inputs(x, context, padding_mask, cache)
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        source = context if self.cross else x
        S = source.shape[1]
        q = self.q_proj(x).view(B, T, H, D)  # (B, T, H, D)
        k = self.k_proj(source).view(B, S, H, D)  # (B, S, H, D)
        v = self.v_proj(source).view(B, S, H, D)
        offset = 0 if cache is None else cache.length  # absolute position of the first new key
        # absolute position of the first query: the same as its key's in self-attention, bottom-right aligned in cross
        q_start = query_start(T, S, offset, causal=self.causal, cross=self.cross, name=self.name)
        if self.rope is not None:
            q, k = rotate_from(self.rope, q, q_start), self.rope(k, offset)
        key_mask, q_offset = padding_mask, q_start
        if cache is not None:
            kept = 0 if cache.keys is None else cache.keys.shape[1]
            k, v, key_mask = cache.update(k, v, padding_mask)
            q_offset = q_start - (offset - kept)  # the kept keys start at absolute position offset - kept
        # a window covering every key is plain causal attention: skip the band mask (and keep SDPA's fast path)
        window = None if k.shape[1] <= self.window else self.window
        o = sdpa(q, k, v, causal=True, key_mask=key_mask, q_offset=q_offset, window=window)  # (B, T, H, D)
        return self.o_proj(o.reshape(B, T, self.dim))

    def new_cache(self, batch_size: int) -> SlidingWindowCache:
        return SlidingWindowCache(batch_size, self.window)

    def state_size(self, seq_len: int) -> int:
        # keys and values of the last `window` positions (fewer before the window has filled), every head
        return 2 * min(seq_len, self.window) * self.dim
