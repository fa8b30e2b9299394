"""Lightning attention (TransNormerLLM's NormLinearAttention) — Qin et al. 2023, "TransNormerLLM: A Faster and Better
Large Language Model with Improved TransNormer", https://arxiv.org/abs/2307.14995, computed as in Qin et al. 2024,
"Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language Models",
https://arxiv.org/abs/2401.04658

Linear attention without softmax, without the 1/sqrt(d) scale and without a normaliser denominator (TransNormer's
NormAttention: the output norm replaces the denominator, whose unbounded gradients it removes), with a fixed decay
lambda_h per head:

    q_t = silu(W_q x_t),  k_t = silu(W_k x_t),  v_t = W_v x_t,  u_t = W_u x_t          (W_q|k|v|u = qkvu_proj)
    S_t = lambda_h S_{t-1} + k_t^T v_t,     o_t = q_t S_t
        (parallel form: O = (Q K^T * M) V,  M[t, s] = lambda_h^(t-s) if t >= s else 0)
    out_t = out_proj( Norm(o_t over all heads) * gate(u_t) )

    lambda_h = exp(-slope_h * (1 - layer_idx / (num_layers - 1) + 1e-5))

with slope_h the ALiBi slopes (Press et al. 2022): 2^(-8 (h + 1) / H) for H a power of two, and for other H the
2^floor(log2 H) power-of-two slopes followed by every other slope of twice as many heads. Deeper layers decay less;
the last one keeps lambda_h = exp(-1e-5 slope_h), almost no decay.

Lightning Attention-2 tiles the sequence into blocks: inside a block the masked quadratic "left product"
(Q K^T * M) V, between blocks the "right product" q_t lambda^(t - t0) S_block with the (K, V) state carried from block
to block. That is exactly the chunked form of ``attnzoo.kernels.simple_gla`` (FLA's ``chunk_lightning_attn`` is also
``chunk_simple_gla`` with a constant per-head decay), so the layer calls ``simple_gla`` with g = log lambda_h and
scale 1; ``chunk_size`` is the block length.

Defaults and parameter names are TransNormerLLM's official code (OpenNLPLab, ``modeling_transnormer.py``:
``NormLinearAttention`` and ``TransnormerConfig``): one fused ``qkvu_proj`` (D -> 4 hidden_dim, no bias) and
``out_proj``, hidden_dim = D, SiLU on q and k only, ``norm_type="srmsnorm"`` (SimpleRMSNorm: x / rms(x) over the
whole hidden width, eps 1e-6, no weight), an identity output gate (out = u * Norm(o)), the slope table and per-layer
rescaling above (the model passes ``slope_rate * (1 - idx / (num_layers - 1) + 1e-5)`` to every layer), weights
N(0, 0.02) (``init_std``). The backbone does not tell a layer its depth, so ``layer_idx`` (default 0, the first and
most strongly decaying layer) and ``num_layers`` (default 24, ``TransnormerConfig.decoder_layers``) are options; a
per-layer list in the model config sets them layer by layer. ``decay_schedule="fla"`` uses FLA's
``chunk_lightning_attn`` decays instead, log lambda_h = -(8 / H) (1 - layer_idx / num_layers) h (head 0 undecayed).
``norm_type="layernorm"`` and ``gate_fn="sigmoid"`` give the TNL variant of OpenNLPLab's lightning-attention
examples (``tnl_attn.py``; its low-rank gate is not built here).

Patterns: ``causal_self`` (constant-size cache: the (B, H, K, V) state) and ``noncausal_self`` as the bidirectional
layer: the forward scan plus a scan over the reversed sequence, summed before the norm, with shared projections
(layers/bidirectional.py), i.e. M[t, s] = lambda^|t - s| with the diagonal counted twice. A padded position neither
writes nor decays the state (k = v = 0 and log-decay 0 there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.errors import unknown
from attnzoo.kernels import simple_gla
from attnzoo.layers.bidirectional import scan_both_ways
from attnzoo.layers.gla import GATE_FNS, check_cache, float32_at_least, init_fla_, norm_and_gate
from attnzoo.layers.registry import Attention, register_attention

DECAY_SCHEDULES = ("alibi", "fla")


def identity(t: Tensor) -> Tensor:
    """TransNormerLLM's output gate: u itself, no activation."""
    return t


