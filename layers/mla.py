"""Multi-head latent attention (MLA) — DeepSeek-AI 2024, "DeepSeek-V2: A Strong, Economical, and Efficient
Mixture-of-Experts Language Model", https://arxiv.org/abs/2405.04434, §2.1 (reference code: Hugging Face
transformers' ``DeepseekV3Attention``, models/deepseek_v3/modeling_deepseek_v3.py, whose parameter names are kept).

Keys and values are expanded from one low-rank latent c_kv per position, and position enters through a separate
rotary key k_pe that every head shares, so decoding caches only (c_kv, k_pe):

    c_q = RMSNorm(q_a_proj x)            (with q_lora_rank; without it q = q_proj x)
    [q_nope_h, q_pe_h] = q_b_proj c_q     per head h: d_nope and d_rope channels
    [c_kv, k_pe] = kv_a_proj_with_mqa s   s = x (self) or context (cross); c_kv: kv_lora_rank, k_pe: d_rope (one head)
    c_kv = kv_a_layernorm(c_kv)           (RMSNorm)
    [k_nope_h, v_h] = kv_b_proj c_kv      per head h: d_nope and d_v channels
    q_h = [q_nope_h, RoPE(q_pe_h)],  k_h = [k_nope_h, RoPE(k_pe)]
    o_h = softmax(q_h k_h^T * (d_nope + d_rope)^-1/2 + mask) v_h,   y = o_proj(o, heads concatenated)

The cache holds c_kv (after its norm) and the rotated k_pe: ``state_size(S) = S * (kv_lora_rank + d_rope)``, against
2 S dim for ``softmax``. Each call expands k, v from all cached latents (the paper's "absorbed" form, which folds
kv_b_proj into q and o_proj instead, is the same product reassociated and is not used here).

Defaults are DeepSeek-V2-Lite's (hidden 2048, 16 heads: kv_lora_rank 512, q_lora_rank None, qk_nope_head_dim 128,
qk_rope_head_dim 64, v_head_dim 128) as fractions of the zoo's ``dim`` and head_dim = dim / num_heads: kv_lora_rank
= dim // 4, no query compression, d_nope = head_dim, d_rope = head_dim // 2, d_v = head_dim. RMSNorm eps 1e-6 and
rope_base 10000 are the DeepSeek configs'; ``attention_bias`` (False there) adds a bias to q_a_proj,
kv_a_proj_with_mqa and o_proj, the projections Hugging Face gives one. The DeepSeek checkpoints rotate interleaved
channel pairs (``rope_interleave``); the RoPE here rotates the two halves of the d_rope channels (GPT-NeoX layout,
transformers' ``rope_interleave=False``): a fixed permutation of the q_pe / k_pe output rows, which the projections
absorb. YaRN's long-context scaling is not implemented.

Every pattern goes through :func:`attnzoo.layers.sdpa.sdpa` as ``softmax`` does (key padding, bottom-right causal_cross
via :mod:`attnzoo.layers.cross`; in noncausal_cross RoPE indexes both streams from 0). With d_nope + d_rope != d_v
the narrower side is zero-padded to one width there (the scores and outputs are unchanged), because with unequal
widths SDPA's CPU path falls back to a math kernel that holds T x S scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.layers.cross import query_start, rotate_from
from attnzoo.layers.kv_cache import KVCache
from attnzoo.layers.registry import ALL_PATTERNS, Attention, register_attention
from attnzoo.layers.rope import RotaryEmbedding
from attnzoo.layers.sdpa import sdpa


@dataclass
class LatentCache(KVCache):
    """MLA's decoding state: the normalised latent c_kv (B, S, kv_lora_rank) in ``keys`` and the rotated shared
    rope key k_pe (B, S, 1, d_rope) in ``values``; :class:`KVCache`'s doubling buffers and padding mask."""

    @property
    def latents(self) -> Tensor | None:
        """c_kv of the cached positions, (B, S, kv_lora_rank)."""
        return None if self.keys is None else self.keys[:, : self.length]

    @property
    def rope_keys(self) -> Tensor | None:
        """RoPE-rotated k_pe of the cached positions, (B, S, 1, d_rope)."""
        return None if self.values is None else self.values[:, : self.length]


