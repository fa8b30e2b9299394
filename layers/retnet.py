"""Multi-scale retention (RetNet) — Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large
Language Models", https://arxiv.org/abs/2307.08621

Per head h with a fixed decay gamma_h = 1 - 2^(-5-h), h = 0 .. H-1 (not learned):

    parallel:   O = (Q K^T * D) V,   D[n, m] = gamma^(n-m) if n >= m else 0,   Q scaled by K^-1/2
    recurrent:  S_n = gamma S_{n-1} + k_n^T v_n,   o_n = K^-1/2 q_n S_n
    out = o_proj( RMSNorm_head(O) * swish(g_proj(x)) )

with q and k rotated by RoPE (``attnzoo.layers.rope.RotaryEmbedding``, base 10000, half-split layout) as FLA does;
xPos's extra per-position scaling is not applied (the per-head norm cancels the paper's other scalings, and FLA
drops it too). Defaults and parameter names are FLA's ``fla/layers/multiscale_retention.py`` (``MultiScaleRetention``:
expand_k 1, expand_v 2, swish output gate, RMSNorm per head eps 1e-5; q_proj k_proj v_proj g_proj o_proj g_norm),
initialised as FLA's models (Linear weights N(0, 0.02), no biases). The scan is ``attnzoo.kernels.simple_gla`` with
the constant log-decay g = log gamma_h.

Positions for RoPE are slot indices (the cache's length), padded slots included, so prefill-then-step equals one
full forward; a padded slot neither writes nor decays the state. ``noncausal_self`` is the bidirectional layer:
forward scan + scan over the reversed sequence, summed before the norm (layers/bidirectional.py), with the same
rotated q and k, so both directions see relative positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnzoo.errors import unknown
from attnzoo.kernels import simple_gla
from attnzoo.layers.bidirectional import scan_both_ways
from attnzoo.layers.gla import (
    GATE_FNS,
    NORMS,
    check_cache,
    float32_at_least,
    head_norm,
    init_fla_,
    norm_and_gate,
    repeat_kv_heads,
)
from attnzoo.layers.registry import Attention, register_attention
from attnzoo.layers.rope import RotaryEmbedding


def retention_log_decays(num_heads: int, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """(H,) log gamma_h = log(1 - 2^(-5-h)): RetNet's fixed multi-scale decays (FLA's ``chunk_retention``)."""
    h = torch.arange(num_heads, dtype=torch.float64, device=device)
    # log1p(-2^(-5-h)) is exact for the tiny 2^(-5-h) of the later heads, where log(1 - eps) loses digits
    return torch.log1p(-torch.exp2(-5.0 - h)).to(dtype)


@dataclass
class RetNetCache:
    """Decoding state of one :class:`MultiScaleRetention` layer: the (B, H, K, V) state (float32 at least) and the
    number of positions seen (the RoPE offset)."""

    batch_size: int
    state: Tensor | None = None
    length: int = 0


@register_attention("retnet")
class MultiScaleRetention(Attention):
    """Multi-scale retention (RetNet): linear attention with fixed per-head decays 1 - 2^(-5-h), RoPE; FLA defaults."""

    patterns = frozenset({"causal_self", "noncausal_self"})
    pattern_note = "Retention's decay orders the keys, so there is no cross-attention form."

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        expand_k: float = 1.0,
        expand_v: float = 2.0,
        num_kv_heads: int | None = None,
        use_output_gate: bool = True,
        gate_fn: str = "swish",
        norm_type: str = "rmsnorm",
        elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
        rope_base: float = 10000.0,
        chunk_size: int = 64,
        backend: str = "auto",
    ) -> None:
        """
        Args:
            dim: model width D.
            num_heads: H heads; head h decays by 1 - 2^(-5-h).
            causal: True = causal_self with a recurrent cache; False = the bidirectional layer.
            cross: must be False (no cross pattern).
            expand_k: D_k = int(D * expand_k) (K = D_k / H, even for RoPE).
            expand_v: D_v = int(D * expand_v) (V = D_v / H).
            num_kv_heads: heads of k and v (GQA); None = num_heads. Must divide num_heads.
            use_output_gate: multiply the normalised output by gate_fn(g_proj(x)).
            gate_fn: ``swish`` (= ``silu``), ``sigmoid`` or ``gelu``.
            norm_type: per-head ``rmsnorm`` (FLA) or ``layernorm`` (the paper's GroupNorm per head).
            elementwise_affine: learnable scale (and bias for layernorm) in the per-head norm.
            norm_eps: epsilon of the per-head norm.
            rope_base: RoPE frequency base.
            chunk_size: chunk length of the scan kernel (results do not depend on it).
            backend: kernel backend, ``auto``/``reference``/``torch``/``triton``.
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        label = self.name
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if not isinstance(self.num_kv_heads, int) or self.num_kv_heads <= 0 or num_heads % self.num_kv_heads:
            raise ValueError(f"{label}: num_kv_heads must divide num_heads={num_heads}; got {num_kv_heads!r}.")
        self.key_dim, self.value_dim = int(dim * expand_k), int(dim * expand_v)
        if self.key_dim % (2 * num_heads) or self.value_dim % num_heads or not self.key_dim or not self.value_dim:
            raise ValueError(
                f"{label}: int(dim * expand_k) = {self.key_dim} must be a positive multiple of 2 * num_heads "
                f"(an even head dim for RoPE) and int(dim * expand_v) = {self.value_dim} one of num_heads="
                f"{num_heads}; change expand_k / expand_v (dim={dim})."
            )
        if gate_fn not in GATE_FNS:
            raise ValueError(f"{label}: " + unknown("gate_fn", gate_fn, GATE_FNS))
        if norm_type not in NORMS:
            raise ValueError(f"{label}: " + unknown("norm_type", norm_type, NORMS))
        self.kv_groups = num_heads // self.num_kv_heads
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads
        self.chunk_size = chunk_size
        self.backend = backend

        self.q_proj = nn.Linear(dim, self.key_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.key_dim // self.kv_groups, bias=False)
        self.v_proj = nn.Linear(dim, self.value_dim // self.kv_groups, bias=False)
        self.g_proj = nn.Linear(dim, self.value_dim, bias=False) if use_output_gate else None
        self.rotary = RotaryEmbedding(self.head_k_dim, rope_base)
        self.g_norm = head_norm(norm_type, self.head_v_dim, norm_eps, elementwise_affine)
        self.gate_fn = GATE_FNS[gate_fn] if use_output_gate else None
        self.o_proj = nn.Linear(self.value_dim, dim, bias=False)
        init_fla_(self)

    @property
    def gammas(self) -> Tensor:
        """(H,) the per-head decays gamma_h = 1 - 2^(-5-h), float64."""
        return retention_log_decays(self.num_heads).exp()

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: RetNetCache | None = None,
    ) -> Tensor:
        self.check_inputs(x, context, padding_mask, cache)
        if cache is not None:
            check_cache(self.name, cache, RetNetCache, x)
        B, T, _ = x.shape
        offset = 0 if cache is None else cache.length
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_k_dim)  # (B, T, H, K)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_k_dim)  # (B, T, H_kv, K)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_v_dim)  # (B, T, H_kv, V)
        q, k = self.rotary(q, offset), self.rotary(k, offset)
        k, v = repeat_kv_heads(k, self.kv_groups), repeat_kv_heads(v, self.kv_groups)  # (B, T, H, K|V)
        log_decay = retention_log_decays(self.num_heads, float32_at_least(v).dtype, x.device)
        log_decay = log_decay.expand(B, T, self.num_heads)  # (B, T, H)
        if padding_mask is not None:  # padded keys: no write, no decay
            keep = padding_mask[:, :, None]  # (B, T, 1)
            k, v = k * keep[..., None].to(k.dtype), v * keep[..., None].to(v.dtype)
            log_decay = log_decay * keep.to(log_decay.dtype)

        kernel_options = dict(chunk_size=self.chunk_size, backend=self.backend)
        if self.causal:
            o, state = simple_gla(
                q,
                k,
                v,
                log_decay,
                initial_state=None if cache is None else cache.state,
                output_final_state=cache is not None,
                **kernel_options,
            )  # (B, T, H, V)
            if cache is not None:
                cache.state, cache.length = state, cache.length + T
        else:
            o = scan_both_ways(simple_gla, (q, k, v, log_decay), **kernel_options)  # (B, T, H, V)

        g = None if self.g_proj is None else self.g_proj(x).view(B, T, self.num_heads, self.head_v_dim)
        return self.o_proj(norm_and_gate(self.g_norm, self.gate_fn, o, g).reshape(B, T, self.value_dim))

    def new_cache(self, batch_size: int) -> RetNetCache:
        if not self.causal:
            return super().new_cache(batch_size)  # raises: only causal layers decode
        return RetNetCache(batch_size)

    def state_size(self, seq_len: int) -> int:
        return self.num_heads * self.head_k_dim * self.head_v_dim
