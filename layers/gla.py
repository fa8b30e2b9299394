"""Gated Linear Attention — Yang et al. 2023, "Gated Linear Attention Transformers with Hardware-Efficient
Training", https://arxiv.org/abs/2312.06635

Per head, with a data-dependent forget gate per key channel:

    log_decay_t = max(logsigmoid(W_2 W_1 x_t + b) / gate_logit_normalizer, clamp_min)       (<= 0, float32)
    S_t = diag(exp(log_decay_t)) S_{t-1} + k_t^T v_t,      o_t = K^-1/2 * q_t S_t
    out_t = o_proj( Norm_head(o_t) * swish(g_proj(x_t)) )

Defaults are fla-org/flash-linear-attention ``fla/layers/gla.py`` (``GatedLinearAttention``): expand_k 0.5,
expand_v 1, low-rank gate 16, normalizer 16, RMSNorm per head with eps 1e-5, swish output gate, no short convolution
(conv_size 4 when on), GQA by repeating each key/value head over consecutive query heads. Parameter names are FLA's
(``q_proj k_proj v_proj g_proj gk_proj.0 gk_proj.1 o_proj g_norm q_conv1d k_conv1d v_conv1d``), so an FLA checkpoint
loads with one rename (FLA's fused ``g_norm_swish_gate.weight`` is our ``g_norm.weight``). Initialisation is FLA's
``GLAPreTrainedModel._init_weights``: Linear and Conv1d weights N(0, 0.02), biases zero (FLA's newer configs use
std 0.006; the paper-era 0.02 is kept). The scan is ``attnzoo.kernels.gla``.

Two options for linearizing a softmax teacher (``attnzoo.models.linearize``; both off by default). FLA's layer has a
``feature_map`` option too, but of elementwise activations (``ACT2FN[feature_map]`` on q and k), which are not here;
it has no gate-bias option:

- ``feature_map="hedgehog"``: q and k pass through a learned per-head map before the scan (Hedgehog, Zhang et al.
  2024, https://arxiv.org/abs/2402.04347, the map LoLCATs distils): phi(x) = [softmax_K(W x) ; softmax_K(-W x)],
  W (K x K) per head initialised to the identity, separate maps for q and k (``layers/hedgehog.py``'s
  ``HedgehogFeatureMap``). The state then has 2K key features per head, each half decaying with its channel's gate
  (log_decay repeated over [+ ; -]), and the scale becomes (2K)^-1/2. Linear attention on the raw copied q, k weighs
  keys by a signed dot product; the map makes phi(q) . phi(k) positive and, once trained, peaked like exp(q . k),
  which is what the teacher's lookup needs.
- ``gate_bias_init=b``: the forget gate's bias (``gk_proj.1.bias``) starts at b instead of FLA's 0, so the initial
  per-step decay is sigmoid(b)^(1/tau): 0.958 at b = 0 (0.063 left after 64 steps), 0.9989 at b = 4 (0.93 left),
  i.e. the layer starts as plain linear attention, holding what the teacher's softmax could look back to.

Measured (docs/benchmarks.md section 8): linearizing the MQAR teacher to all-gla layers reaches 0.735 test accuracy
without them, 0.905 with the map alone, 0.754 with the gate bias alone, 0.972 with both (teacher 0.996).

Patterns: ``causal_self`` (constant-size cache: the (B, H, K, V) state plus the convolution inputs) and
``noncausal_self`` as a bidirectional layer: the forward scan plus a scan over the reversed sequence, summed before the
norm, with every projection shared (layers/bidirectional.py has the exact equation). A padded position neither writes
nor decays the state (k = v = 0, log-decay 0, and its input zeroed before the convolution), in both directions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.errors import unknown
from attnzoo.kernels import gla
from attnzoo.layers.bidirectional import scan_both_ways
from attnzoo.layers.hedgehog import HedgehogFeatureMap
from attnzoo.layers.registry import Attention, register_attention
from attnzoo.layers.short_conv import ShortConvolution

GATE_FNS = {"swish": F.silu, "silu": F.silu, "sigmoid": torch.sigmoid, "gelu": F.gelu}
# Floor on every per-step log-decay handed to the scan kernels. A step decay of exp(-60) ~ 1e-26 already erases the
# state to below float32/float64 resolution, so the floor changes no result beyond rounding; it keeps the kernels'
# exponents in range (the chunked kernel at 010ce82 returns NaN once a single step's log-decay is below about -88,
# e.g. a GLA gate logit below -1400 or a Mamba-2 dt * A below -88).
MIN_LOG_DECAY = -60.0
NORMS = {"rmsnorm": nn.RMSNorm, "layernorm": nn.LayerNorm}
FEATURE_MAPS = ("hedgehog",)  # or None: q and k as projected


def float32_at_least(t: Tensor) -> Tensor:
    """Gates and states in float32 under half precision; float64 stays float64 (exact tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def init_fla_(module: nn.Module, std: float = 0.02) -> None:
    """FLA's ``_init_weights``: every Linear / Conv1d weight N(0, std), every bias zero."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def repeat_kv_heads(t: Tensor, groups: int) -> Tensor:
    """(B, T, H_kv, D) -> (B, T, H_kv * groups, D), kv head h serving query heads h*groups .. h*groups+groups-1
    (FLA's ``'... (h d) -> ... (h g) d'``)."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=2)


def head_norm(norm_type: str, head_dim: int, eps: float, elementwise_affine: bool) -> nn.Module:
    """The per-head output norm over V channels: ``rmsnorm`` (FLA) or ``layernorm`` (the GLA paper's "group norm")."""
    return NORMS[norm_type](head_dim, eps=eps, elementwise_affine=elementwise_affine)


def norm_and_gate(norm: nn.Module, gate_fn: Callable[[Tensor], Tensor] | None, o: Tensor, g: Tensor | None) -> Tensor:
    """``norm(o) * gate_fn(g)`` per head (FLA's ``FusedRMSNormGated`` for swish), in float32 at least as FLA keeps
    ``g_norm`` in float32 (also for a model cast to half precision); only the norm when ``gate_fn`` is None.
    o, g: (B, T, H, V)."""
    dtype = float32_at_least(o).dtype
    weight = None if norm.weight is None else norm.weight.to(dtype)
    with torch.autocast(o.device.type, enabled=False):
        if isinstance(norm, nn.RMSNorm):
            out = F.rms_norm(o.to(dtype), norm.normalized_shape, weight, norm.eps)
        else:
            bias = None if norm.bias is None else norm.bias.to(dtype)
            out = F.layer_norm(o.to(dtype), norm.normalized_shape, weight, bias, norm.eps)
        if gate_fn is not None:
            out = out * gate_fn(g.to(dtype))
    return out.to(o.dtype)


@dataclass
class GLACache:
    """Decoding state of one :class:`GatedLinearAttention` layer.

    Attributes:
        batch_size: B, fixed at creation.
        state: (B, H, K, V) recurrent state (2K key features with the hedgehog map), float32 (float64 for a float64
            layer); None before the first call.
        conv_states: the q, k, v convolution inputs (B, C, conv_size - 1) each, or None (no short conv / no call yet).
        length: positions consumed so far.
    """

    batch_size: int
    state: Tensor | None = None
    conv_states: tuple[Tensor, Tensor, Tensor] | None = None
    length: int = 0


def check_cache(label: str, cache: object, cache_type: type, x: Tensor) -> None:
    if not isinstance(cache, cache_type):
        raise TypeError(f"{label}: cache must come from this layer's new_cache(); got {type(cache).__name__}.")


@register_attention("gla")
class GatedLinearAttention(Attention):
    """Gated linear attention (GLA): linear attention with a data-dependent per-channel forget gate; FLA defaults."""

    patterns = frozenset({"causal_self", "noncausal_self"})
    pattern_note = "GLA's decay orders the keys, so there is no cross-attention form."

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        num_kv_heads: int | None = None,
        use_short_conv: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
        use_output_gate: bool = True,
        gate_fn: str = "swish",
        norm_type: str = "rmsnorm",
        elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
        gate_logit_normalizer: float = 16.0,
        gate_low_rank_dim: int = 16,
        clamp_min: float | None = None,
        chunk_size: int = 64,
        backend: str = "auto",
        feature_map: str | None = None,
        gate_bias_init: float = 0.0,
    ) -> None:
        """
        Args:
            dim: model width D.
            num_heads: H query heads.
            causal: True = causal_self with a recurrent cache; False = the bidirectional layer.
            cross: must be False (no cross pattern).
            expand_k: D_k = int(D * expand_k), split over the heads (K = D_k / H).
            expand_v: D_v = int(D * expand_v) (V = D_v / H).
            num_kv_heads: heads of k, v and the gate (GQA); None = num_heads. Must divide num_heads.
            use_short_conv: depthwise causal convolution + SiLU on q, k, v (FLA's ShortConvolution).
            conv_size: its window.
            conv_bias: its bias.
            use_output_gate: multiply the normalised output by gate_fn(g_proj(x)).
            gate_fn: ``swish`` (= ``silu``), ``sigmoid`` or ``gelu``.
            norm_type: per-head ``rmsnorm`` (FLA) or ``layernorm`` (the paper's per-head "group norm").
            elementwise_affine: learnable scale (and bias for layernorm) in the per-head norm.
            norm_eps: epsilon of the per-head norm.
            gate_logit_normalizer: tau in log_decay = logsigmoid(.) / tau (pushes the decay towards 1).
            gate_low_rank_dim: rank of the forget-gate projection D -> r -> D_k.
            clamp_min: lower bound on log_decay (None = none), e.g. -5 to keep some memory.
            chunk_size: chunk length of the scan kernel (results do not depend on it).
            backend: kernel backend, ``auto``/``reference``/``torch``/``triton``.
            feature_map: None (FLA: q, k enter the scan as projected) or ``hedgehog`` (a learned per-head
                [softmax(W x); softmax(-W x)] on q and k, W = identity at init; 2K key features per head).
            gate_bias_init: initial bias of the forget-gate logits (FLA: 0); e.g. 4 starts the decay at 0.9989.
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        label = self.name
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if not isinstance(self.num_kv_heads, int) or self.num_kv_heads <= 0 or num_heads % self.num_kv_heads:
            raise ValueError(f"{label}: num_kv_heads must divide num_heads={num_heads}; got {num_kv_heads!r}.")
        self.key_dim, self.value_dim = int(dim * expand_k), int(dim * expand_v)
        if self.key_dim % num_heads or self.value_dim % num_heads or not self.key_dim or not self.value_dim:
            raise ValueError(
                f"{label}: int(dim * expand_k) = {self.key_dim} and int(dim * expand_v) = {self.value_dim} must be "
                f"positive multiples of num_heads={num_heads}; change expand_k / expand_v (dim={dim})."
            )
        if gate_fn not in GATE_FNS:
            raise ValueError(f"{label}: " + unknown("gate_fn", gate_fn, GATE_FNS))
        if norm_type not in NORMS:
            raise ValueError(f"{label}: " + unknown("norm_type", norm_type, NORMS))
        if gate_logit_normalizer <= 0:
            raise ValueError(f"{label}: gate_logit_normalizer must be > 0; got {gate_logit_normalizer!r}.")
        if feature_map is not None and feature_map not in FEATURE_MAPS:
            raise ValueError(f"{label}: " + unknown("feature_map", feature_map, FEATURE_MAPS) + " (or None: no map)")
        if not isinstance(gate_bias_init, (int, float)) or isinstance(gate_bias_init, bool):
            raise ValueError(f"{label}: gate_bias_init must be a number (a gate logit); got {gate_bias_init!r}.")
        if clamp_min is not None and clamp_min >= 0:
            raise ValueError(f"{label}: clamp_min bounds a log-decay (<= 0) from below; use a negative value or None.")
        self.kv_groups = num_heads // self.num_kv_heads
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads
        kv_key_dim, kv_value_dim = self.key_dim // self.kv_groups, self.value_dim // self.kv_groups
        self.gate_logit_normalizer = gate_logit_normalizer
        self.clamp_min = clamp_min
        self.chunk_size = chunk_size
        self.backend = backend

        self.q_proj = nn.Linear(dim, self.key_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_key_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_value_dim, bias=False)
        self.g_proj = nn.Linear(dim, self.value_dim, bias=False) if use_output_gate else None
        self.use_short_conv = use_short_conv
        if use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, bias=conv_bias)
            self.k_conv1d = ShortConvolution(kv_key_dim, conv_size, bias=conv_bias)
            self.v_conv1d = ShortConvolution(kv_value_dim, conv_size, bias=conv_bias)
        # low-rank forget gate (GLA paper §4.4): D -> 16 -> D_k, bias on the second map only
        self.gk_proj = nn.Sequential(
            nn.Linear(dim, gate_low_rank_dim, bias=False), nn.Linear(gate_low_rank_dim, kv_key_dim, bias=True)
        )
        self.g_norm = head_norm(norm_type, self.head_v_dim, norm_eps, elementwise_affine)
        self.gate_fn = GATE_FNS[gate_fn] if use_output_gate else None
        self.o_proj = nn.Linear(self.value_dim, dim, bias=False)
        init_fla_(self)
        with torch.no_grad():
            self.gk_proj[1].bias.fill_(float(gate_bias_init))
        self.feature_map = feature_map
        self.feature_map_q = self.feature_map_k = None
        if feature_map == "hedgehog":  # identity-initialised maps: a copied teacher's q/k keep their directions
            self.feature_map_q = HedgehogFeatureMap(num_heads, self.head_k_dim, self.head_k_dim)
            self.feature_map_k = HedgehogFeatureMap(self.num_kv_heads, self.head_k_dim, self.head_k_dim)
        # key features per head that the state holds (and the kernel's scale uses): K, or 2K after the map
        self.head_feature_dim = self.head_k_dim * (1 if feature_map is None else 2)

    def log_decay(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, H_kv, K) log forget gate in float32: logsigmoid(gk_proj(x)) / tau, clamped at clamp_min
        (and at MIN_LOG_DECAY = -60, a decay of 1e-26, to keep the kernel's exponents in range)."""
        logits = float32_at_least(self.gk_proj(x))
        # logsigmoid, not log(sigmoid): finite for very negative logits
        log_decay = F.logsigmoid(logits) / self.gate_logit_normalizer
        floor = MIN_LOG_DECAY if self.clamp_min is None else max(self.clamp_min, MIN_LOG_DECAY)
        log_decay = log_decay.clamp_min(floor)
        return log_decay.view(*x.shape[:2], self.num_kv_heads, self.head_k_dim)

    def _heads(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = q.shape
        q = q.view(B, T, self.num_heads, self.head_k_dim)  # (B, T, H, K)
        k = k.view(B, T, self.num_kv_heads, self.head_k_dim)  # (B, T, H_kv, K)
        v = v.view(B, T, self.num_kv_heads, self.head_v_dim)  # (B, T, H_kv, V)
        if self.feature_map_q is not None:  # (B, T, H, 2K); before the padding mask: a map of 0 is not 0
            q, k = self.feature_map_q(q).to(q.dtype), self.feature_map_k(k).to(k.dtype)
        if keep is not None:  # padded keys: no write (and the gate below: no decay)
            k, v = k * keep, v * keep
        return q, repeat_kv_heads(k, self.kv_groups), repeat_kv_heads(v, self.kv_groups)

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: GLACache | None = None,
    ) -> Tensor:
        self.check_inputs(x, context, padding_mask, cache)
        if cache is not None:
            check_cache(self.name, cache, GLACache, x)
        B, T, _ = x.shape
        keep = None if padding_mask is None else padding_mask[:, :, None, None].to(x.dtype)  # (B, T, 1, 1)
        if keep is not None:
            x = x * keep[..., 0]  # zero padded inputs before any convolution
        q_in, k_in, v_in = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        log_decay = self.log_decay(x)  # (B, T, H_kv, K)
        if keep is not None:
            log_decay = log_decay * keep.to(log_decay.dtype)
        if self.feature_map_q is not None:  # both halves of a channel's features decay with its gate
            log_decay = torch.cat([log_decay, log_decay], dim=-1)  # (B, T, H_kv, 2K)
        log_decay = repeat_kv_heads(log_decay, self.kv_groups)  # (B, T, H, K or 2K)

        backward = None
        if self.use_short_conv:
            states = cache.conv_states if cache is not None and cache.conv_states is not None else (None,) * 3
            convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
            outs = [conv(t, state=s) for conv, t, s in zip(convs, (q_in, k_in, v_in), states, strict=True)]
            q, k, v = self._heads(*(y for y, _ in outs), keep)
            if cache is not None:
                cache.conv_states = tuple(s for _, s in outs)
            if not self.causal:  # the backward scan convolves anti-causally, with the same weights
                q_b, k_b, v_b = self._heads(*(c(t, reverse=True)[0] for c, t in zip(convs, (q_in, k_in, v_in))), keep)
                backward = (q_b, k_b, v_b, log_decay)
        else:
            q, k, v = self._heads(q_in, k_in, v_in, keep)

        kernel_options = dict(chunk_size=self.chunk_size, backend=self.backend)
        if self.causal:
            o, state = gla(
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
            o = scan_both_ways(gla, (q, k, v, log_decay), backward, **kernel_options)  # (B, T, H, V)

        g = None if self.g_proj is None else self.g_proj(x).view(B, T, self.num_heads, self.head_v_dim)
        return self.o_proj(norm_and_gate(self.g_norm, self.gate_fn, o, g).reshape(B, T, self.value_dim))

    def new_cache(self, batch_size: int) -> GLACache:
        if not self.causal:
            return super().new_cache(batch_size)  # raises: only causal layers decode
        return GLACache(batch_size)

    def state_size(self, seq_len: int) -> int:
        size = self.num_heads * self.head_feature_dim * self.head_v_dim
        if self.use_short_conv:
            width = self.q_conv1d.state_width
            size += width * (self.q_conv1d.in_channels + self.k_conv1d.in_channels + self.v_conv1d.in_channels)
        return size