def _width(label: str, option: str, value: int | None, default: int) -> int:
    """An option's value or its dim-derived default, checked to be a positive integer."""
    width = default if value is None else value
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        given = f"{value!r}" if value is not None else f"None (= {default} from dim and num_heads)"
        raise ValueError(f"{label}: {option} must be a positive integer or None; got {given}.")
    return width


@register_attention("mla")
class MultiHeadLatentAttention(Attention):
    """Multi-head latent attention (DeepSeek-V2): keys/values from a cached low-rank latent plus one shared RoPE key."""

    patterns = ALL_PATTERNS

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        kv_lora_rank: int | None = None,
        q_lora_rank: int | None = None,
        qk_nope_head_dim: int | None = None,
        qk_rope_head_dim: int | None = None,
        v_head_dim: int | None = None,
        rope_base: float = 10000.0,
        norm_eps: float = 1e-6,
        attention_bias: bool = False,
        attn_drop: float = 0.0,
    ) -> None:
        """
        Args:
            dim: model width.
            num_heads: heads H; head_dim = dim // H sets the per-head defaults below.
            causal: query i sees keys j <= i (causal_cross: bottom-right aligned).
            cross: the latent and the rope key from ``context``, the queries from ``x``.
            kv_lora_rank: width of the cached latent c_kv; None = dim // 4 (V2-Lite: 512 of 2048).
            q_lora_rank: width of the query latent c_q (q_a_proj, q_a_layernorm, q_b_proj); None = no query
                compression, one q_proj (V2-Lite; DeepSeek-V2 uses 1536).
            qk_nope_head_dim: per-head query/key channels without position; None = head_dim (V2-Lite: 128).
            qk_rope_head_dim: RoPE channels of each query head and of the one shared key; even; None = head_dim // 2
                (V2-Lite: 64).
            v_head_dim: per-head value channels; None = head_dim (V2-Lite: 128).
            rope_base: RoPE frequency base (DeepSeek's rope_theta 10000).
            norm_eps: epsilon of the latent RMSNorms (DeepSeek's rms_norm_eps 1e-6).
            attention_bias: bias in q_a_proj, kv_a_proj_with_mqa and o_proj (DeepSeek's attention_bias, False).
            attn_drop: dropout on the attention probabilities (training only; DeepSeek's attention_dropout, 0).
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        label = self.name
        head_dim = self.head_dim
        self.kv_lora_rank = _width(label, "kv_lora_rank", kv_lora_rank, max(dim // 4, 1))
        self.q_lora_rank = None if q_lora_rank is None else _width(label, "q_lora_rank", q_lora_rank, 0)
        self.qk_nope_head_dim = _width(label, "qk_nope_head_dim", qk_nope_head_dim, head_dim)
        self.qk_rope_head_dim = _width(label, "qk_rope_head_dim", qk_rope_head_dim, head_dim // 2)
        self.v_head_dim = _width(label, "v_head_dim", v_head_dim, head_dim)
        if self.qk_rope_head_dim % 2:
            hint = "set qk_rope_head_dim to an even width" if qk_rope_head_dim is not None else "change num_heads"
            raise ValueError(
                f"{label}: RoPE needs an even qk_rope_head_dim; got {self.qk_rope_head_dim}"
                f"{'' if qk_rope_head_dim is not None else f' (head_dim {head_dim} // 2)'}; {hint}."
            )
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        H = num_heads
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(dim, H * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(dim, self.q_lora_rank, bias=attention_bias)
            self.q_a_layernorm = nn.RMSNorm(self.q_lora_rank, eps=norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=attention_bias)
        self.kv_a_layernorm = nn.RMSNorm(self.kv_lora_rank, eps=norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, dim, bias=attention_bias)
        self.rope = RotaryEmbedding(self.qk_rope_head_dim, rope_base)
        self.attn_drop = attn_drop

    @staticmethod
    def _norm(norm: nn.RMSNorm, x: Tensor) -> Tensor:
        # in the weight's precision (float32 under autocast), as DeepSeek's RMSNorm upcasts; back to the input dtype
        return norm(x.to(norm.weight.dtype)).to(x.dtype)

    def queries(self, x: Tensor) -> Tensor:
        """q (B, T, H, d_nope + d_rope), before RoPE."""
        B, T, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self._norm(self.q_a_layernorm, self.q_a_proj(x)))
        return q.view(B, T, self.num_heads, self.qk_head_dim)

    def latents(self, source: Tensor) -> tuple[Tensor, Tensor]:
        """The normalised latent c_kv (B, S, kv_lora_rank) and the shared rope key k_pe (B, S, 1, d_rope), before
        RoPE: what the cache keeps per position."""
        B, S, _ = source.shape
        c_kv, k_pe = self.kv_a_proj_with_mqa(source).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self._norm(self.kv_a_layernorm, c_kv), k_pe.view(B, S, 1, self.qk_rope_head_dim)

    def expand(self, c_kv: Tensor, k_pe: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head keys (B, S, H, d_nope + d_rope) and values (B, S, H, d_v) from the latents (k_pe rotated)."""
        B, S, _ = c_kv.shape
        H, d_nope = self.num_heads, self.qk_nope_head_dim
        kv = self.kv_b_proj(c_kv).view(B, S, H, d_nope + self.v_head_dim)
        k_nope, v = kv.split([d_nope, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(B, S, H, self.qk_rope_head_dim)], dim=-1)  # one rope key for all heads
        return k, v

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: LatentCache | None = None,
    ) -> Tensor:
        self.check_inputs(x, context, padding_mask, cache)
        B, T, _ = x.shape
        source = context if self.cross else x
        S = source.shape[1]
        q = self.queries(x)  # (B, T, H, d_nope + d_rope)
        c_kv, k_pe = self.latents(source)  # (B, S, r), (B, S, 1, d_rope)
        offset = cache.length if cache is not None else 0  # keys before this call's first key
        q_offset = query_start(T, S, offset, causal=self.causal, cross=self.cross, name=self.name)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q = torch.cat([q_nope, rotate_from(self.rope, q_pe, q_offset)], dim=-1)
        k_pe = self.rope(k_pe, offset)  # cached rotated, so a step never re-rotates old keys
        key_mask = padding_mask
        if cache is not None:
            c_kv, k_pe, key_mask = cache.update(c_kv, k_pe, padding_mask)
        k, v = self.expand(c_kv, k_pe)  # (B, S_all, H, d_nope + d_rope), (B, S_all, H, d_v)
        # one head width for q, k and v (zeros change neither scores nor outputs): SDPA's fused CPU kernels need it,
        # with unequal widths it falls back to the T x S math kernel
        if self.qk_head_dim < self.v_head_dim:
            pad = (0, self.v_head_dim - self.qk_head_dim)
            q, k = F.pad(q, pad), F.pad(k, pad)
        elif self.v_head_dim < self.qk_head_dim:
            v = F.pad(v, (0, self.qk_head_dim - self.v_head_dim))
        dropout_p = self.attn_drop if self.training else 0.0
        scale = self.qk_head_dim**-0.5
        o = sdpa(q, k, v, causal=self.causal, key_mask=key_mask, q_offset=q_offset, dropout_p=dropout_p, scale=scale)
        o = o[..., : self.v_head_dim]  # (B, T, H, d_v)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.v_head_dim))

    def new_cache(self, batch_size: int) -> LatentCache:
        if not self.causal:
            return super().new_cache(batch_size)  # raises: only causal layers decode
        return LatentCache(batch_size)

    def state_size(self, seq_len: int) -> int:
        return seq_len * (self.kv_lora_rank + self.qk_rope_head_dim)  # the latent and the shared rope key

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, kv_lora_rank={self.kv_lora_rank}, q_lora_rank={self.q_lora_rank}, "
            f"qk_nope_head_dim={self.qk_nope_head_dim}, qk_rope_head_dim={self.qk_rope_head_dim}, "
            f"v_head_dim={self.v_head_dim}"
        )
