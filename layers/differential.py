"""Differential attention — Ye et al. 2024, "Differential Transformer", https://arxiv.org/abs/2410.05258 (official
code: microsoft/unilm ``Diff-Transformer/multihead_diffattn.py``, the naive reference its FlashAttention versions
match).

Each of the H heads splits its query and key into two halves of d = dim / (2 H) channels and subtracts two softmax
maps, which cancels the attention noise both maps share:

    A_c = softmax(q_c k_c^T / sqrt(d) + mask),   c = 1, 2
    lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init
    o = (1 - lambda_init) * RMSNorm((A_1 - lambda A_2) v)        v: 2d channels per head
    y = out_proj(o, heads concatenated)

with lambda_init = 0.8 - 0.6 exp(-0.3 l) for the 0-based layer index l (the paper's 0.8 - 0.6 exp(-0.3 (l - 1)) for
l = 1 .. L). The official layout is kept: q is viewed as 2H heads of d (head h owns 2h and 2h + 1), k as 2 H_kv
heads, v as H_kv heads of 2d; with grouped keys (``num_kv_heads``) query half j = 2h + c reads key head j // n_rep and
value head h // n_rep (n_rep = H / H_kv), the official ``repeat_kv``. The four lambda vectors (d each, N(0, 0.1) at
init, as in the official code) are shared by the heads of a layer and kept in float32; the RMSNorm over 2d channels
(eps 1e-5, learnable scale) is shared by the heads too (``subln``).

Both maps go through one ``F.scaled_dot_product_attention`` call over the 2H query halves, through
:func:`attnzoo.layers.sdpa.sdpa`, so causal, key padding, bottom-right causal_cross and the KV cache work as for
``softmax``; q and k are zero-padded to the value width 2d there, because with unequal widths the CPU falls back to a
T x S math kernel. The difference is taken on the outputs: (A_1 - lambda A_2) v = A_1 v - lambda A_2 v.

Defaults are the official module's: no projection bias, RoPE on q and k (base 10000; the official rotary is applied
unconditionally). The RoPE here rotates the two halves of each d channels (the GPT-NeoX layout) where the official
code rotates interleaved pairs: a fixed permutation of each half's channels, which the projections absorb.
``num_heads`` counts differential heads: the paper compares H differential heads against a Transformer with 2H heads
of the same width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.layers.cross import query_start, rotate_from
from attnzoo.layers.kv_cache import KVCache
from attnzoo.layers.registry import ALL_PATTERNS, Attention, register_attention
from attnzoo.layers.rope import RotaryEmbedding
from attnzoo.layers.sdpa import sdpa


def lambda_init_for(layer_index: int) -> float:
    """The paper's depth schedule: 0.8 - 0.6 exp(-0.3 l) for the 0-based layer index l (0.2 at the first layer)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


