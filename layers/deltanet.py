"""DeltaNet — Yang, Wang, Zhang, Shen, Kim 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence
Length", https://arxiv.org/abs/2406.06484 (the delta rule as a fast-weight update: Schlag, Irie, Schmidhuber 2021,
https://arxiv.org/abs/2102.11174)

Per head, the state is a (K, V) associative memory that each token corrects towards its value instead of only adding
to it (one step of online regression on || k_t S - v_t ||^2 with learning rate beta_t):

    q_t, k_t = L2norm(SiLU(conv(W_q x)_t)), L2norm(SiLU(conv(W_k x)_t)),     v_t = SiLU(conv(W_v x)_t)
    beta_t = sigmoid(W_b x_t)                      (one per head; 2 * sigmoid with allow_neg_eigval)
    S_t = S_{t-1} + beta_t k_t^T (v_t - k_t S_{t-1}) = S_{t-1} (I - beta_t k_t^T k_t) + beta_t k_t^T v_t
    o_t = K^-1/2 * q_t S_t,      out_t = o_proj( RMSNorm_head(o_t) )     (* SiLU(g_proj x_t) with use_gate)

conv is a short causal depthwise convolution per channel (window 4). Because k_t has unit norm, I - beta_t k_t^T k_t
has eigenvalues 1 and 1 - beta_t in [0, 1] (in [-1, 1] with allow_neg_eigval, Grazzi et al. 2024,
https://arxiv.org/abs/2411.12537), so the state never grows. The recurrence is ``attnzoo.kernels.delta_rule``.

Defaults and parameter names are fla-org/flash-linear-attention ``fla/layers/delta_net.py`` (``DeltaNet``): expand_k =
expand_v = 1 (K = V = dim / num_heads), beta on, no output gate, short convolutions on with window 4 and no bias,
qk_activation silu folded into the q/k convolutions, L2 norm of q and k (eps 1e-6, FLA's ``l2norm``), v always through
SiLU, per-head RMSNorm with eps 1e-5. Names: ``q_proj k_proj v_proj b_proj q_conv1d k_conv1d v_conv1d g_proj o_norm
o_proj``, so an FLA checkpoint loads without renaming. FLA's ``qk_norm="sum"`` is not offered (its denominator
x.sum(-1) can be zero). Initialisation is FLA's ``_init_weights`` as in layers/gla.py (Linear and Conv1d weights
N(0, 0.02), biases zero).

Patterns: ``causal_self`` with a constant-size cache (the (B, H, K, V) state and the convolution inputs) and
``noncausal_self`` as a bidirectional layer: the delta rule run forwards plus the delta rule run over the reversed
sequence (its convolutions anti-causal, same weights), summed before the norm, every projection shared
(layers/bidirectional.py). A padded position neither writes nor decays the state: its input is zeroed before the
convolutions and it gets k = 0 and beta = 0 (and log-decay 0 in gated_deltanet), in both directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.errors import unknown
from attnzoo.kernels import delta_rule
from attnzoo.layers.bidirectional import scan_both_ways
from attnzoo.layers.gla import check_cache, float32_at_least, init_fla_, norm_and_gate
from attnzoo.layers.registry import Attention, register_attention
from attnzoo.layers.short_conv import ShortConvolution

# FLA's qk activations; silu is fused into the q/k short convolutions, the others follow them (fla/layers/delta_net.py)
QK_ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "elu": lambda t: F.elu(t) + 1.0,  # FLA's elu_p1: positive features
    "identity": lambda t: t,
}
L2_EPS = 1e-6  # FLA's l2norm: x / sqrt(sum(x^2) + 1e-6)


def l2_normalize(t: Tensor) -> Tensor:
    """``t / sqrt(sum(t^2) + 1e-6)`` over the last dim (FLA's ``l2norm``); finite for a zero row (a padded key)."""
    return t * torch.rsqrt(t.square().sum(-1, keepdim=True) + L2_EPS)


@dataclass
class DeltaNetCache:
    """Decoding state of one :class:`DeltaNet` or :class:`~attnzoo.layers.gated_deltanet.GatedDeltaNet` layer.

    Attributes:
        batch_size: B, fixed at creation.
        state: (B, H, K, V) fast-weight memory, float32 (float64 for a float64 layer); None before the first call.
        conv_states: the q, k, v convolution inputs (B, C, conv_size - 1) each, or None (no short conv / no call yet).
        length: positions consumed so far.
    """

    batch_size: int
    state: Tensor | None = None
    conv_states: tuple[Tensor, Tensor, Tensor] | None = None
    length: int = 0


class DeltaRuleAttention(Attention):
    """The parts DeltaNet and Gated DeltaNet share: short convolutions, L2-normalised q/k, the delta-rule scan (one
    direction or both), the per-head output norm and gate, the cache. Subclasses build the modules named in
    :meth:`_build` and may define a per-head log-decay (:meth:`log_decay`)."""

    patterns = frozenset({"causal_self", "noncausal_self"})
    pattern_note = "The delta rule orders the keys, so there is no cross-attention form."

    def _build(
        self,
        *,
        key_dim: int,
        value_dim: int,
        use_short_conv: bool,
        conv_size: int,
        conv_bias: bool,
        qk_activation: str,
        use_beta: bool,
        use_gate: bool,
        norm_eps: float,
        allow_neg_eigval: bool,
        chunk_size: int | None,
        backend: str,
    ) -> None:
        """q/k/v/b projections, short convolutions, output gate, norm and projection, with FLA's names and order."""
        label = self.name
        if qk_activation not in QK_ACTIVATIONS:
            raise ValueError(f"{label}: " + unknown("qk_activation", qk_activation, QK_ACTIVATIONS))
        if not isinstance(conv_size, int) or conv_size < 1:
            raise ValueError(f"{label}: conv_size must be a positive integer; got {conv_size!r}.")
        self.key_dim, self.value_dim = key_dim, value_dim
        self.head_k_dim, self.head_v_dim = key_dim // self.num_heads, value_dim // self.num_heads
        self.qk_activation = qk_activation
        self.allow_neg_eigval = allow_neg_eigval
        self.chunk_size, self.backend = chunk_size, backend

        self.q_proj = nn.Linear(self.dim, key_dim, bias=False)
        self.k_proj = nn.Linear(self.dim, key_dim, bias=False)
        self.v_proj = nn.Linear(self.dim, value_dim, bias=False)
        self.b_proj = nn.Linear(self.dim, self.num_heads, bias=False) if use_beta else None
        self.use_short_conv = use_short_conv
        if use_short_conv:
            qk_conv_activation = "silu" if qk_activation == "silu" else None
            self.q_conv1d = ShortConvolution(key_dim, conv_size, bias=conv_bias, activation=qk_conv_activation)
            self.k_conv1d = ShortConvolution(key_dim, conv_size, bias=conv_bias, activation=qk_conv_activation)
            self.v_conv1d = ShortConvolution(value_dim, conv_size, bias=conv_bias, activation="silu")
        self.g_proj = nn.Linear(self.dim, value_dim, bias=False) if use_gate else None
        self.o_norm = nn.RMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(value_dim, self.dim, bias=False)

    # ------------------------------------------------------------------------------------------------------------
    # per-token quantities

    def write_strength(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, H) beta_t = sigmoid(b_proj x_t) in float32 at least, or 1 without ``b_proj`` (FLA's
        use_beta=False); times 2 with allow_neg_eigval."""
        if self.b_proj is None:
            beta = x.new_ones(*x.shape[:2], self.num_heads, dtype=float32_at_least(x).dtype)
        else:
            beta = torch.sigmoid(float32_at_least(self.b_proj(x)))
        return beta * 2.0 if self.allow_neg_eigval else beta

    def log_decay(self, x: Tensor) -> Tensor | None:
        """(B, T, D) -> (B, T, H) log forget gate (<= 0) or None for the plain delta rule."""
        return None

    def _heads(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, C) features after the convolutions -> activated, L2-normalised (B, T, H, K|V) kernel inputs."""
        B, T, _ = q.shape
        if not self.use_short_conv:  # the convolutions would have applied these SiLUs
            if self.qk_activation == "silu":
                q, k = F.silu(q), F.silu(k)
            v = F.silu(v)
        dtype = float32_at_least(q).dtype  # the delta rule's (I - beta k^T k) products are computed in float32
        q = q.to(dtype).view(B, T, self.num_heads, self.head_k_dim)  # (B, T, H, K)
        k = k.to(dtype).view(B, T, self.num_heads, self.head_k_dim)  # (B, T, H, K)
        v = v.to(dtype).view(B, T, self.num_heads, self.head_v_dim)  # (B, T, H, V)
        if self.qk_activation != "silu":
            q, k = QK_ACTIVATIONS[self.qk_activation](q), QK_ACTIVATIONS[self.qk_activation](k)
        q, k = l2_normalize(q), l2_normalize(k)
        if keep is not None:  # a padded key writes nothing (beta is zeroed too)
            k = k * keep.to(dtype)
        return q, k, v

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: DeltaNetCache | None = None,
    ) -> Tensor:
        self.check_inputs(x, context, padding_mask, cache)
        if cache is not None:
            check_cache(self.name, cache, DeltaNetCache, x)
        B, T, _ = x.shape
        keep = None if padding_mask is None else padding_mask[:, :, None, None]  # (B, T, 1, 1)
        if keep is not None:
            x = x * keep[..., 0].to(x.dtype)  # zero padded inputs before any convolution
        q_in, k_in, v_in = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        beta = self.write_strength(x)  # (B, T, H)
        log_decay = self.log_decay(x)  # (B, T, H) or None
        if keep is not None:  # a padded position neither writes nor decays
            beta = beta * keep[..., 0].to(beta.dtype)
            log_decay = None if log_decay is None else log_decay * keep[..., 0].to(log_decay.dtype)

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
                backward = (q_b, k_b, v_b, beta) + (() if log_decay is None else (log_decay,))
        else:
            q, k, v = self._heads(q_in, k_in, v_in, keep)

        forward_inputs = (q, k, v, beta) + (() if log_decay is None else (log_decay,))
        kernel_options = dict(chunk_size=self.chunk_size, backend=self.backend)
        if self.causal:
            o, state = delta_rule(
                *forward_inputs,
                initial_state=None if cache is None else cache.state,
                output_final_state=cache is not None,
                **kernel_options,
            )  # (B, T, H, V)
            if cache is not None:
                cache.state, cache.length = state, cache.length + T
        else:
            o = scan_both_ways(delta_rule, forward_inputs, backward, **kernel_options)  # (B, T, H, V)

        g = None if self.g_proj is None else self.g_proj(x).view(B, T, self.num_heads, self.head_v_dim)
        o = norm_and_gate(self.o_norm, None if g is None else F.silu, o, g)
        return self.o_proj(o.reshape(B, T, self.value_dim).to(v_in.dtype))

    def new_cache(self, batch_size: int) -> DeltaNetCache:
        if not self.causal:
            return super().new_cache(batch_size)  # raises: only causal layers decode
        return DeltaNetCache(batch_size)

    def state_size(self, seq_len: int) -> int:
        size = self.num_heads * self.head_k_dim * self.head_v_dim
        if self.use_short_conv:
            width = self.q_conv1d.state_width
            size += width * (self.q_conv1d.in_channels + self.k_conv1d.in_channels + self.v_conv1d.in_channels)
        return size


