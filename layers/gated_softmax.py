"""Gated softmax attention — Qiu et al. 2025, "Gated Attention for Large Language Models: Non-linearity, Sparsity,
and Attention-Sink-Free", https://arxiv.org/abs/2505.06708. Reference impl: https://github.com/qiuzh20/gated_attention
(modeling_qwen3.py).

    o = SDPA(q, k, v)                        per head, any mask (causal, non-causal, cross)
    o' = o * sigmoid(x W_gate + b_gate)      head-specific, multiplicative, before the output projection
    y = proj(o')

``x`` is the query-side input (the same hidden state that made q), so the gate needs nothing from the past: causal
masks, cross-attention and the KV cache work as in :mod:`attnzoo.layers.softmax`. ``gate="elementwise"`` has one gate
per head channel (H * D values, the paper's best variant, the default); ``gate="headwise"`` has one per head (H),
broadcast over the head dim. The gate's bias follows ``qkv_bias`` as in the official code. The official code fuses
W_gate into ``q_proj`` (per KV group); here it is a separate ``gate`` Linear, the softmax part keeps timm's names
(``qkv``, ``proj``) and the defaults of the ``softmax`` layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo.errors import unknown
from attnzoo.layers.kv_cache import KVCache
from attnzoo.layers.registry import ALL_PATTERNS, register_attention
from attnzoo.layers.softmax import SoftmaxAttention

GATES = ("elementwise", "headwise")


@register_attention("gated_softmax")
class GatedSoftmaxAttention(SoftmaxAttention):
    """Softmax attention with a head-specific sigmoid output gate from the query-side input (Qiu et al.)."""

    patterns = ALL_PATTERNS

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        gate: str = "elementwise",
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
            cross: keys/values from ``context``; the gate comes from ``x``.
            gate: ``elementwise`` (H * D gates, the paper's best) or ``headwise`` (H gates).
            qkv_bias: bias in the q/k/v projection and in the gate (official: both follow attention_bias).
            proj_bias: bias in the output projection.
            qk_norm: LayerNorm over the head dim on q and k.
            rope: rotary position embedding on q and k.
            rope_base: RoPE frequency base.
            attn_drop: dropout on attention probabilities (training only).
            proj_drop: dropout after the output projection.
        """
        super().__init__(
            dim,
            num_heads,
            causal=causal,
            cross=cross,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            qk_norm=qk_norm,
            rope=rope,
            rope_base=rope_base,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
        )
        if gate not in GATES:
            raise ValueError(f"{self.name}: " + unknown("gate", gate, GATES))
        self.gate_kind = gate
        self.gate = nn.Linear(dim, dim if gate == "elementwise" else num_heads, bias=qkv_bias)

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
        H = self.num_heads
        q, k, v = self.project(x, context)
        o = self.attend(q, k, v, padding_mask=padding_mask, cache=cache)  # (B, T, H, D)
        gate = torch.sigmoid(self.gate(x)).view(B, T, H, -1)  # (B, T, H, D) or (B, T, H, 1)
        o = o * gate.to(o.dtype)
        return self.proj_drop(self.proj(o.reshape(B, T, self.dim)))

    def state_size(self, seq_len: int) -> int:
        return 2 * seq_len * self.dim  # keys and values; the gate needs only the current token

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gate={self.gate_kind}"