@register_attention("differential")
class DifferentialAttention(Attention):
    """Differential attention (Ye et al. 2024): the difference of two softmax maps per head, then a per-head RMSNorm."""

    patterns = ALL_PATTERNS
    float32_params = frozenset({"lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"})

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        num_kv_heads: int | None = None,
        layer_index: int | None = None,
        lambda_init: float | None = None,
        rope: bool = True,
        rope_base: float = 10000.0,
        norm_eps: float = 1e-5,
        bias: bool = False,
        attn_drop: float = 0.0,
    ) -> None:
        """
        Args:
            dim: model width; a multiple of 2 * num_heads (each head has two query/key halves of dim / (2 H)).
            num_heads: differential heads H (half a comparable Transformer's, as in the paper).
            causal: query i sees keys j <= i (causal_cross: bottom-right aligned).
            cross: keys/values from ``context``.
            num_kv_heads: key/value heads (grouped-query attention, the official ``num_kv_heads``); None = H.
            layer_index: 0-based position in the stack, for lambda_init (GPT and the ViT fill it in); None = 0.
            lambda_init: override the depth schedule 0.8 - 0.6 exp(-0.3 layer_index) with a constant.
            rope: rotary position embedding on q and k.
            rope_base: RoPE frequency base.
            norm_eps: epsilon of the per-head RMSNorm (official 1e-5).
            bias: bias in the q/k/v/out projections (official: none).
            attn_drop: dropout on both attention maps (training only; the official module has none).
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        label = self.name
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if not isinstance(num_kv_heads, int) or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(
                f"{label}: num_kv_heads must divide num_heads={num_heads} (grouped keys and values); "
                f"got {num_kv_heads!r}."
            )
        if dim % (2 * num_heads):
            raise ValueError(
                f"{label}: dim={dim} must be a multiple of 2 * num_heads = {2 * num_heads} (two query/key halves "
                "per head); change dim or num_heads."
            )
        layer_index = 0 if layer_index is None else layer_index
        if not isinstance(layer_index, int) or isinstance(layer_index, bool) or layer_index < 0:
            raise ValueError(f"{label}: layer_index must be an integer >= 0 or None (0); got {layer_index!r}.")
        self.num_kv_heads = num_kv_heads
        self.n_rep = num_heads // num_kv_heads
        self.half_dim = dim // num_heads // 2  # d: the channels of each query/key half
        if rope and self.half_dim % 2:
            raise ValueError(
                f"{label}: RoPE needs an even half-head width; dim / (2 * num_heads) = {self.half_dim}. "
                "Change dim or num_heads, or set rope=False."
            )
        self.layer_index = layer_index
        self.lambda_init = lambda_init_for(layer_index) if lambda_init is None else float(lambda_init)
        kv_dim = dim // self.n_rep
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, kv_dim, bias=bias)
        self.v_proj = nn.Linear(dim, kv_dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        d = self.half_dim
        self.lambda_q1 = nn.Parameter(torch.empty(d, dtype=torch.float32).normal_(0.0, 0.1))
        self.lambda_k1 = nn.Parameter(torch.empty(d, dtype=torch.float32).normal_(0.0, 0.1))
        self.lambda_q2 = nn.Parameter(torch.empty(d, dtype=torch.float32).normal_(0.0, 0.1))
        self.lambda_k2 = nn.Parameter(torch.empty(d, dtype=torch.float32).normal_(0.0, 0.1))
        self.subln = nn.RMSNorm(2 * d, eps=norm_eps)
        self.rope = RotaryEmbedding(d, rope_base) if rope else None
        self.attn_drop = attn_drop

    def lambda_full(self) -> Tensor:
        """lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init, a scalar in the lambdas'
        precision (float32 at least: they are kept there under half precision)."""
        first = torch.exp(torch.dot(self.lambda_q1, self.lambda_k1))
        second = torch.exp(torch.dot(self.lambda_q2, self.lambda_k2))
        return first - second + self.lambda_init

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
        H, G, d = self.num_heads, self.num_kv_heads, self.half_dim
        source = context if self.cross else x
        S = source.shape[1]
        q = self.q_proj(x).view(B, T, 2 * H, d)  # query halves 2h, 2h + 1 of head h
        k = self.k_proj(source).view(B, S, 2 * G, d)
        v = self.v_proj(source).view(B, S, G, 2 * d)
        offset = cache.length if cache is not None else 0  # keys before this call's first key
        q_offset = query_start(T, S, offset, causal=self.causal, cross=self.cross, name=self.name)
        if self.rope is not None:
            q, k = rotate_from(self.rope, q, q_offset), self.rope(k, offset)
        key_mask = padding_mask
        if cache is not None:
            k, v, key_mask = cache.update(k, v, padding_mask)
        # query half j = 2h + c reads key head j // n_rep and value head h // n_rep (the official repeat_kv)
        k = k.repeat_interleave(self.n_rep, dim=2) if self.n_rep > 1 else k
        v = v.repeat_interleave(2 * self.n_rep, dim=2)  # (B, S, 2H, 2d)
        dropout_p = self.attn_drop if self.training else 0.0
        # q, k zero-padded to v's 2d channels (the scores are unchanged, the scale stays d^-1/2): SDPA's fused CPU
        # kernels need one head width, and with d != 2d it falls back to the T x S math kernel
        q, k = F.pad(q, (0, d)), F.pad(k, (0, d))
        o = sdpa(q, k, v, causal=self.causal, key_mask=key_mask, q_offset=q_offset, dropout_p=dropout_p, scale=d**-0.5)
        o = o.view(B, T, H, 2, 2 * d)  # (B, T, H, map, 2d): A_1 v and A_2 v
        diff = o[:, :, :, 0] - self.lambda_full().to(o.dtype) * o[:, :, :, 1]
        # the norm in its weight's precision (float32 under autocast, as the official fused RMSNorm computes)
        o = self.subln(diff.to(self.subln.weight.dtype)).to(diff.dtype) * (1.0 - self.lambda_init)
        return self.out_proj(o.reshape(B, T, self.dim))

    def new_cache(self, batch_size: int) -> KVCache:
        if not self.causal:
            return super().new_cache(batch_size)  # raises: only causal layers decode
        return KVCache(batch_size)

    def state_size(self, seq_len: int) -> int:
        # 2 H_kv key halves of d and H_kv values of 2d per position: 2 * dim / n_rep values
        return 2 * seq_len * self.dim // self.n_rep

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_kv_heads={self.num_kv_heads}, layer_index={self.layer_index}, "
            f"lambda_init={self.lambda_init:.4f}"
        )