@register_attention("deltanet")
class DeltaNet(DeltaRuleAttention):
    """DeltaNet: linear attention whose memory is corrected by the delta rule, L2-normalised q/k, short convs; FLA."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        use_beta: bool = True,
        use_gate: bool = False,
        use_short_conv: bool = True,
        conv_size: int = 4,
        conv_bias: bool = False,
        allow_neg_eigval: bool = False,
        qk_activation: str = "silu",
        norm_eps: float = 1e-5,
        chunk_size: int | None = None,
        backend: str = "auto",
    ) -> None:
        """
        Args:
            dim: model width D.
            num_heads: H heads.
            causal: True = causal_self with a recurrent cache; False = the bidirectional layer.
            cross: must be False (no cross pattern).
            expand_k: int(D * expand_k) key channels, split over the heads (K = D_k / H).
            expand_v: int(D * expand_v) value channels (V = D_v / H).
            use_beta: learn beta_t = sigmoid(b_proj x_t) per head; False = beta 1 (no ``b_proj``).
            use_gate: multiply the normalised output by SiLU(g_proj x) (FLA's FusedRMSNormGated).
            use_short_conv: depthwise causal convolutions on q, k, v (FLA: "crucial to the performance").
            conv_size: their window.
            conv_bias: their bias.
            allow_neg_eigval: beta = 2 sigmoid(.) in (0, 2), so I - beta k^T k can have a negative eigenvalue.
            qk_activation: feature map of q and k before the L2 norm: ``silu``, ``relu``, ``elu`` (elu + 1) or
                ``identity``.
            norm_eps: epsilon of the per-head output RMSNorm.
            chunk_size: chunk length of the delta-rule kernel (results do not depend on it); None = the
                backend's own (32 on the CPU torch path, 64 on triton: FLA's).
            backend: kernel backend, ``auto``/``reference``/``torch``/``triton``.
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        key_dim, value_dim = int(dim * expand_k), int(dim * expand_v)
        if key_dim % num_heads or value_dim % num_heads or not key_dim or not value_dim:
            raise ValueError(
                f"{self.name}: int(dim * expand_k) = {key_dim} and int(dim * expand_v) = {value_dim} must be "
                f"positive multiples of num_heads={num_heads}; change expand_k / expand_v (dim={dim})."
            )
        self._build(
            key_dim=key_dim,
            value_dim=value_dim,
            use_short_conv=use_short_conv,
            conv_size=conv_size,
            conv_bias=conv_bias,
            qk_activation=qk_activation,
            use_beta=use_beta,
            use_gate=use_gate,
            norm_eps=norm_eps,
            allow_neg_eigval=allow_neg_eigval,
            chunk_size=chunk_size,
            backend=backend,
        )
        init_fla_(self)
