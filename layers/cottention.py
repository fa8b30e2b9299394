"""Cottention — Mongaras, Dohm & Larson 2024, "Cottention: Linear Transformers With Cosine Attention",
https://arxiv.org/abs/2409.18747. Reference impl: https://github.com/gmongaras/Cottention_Transformer
(``GPT_Trainer/GPTCosAttention.py`` ``_cos_attn``, the stabilised form; ``BERT_Trainer/BertCosAttention.py``).

Softmax is replaced by the cosine similarity of the L2-normalised queries and keys, with no normaliser over the
row; for stability each value is divided by the count of keys it is averaged with, raised to a learned per-head
power in (0, 1):

    N(x) = x / max(|x|_2, 1e-12)                               (F.normalize)
    o_i  = sum_j cos(q_i, k_j) v_j / max(c_j ** sigmoid(m_h), 1)   = N(q_i) sum_j N(k_j)^T v'_j

where j runs over the real keys (j <= i if causal) and c_j is the number of real keys the official code counts in
row j of its mask: all of them (non-causal: c_j = m, the sequence length), or those at positions <= j (causal: c_j
= j for an unpadded sequence, 1-based). The scaled values v'_j depend on j alone, so causal Cottention is an RNN with
the constant state S_t = S_{t-1} + N(k_t)^T v'_t (D x D per head, plus the count of real keys), which is how the
paper decodes; the sums run through :func:`attnzoo.kernels.linear_attn` (chunked on CPU, O(T)).

Each cosine weight lies in [-1, 1] (and may be negative: there is no softmax), so |o_i| <= sum_j |v'_j| entrywise,
and scaling a query or key vector by any positive number changes nothing.

Defaults from ``GPTCosAttention``: q/k/v/out projections without bias (parameter names ``q_proj``/``k_proj``/
``v_proj``/``out_proj`` as there), the learned constant ``norm_const`` m = 0.5 per head (sigmoid 0.62). The official
GPT-J model rotates q and k (rotary embeddings) before normalising; RoPE preserves norms, so ``rope=True`` (rotation
of the normalised q and k) is the same function. It is off by default like the zoo's softmax layer, since the BERT
model uses absolute positions; turn it on when the backbone has no positions (GPT's ``positions=none``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.kernels import linear_attn
from attnzoo.layers.registry import Attention, register_attention
from attnzoo.layers.rope import RotaryEmbedding

NORM_CONST_INIT = 0.5  # GPTCosAttention: 0.5 * ones(1, H, 1, 1)


def cosine_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    norm_const: Tensor,
    *,
    causal: bool,
    padding_mask: Tensor | None = None,
    count_offset: Tensor | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Stabilised cosine attention on projected per-head q, k, v (the functional core of :class:`Cottention`).

    Args:
        q: (B, T, H, D) queries (normalised here).
        k: (B, S, H, D) keys (normalised here).
        v: (B, S, H, V) values.
        norm_const: (H,) the learned m; each value is divided by max(c_j ** sigmoid(m), 1).
        causal: query i sees keys j <= i (S == T).
        padding_mask: (B, S) bool, True = real key; padded keys are removed and not counted.
        count_offset: (B,) int64 real keys before this call (causal decoding).
        initial_state: (B, H, D, V) state sum_j N(k_j)^T v'_j of the earlier keys.
        output_final_state: also return the state after the last key.

    Returns:
        ``(o, state, count)``: o (B, T, H, V) in float32 at least, the state or None, and the (B,) count of real keys
        seen after this call.
    """
    B, S = k.shape[:2]
    dtype = torch.promote_types(q.dtype, torch.float32)
    # norms, powers and the state in float32 at least, also under bf16/fp16 autocast
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)  # cosine similarity = N(q) . N(k)
        real = padding_mask if padding_mask is not None else torch.ones(B, S, dtype=torch.bool, device=q.device)
        if causal:
            count = real.long().cumsum(1)  # (B, S): real keys at positions <= j
            if count_offset is not None:
                count = count + count_offset[:, None]
        else:
            count = real.long().sum(1, keepdim=True).expand(B, S)  # every row of the mask counts all real keys
        power = torch.sigmoid(norm_const.to(dtype))  # (H,)
        # official: v / (c ** sigmoid(m)).clamp(min=1), which only acts at c = 0 (nothing but padding so far); the
        # count is clamped instead, the same numbers without the NaN gradient of 0 ** p with respect to p
        scale = count.clamp_min(1).to(dtype)[:, :, None] ** power  # (B, S, H)
        v = v / scale[..., None]
        if padding_mask is not None:
            keep = padding_mask[:, :, None, None]
            k, v = k * keep, v * keep
        o, state = linear_attn(
            q,
            k,
            v,
            causal=causal,
            normalize=False,
            initial_state=initial_state,
            output_final_state=output_final_state,
        )
    return o, state, count[:, -1]