LIGHTNING_GATE_FNS = {"identity": identity, **GATE_FNS}


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's head slopes as TransNormerLLM builds them (``_build_slope_tensor``): a geometric sequence starting at
    2^(-8 / H) for a power-of-two H; otherwise those of the nearest lower power of two, then every other slope of
    twice that many heads."""
    if math.log2(num_heads).is_integer():
        start = 2.0 ** (-8.0 / num_heads)
        return [start ** (h + 1) for h in range(num_heads)]
    lower = 2 ** math.floor(math.log2(num_heads))
    return alibi_slopes(lower) + alibi_slopes(2 * lower)[0::2][: num_heads - lower]


def lightning_log_decays(
    num_heads: int, layer_idx: int, num_layers: int, schedule: str = "alibi", dtype: torch.dtype = torch.float64
) -> Tensor:
    """(H,) log lambda_h of the layer at depth ``layer_idx`` of ``num_layers`` (see the module docstring)."""
    if schedule == "fla":  # fla/ops/lightning_attn/chunk.py
        factor = 1.0 - layer_idx / num_layers
        return torch.arange(num_heads, dtype=torch.float64).mul(-8.0 / num_heads * factor).to(dtype)
    # TransNormerLLM; a one-layer model has only a first layer (its formula would divide by zero)
    depth = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
    slopes = torch.tensor(alibi_slopes(num_heads), dtype=torch.float64)
    return (-slopes * (1.0 - depth + 1e-5)).to(dtype)


@dataclass
class LightningCache:
    """Decoding state of one :class:`LightningAttention` layer: the (B, H, K, V) state (float32 at least; None before
    the first call) and the number of positions seen."""

    batch_size: int
    state: Tensor | None = None
    length: int = 0


@register_attention("lightning")
class LightningAttention(Attention):
    """Lightning attention / TransNormerLLM: SiLU linear attention, fixed ALiBi-slope decay per head, output norm."""

    patterns = frozenset({"causal_self", "noncausal_self"})
    pattern_note = "Lightning attention's decay orders the keys, so there is no cross-attention form."

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        hidden_dim: int | None = None,
        layer_idx: int = 0,
        num_layers: int = 24,
        decay_schedule: str = "alibi",
        norm_type: str = "srmsnorm",
        norm_eps: float = 1e-6,
        gate_fn: str = "identity",
        chunk_size: int = 64,
        backend: str = "auto",
    ) -> None:
        """
        Args:
            dim: model width D.
            num_heads: H heads; per head K = V = hidden_dim / H.
            causal: True = causal_self with a recurrent cache; False = the bidirectional layer.
            cross: must be False (no cross pattern).
            hidden_dim: width of q, k, v and u; None = D (TransNormerLLM's ``hidden_dim`` equals the model width).
            layer_idx: depth of this layer, 0 .. num_layers - 1 (sets the decay; deeper layers decay less).
            num_layers: layers in the model.
            decay_schedule: ``alibi`` (TransNormerLLM) or ``fla`` (FLA's ``chunk_lightning_attn``).
            norm_type: output norm over the hidden width: ``srmsnorm`` (TransNormerLLM, no weight), ``rmsnorm``
                (learnable scale) or ``layernorm`` (TNL).
            norm_eps: epsilon of the output norm (SimpleRMSNorm's 1e-6).
            gate_fn: applied to u before it multiplies the normalised output: ``identity`` (TransNormerLLM),
                ``sigmoid`` (TNL), ``swish`` (= ``silu``) or ``gelu``.
            chunk_size: block length of the chunked (Lightning-2) scan (results do not depend on it).
            backend: kernel backend, ``auto``/``reference``/``torch``/``triton``.
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        label = self.name
        self.hidden_dim = dim if hidden_dim is None else hidden_dim
        if not isinstance(self.hidden_dim, int) or self.hidden_dim <= 0 or self.hidden_dim % num_heads:
            raise ValueError(
                f"{label}: hidden_dim must be a positive multiple of num_heads={num_heads} (or None = dim); "
                f"got {hidden_dim!r}."
            )
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"{label}: num_layers must be a positive integer; got {num_layers!r}.")
        if not isinstance(layer_idx, int) or not 0 <= layer_idx < num_layers:
            raise ValueError(
                f"{label}: layer_idx must be in 0 .. num_layers - 1 = {num_layers - 1}; got {layer_idx!r} "
                f"(set num_layers to the model's depth)."
            )
        if decay_schedule not in DECAY_SCHEDULES:
            raise ValueError(f"{label}: " + unknown("decay_schedule", decay_schedule, DECAY_SCHEDULES))
        if gate_fn not in LIGHTNING_GATE_FNS:
            raise ValueError(f"{label}: " + unknown("gate_fn", gate_fn, LIGHTNING_GATE_FNS))
        norms = {
            # SimpleRMSNorm is x / sqrt(mean(x^2) + eps): an RMSNorm without the learnable scale
            "srmsnorm": lambda: nn.RMSNorm(self.hidden_dim, eps=norm_eps, elementwise_affine=False),
            "rmsnorm": lambda: nn.RMSNorm(self.hidden_dim, eps=norm_eps),
            "layernorm": lambda: nn.LayerNorm(self.hidden_dim, eps=norm_eps),
        }
        if norm_type not in norms:
            raise ValueError(f"{label}: " + unknown("norm_type", norm_type, norms))
        self.head_k_dim = self.hidden_dim // num_heads
        self.layer_idx, self.num_layers, self.decay_schedule = layer_idx, num_layers, decay_schedule
        self.chunk_size = chunk_size
        self.backend = backend

        self.qkvu_proj = nn.Linear(dim, 4 * self.hidden_dim, bias=False)
        self.norm = norms[norm_type]()
        self.gate_fn = LIGHTNING_GATE_FNS[gate_fn]
        self.out_proj = nn.Linear(self.hidden_dim, dim, bias=False)
        init_fla_(self)  # TransnormerPreTrainedModel._init_weights: N(0, init_std = 0.02), no biases

    @property
    def decays(self) -> Tensor:
        """(H,) lambda_h of this layer, float64."""
        return lightning_log_decays(self.num_heads, self.layer_idx, self.num_layers, self.decay_schedule).exp()

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: LightningCache | None = None,
    ) -> Tensor:
        self.check_inputs(x, context, padding_mask, cache)
        if cache is not None:
            check_cache(self.name, cache, LightningCache, x)
        B, T, _ = x.shape
        q, k, v, u = self.qkvu_proj(x).view(B, T, 4, self.num_heads, self.head_k_dim).unbind(2)  # (B, T, H, K) each
        q, k = F.silu(q), F.silu(k)
        log_decay = lightning_log_decays(
            self.num_heads, self.layer_idx, self.num_layers, self.decay_schedule, float32_at_least(v).dtype
        ).to(x.device)
        log_decay = log_decay.expand(B, T, self.num_heads)  # (B, T, H)
        if padding_mask is not None:  # padded keys: no write, no decay
            keep = padding_mask[:, :, None]  # (B, T, 1)
            k, v = k * keep[..., None].to(k.dtype), v * keep[..., None].to(v.dtype)
            log_decay = log_decay * keep.to(log_decay.dtype)

        # no 1/sqrt(K) scale: the output norm removes any scale (up to eps), and TransNormerLLM applies none
        kernel_options = dict(scale=1.0, chunk_size=self.chunk_size, backend=self.backend)
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

        shape = (B, T, self.hidden_dim)
        return self.out_proj(norm_and_gate(self.norm, self.gate_fn, o.reshape(shape), u.reshape(shape)))

    def new_cache(self, batch_size: int) -> LightningCache:
        if not self.causal:
            return super().new_cache(batch_size)  # raises: only causal layers decode
        return LightningCache(batch_size)

    def state_size(self, seq_len: int) -> int:
        return self.num_heads * self.head_k_dim * self.head_k_dim