@dataclass
class CottentionCache:
    """Decoding state of one causal Cottention layer: ``state`` (B, H, D, D) = sum_j N(k_j)^T v'_j, ``count`` (B,)
    int64 real keys seen (the c of the next key), ``length`` positions consumed (the RoPE offset)."""

    batch_size: int
    state: Tensor | None = None
    count: Tensor | None = None
    length: int = 0


@register_attention("cottention")
class Cottention(Attention):
    """Cottention: cosine-similarity linear attention with learned per-head length normalisation (no softmax)."""

    patterns = frozenset({"noncausal_self", "causal_self", "noncausal_cross"})
    float32_params = frozenset({"norm_const"})

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        bias: bool = False,
        rope: bool = False,
        rope_base: float = 10000.0,
    ) -> None:
        """
        Args:
            dim: model width.
            num_heads: heads; head_dim = dim // num_heads is the key and value dimension.
            causal: query i sees keys j <= i (the RNN form).
            cross: keys/values from ``context``.
            bias: bias in the four projections (``GPTCosAttention``: False).
            rope: rotary position embedding on the normalised q and k (the official GPT-J model has it; off by
                default like the zoo's softmax layer). Self-attention only.
            rope_base: RoPE frequency base.
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        if rope and cross:
            raise ValueError(
                "cottention: rope=True rotates q and k by their positions in one sequence; a cross-attention context "
                "has positions of its own, so build the cross layer with rope=False."
            )
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.norm_const = nn.Parameter(torch.full((num_heads,), NORM_CONST_INIT))  # m per head
        self.norm_const._no_weight_decay = True  # a scalar exponent, like a norm's gain
        self.rope = RotaryEmbedding(self.head_dim, rope_base) if rope else None

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: CottentionCache | None = None,
    ) -> Tensor:
        self.check_inputs(x, context, padding_mask, cache)
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        source = context if self.cross else x
        S = source.shape[1]
        q = self.q_proj(x).view(B, T, H, D)  # (B, T, H, D)
        k = self.k_proj(source).view(B, S, H, D)  # (B, S, H, D)
        v = self.v_proj(source).view(B, S, H, D)  # (B, S, H, D)
        if self.rope is not None:  # rotation keeps |q|, |k|: the same as rotating after the normalisation
            offset = 0 if cache is None else cache.length
            q, k = self.rope(q, offset), self.rope(k, offset)
        o, state, count = cosine_attention(
            q,
            k,
            v,
            self.norm_const,
            causal=self.causal,
            padding_mask=padding_mask,
            count_offset=None if cache is None else cache.count,
            initial_state=None if cache is None else cache.state,
            output_final_state=cache is not None,
        )
        if cache is not None:
            cache.state, cache.count, cache.length = state, count, cache.length + T
        return self.out_proj(o.reshape(B, T, self.dim).to(x.dtype))

    def new_cache(self, batch_size: int) -> CottentionCache:
        if not self.causal:
            return super().new_cache(batch_size)  # raises: only causal layers decode
        return CottentionCache(batch_size)

    def state_size(self, seq_len: int) -> int:
        return self.num_heads * self.head_dim * self.head_dim  # S per head; the key count is an integer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rope={self.rope is not None}"
