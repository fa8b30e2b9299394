"""HGRN2 — Qin et al. 2024, "HGRN2: Gated Linear RNNs with State Expansion", https://arxiv.org/abs/2404.07904

HGRN's element-wise gated recurrence with its hidden state expanded by an outer product, which makes it a gated
linear attention whose key is tied to the forget gate (the paper's view of HGRN2 as a GLA). Per head, with f_t the
forget gate:

    f_t = lower_bound + (1 - lower_bound) * sigmoid(W_f x_t)          (per channel, in (0, 1); float32)
    S_t = diag(f_t) S_{t-1} + (1 - f_t)^T i_t,     i_t = W_i x_t           (input gate tied: k_t = 1 - f_t)
    o_t = K^-1/2 * swish(W_q x_t) S_t
    out_t = o_proj( RMSNorm(o_t over all heads) )

so the scan is ``gla(q = swish(W_q x), k = 1 - f, v = i, g = log f)`` (``attnzoo.kernels.gla``), computed in log
space: log f = logaddexp(log lower_bound, log1p(-lower_bound) + logsigmoid(W_f x)), k = -expm1(log f).

Defaults and parameter names are fla-org/flash-linear-attention ``fla/layers/hgrn2.py`` (``HGRN2Attention``):
``q_proj`` and ``f_proj`` (D -> H * expand_ratio), ``i_proj`` (D -> D), ``g_norm`` (one RMSNorm over the whole
width D, eps 1e-5, learnable scale), ``o_proj``; no output gate; the K^-1/2 scale is ``chunk_gla``'s default, which
HGRN2 keeps; short convolutions off (window 4, no bias, no activation, as FLA builds them for HGRN2). FLA derives the
head count from ``expand_ratio`` (default 128, so num_heads = hidden_size / 128 and the state per head is 128 x 128);
here the backbone sets ``num_heads``, and ``expand_ratio=None`` takes the head width D / H as the forget/key
dimension per head, the same square state. Initialisation is FLA's ``HGRN2PreTrainedModel._init_weights``: Linear
and Conv1d weights N(0, 0.02), biases zero.

Lower bound. HGRN (and HGRN2 after it) bound each layer's forget gate from below, with bounds that grow with depth: the
FLA model (``HGRN2Model``, ``use_lower_bound=True``) learns a (num_layers, D) table, takes its softmax over the layer
axis and a cumulative sum, minus the first row, so layer 0 has bound 0 and the bounds increase monotonically towards
1 with depth; the layer receives its row as the ``lower_bound`` argument of ``forward``. This layer takes that
argument too (a tensor of shape (H * K,) or a scalar tensor, differentiable), and for configs a fixed
``lower_bound`` option (a float in [0, 1), 0 = FLA's first layer and the plain sigmoid gate); the forward argument
overrides the option.

Patterns: ``causal_self`` (constant-size cache: the (B, H, K, V) state plus the convolution inputs) and
``noncausal_self`` as a bidirectional layer: the forward scan plus a scan over the reversed sequence, summed before
the norm, with every projection shared (layers/bidirectional.py). A padded position neither writes nor decays the
state: its log f is 0, so k = 1 - f = 0, and its i is zeroed (its input is zeroed before any convolution).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.kernels import gla
from attnzoo.layers.bidirectional import scan_both_ways
from attnzoo.layers.gla import MIN_LOG_DECAY, check_cache, float32_at_least, init_fla_, norm_and_gate
from attnzoo.layers.registry import Attention, register_attention
from attnzoo.layers.short_conv import ShortConvolution


def bounded_log_forget_gate(logits: Tensor, lower_bound: Tensor | None) -> Tensor:
    """log f for f = lower_bound + (1 - lower_bound) * sigmoid(logits), in float32 at least.

    logaddexp(log b, log(1 - b) + logsigmoid(z)) is finite for very negative logits where log(b + (1 - b) sigmoid(z))
    would lose sigmoid(z) to rounding. A bound of exactly 0 (the FLA model's first layer) is clamped to the smallest
    normal number, which keeps log b finite and its gradient defined; the result moves by at most 1e-12 relative.
    """
    log_f = F.logsigmoid(float32_at_least(logits))  # logsigmoid, not log(sigmoid): finite for any logit
    if lower_bound is None:
        return log_f
    bound = lower_bound.to(log_f.dtype).clamp_min(torch.finfo(log_f.dtype).tiny)
    return torch.logaddexp(bound.log(), torch.log1p(-bound) + log_f)


@dataclass
class HGRN2Cache:
    """Decoding state of one :class:`HGRN2Attention` layer.

    Attributes:
        batch_size: B, fixed at creation.
        state: (B, H, K, V) recurrent state, float32 (float64 for a float64 layer); None before the first call.
        conv_states: the q, f, i convolution inputs (B, C, conv_size - 1) each, or None (no short conv / no call yet).
        length: positions consumed so far.
    """

    batch_size: int
    state: Tensor | None = None
    conv_states: tuple[Tensor, Tensor, Tensor] | None = None
    length: int = 0


@register_attention("hgrn2")
class HGRN2Attention(Attention):
    """HGRN2: gated linear RNN with an outer-product state, forget gate f and tied input gate 1 - f; FLA defaults."""

    patterns = frozenset({"causal_self", "noncausal_self"})
    pattern_note = "HGRN2's forget gate orders the keys, so there is no cross-attention form."

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        expand_ratio: int | None = None,
        use_short_conv: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
        elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
        lower_bound: float = 0.0,
        chunk_size: int = 64,
        backend: str = "auto",
    ) -> None:
        """
        Args:
            dim: model width D (the input-gate / value width, V = D / H per head).
            num_heads: H heads.
            causal: True = causal_self with a recurrent cache; False = the bidirectional layer.
            cross: must be False (no cross pattern).
            expand_ratio: K, the forget-gate (and query/key) width per head (FLA's ``head_f_dim``); None = D / H.
            use_short_conv: depthwise causal convolutions (no activation) on q, f, i (FLA's ShortConvolution).
            conv_size: their window.
            conv_bias: their bias.
            elementwise_affine: learnable scale in the output RMSNorm.
            norm_eps: epsilon of the output RMSNorm.
            lower_bound: fixed lower bound b in [0, 1) of every forget gate, f = b + (1 - b) sigmoid(.); 0 = none.
                ``forward(..., lower_bound=tensor)`` overrides it (the FLA model's learned per-layer bound).
            chunk_size: chunk length of the scan kernel (results do not depend on it).
            backend: kernel backend, ``auto``/``reference``/``torch``/``triton``.
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        label = self.name
        head_f_dim = dim // num_heads if expand_ratio is None else expand_ratio
        if not isinstance(head_f_dim, int) or isinstance(head_f_dim, bool) or head_f_dim <= 0:
            raise ValueError(f"{label}: expand_ratio is the forget-gate width per head, a positive int or None; "
                             f"got {expand_ratio!r}.")  # fmt: skip
        if not isinstance(lower_bound, (int, float)) or not 0.0 <= lower_bound < 1.0:
            raise ValueError(
                f"{label}: lower_bound bounds a forget gate in (0, 1) from below, so it must be in [0, 1); "
                f"got {lower_bound!r}."
            )
        self.head_f_dim, self.head_i_dim = head_f_dim, dim // num_heads
        self.forget_dim = num_heads * head_f_dim
        self.lower_bound = float(lower_bound)
        self.chunk_size = chunk_size
        self.backend = backend

        self.q_proj = nn.Linear(dim, self.forget_dim, bias=False)
        self.f_proj = nn.Linear(dim, self.forget_dim, bias=False)
        self.i_proj = nn.Linear(dim, dim, bias=False)
        self.use_short_conv = use_short_conv
        if use_short_conv:  # FLA builds HGRN2's convolutions without an activation
            self.q_conv1d = ShortConvolution(self.forget_dim, conv_size, bias=conv_bias, activation=None)
            self.f_conv1d = ShortConvolution(self.forget_dim, conv_size, bias=conv_bias, activation=None)
            self.i_conv1d = ShortConvolution(dim, conv_size, bias=conv_bias, activation=None)
        self.g_norm = nn.RMSNorm(dim, eps=norm_eps, elementwise_affine=elementwise_affine)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        init_fla_(self)

    def _bound(self, lower_bound: Tensor | None, like: Tensor) -> Tensor | None:
        if lower_bound is None:
            return None if self.lower_bound == 0.0 else like.new_tensor(self.lower_bound)
        if (
            not isinstance(lower_bound, Tensor)
            or lower_bound.dim() > 1
            or lower_bound.numel() not in (1, self.forget_dim)
        ):
            got = tuple(lower_bound.shape) if isinstance(lower_bound, Tensor) else type(lower_bound).__name__
            raise ValueError(
                f"{self.name}: lower_bound must be a tensor of shape (H * K,) = ({self.forget_dim},) or a scalar "
                f"tensor, with values in [0, 1); got {got}."
            )  # fmt: skip
        return lower_bound.reshape(-1)

    def _features(
        self, q: Tensor, f: Tensor, i: Tensor, bound: Tensor | None, keep: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Projected (B, T, C) inputs -> q, k (B, T, H, K), v (B, T, H, V) and log f (B, T, H, K) for the scan."""
        B, T, _ = q.shape
        log_f = bounded_log_forget_gate(f, bound).clamp_min(MIN_LOG_DECAY)  # floor: see MIN_LOG_DECAY
        log_f = log_f.view(B, T, self.num_heads, self.head_f_dim)  # (B, T, H, K)
        v = i.view(B, T, self.num_heads, self.head_i_dim)  # (B, T, H, V)
        if keep is not None:  # a padded position: log f = 0, so k = 0 (no write) and no decay
            log_f, v = log_f * keep.to(log_f.dtype), v * keep
        k = -torch.expm1(log_f)  # 1 - f, exact for f near 1 where 1 - exp(.) cancels
        q = F.silu(q).view(B, T, self.num_heads, self.head_f_dim)  # (B, T, H, K)
        return q, k.to(v.dtype), v, log_f

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: HGRN2Cache | None = None,
        lower_bound: Tensor | None = None,
    ) -> Tensor:
        """``x`` (B, T, D) -> (B, T, D); ``lower_bound`` (H * K,) overrides the fixed option (FLA's argument)."""
        self.check_inputs(x, context, padding_mask, cache)
        if cache is not None:
            check_cache(self.name, cache, HGRN2Cache, x)
        B, T, _ = x.shape
        bound = self._bound(lower_bound, x)
        keep = None if padding_mask is None else padding_mask[:, :, None, None].to(x.dtype)  # (B, T, 1, 1)
        if keep is not None:
            x = x * keep[..., 0]  # zero padded inputs before any convolution
        q_in, f_in, i_in = self.q_proj(x), self.f_proj(x), self.i_proj(x)

        backward = None
        if self.use_short_conv:
            states = cache.conv_states if cache is not None and cache.conv_states is not None else (None,) * 3
            convs = (self.q_conv1d, self.f_conv1d, self.i_conv1d)
            outs = [conv(t, state=s) for conv, t, s in zip(convs, (q_in, f_in, i_in), states, strict=True)]
            features = self._features(*(y for y, _ in outs), bound, keep)
            if cache is not None:
                cache.conv_states = tuple(s for _, s in outs)
            if not self.causal:  # the backward scan convolves anti-causally, with the same weights
                mirrored = (c(t, reverse=True)[0] for c, t in zip(convs, (q_in, f_in, i_in), strict=True))
                backward = self._features(*mirrored, bound, keep)
        else:
            features = self._features(q_in, f_in, i_in, bound, keep)

        kernel_options = dict(chunk_size=self.chunk_size, backend=self.backend)
        if self.causal:
            o, state = gla(
                *features,
                initial_state=None if cache is None else cache.state,
                output_final_state=cache is not None,
                **kernel_options,
            )  # (B, T, H, V)
            if cache is not None:
                cache.state, cache.length = state, cache.length + T
        else:
            o = scan_both_ways(gla, features, backward, **kernel_options)  # (B, T, H, V)
        # one RMSNorm over all heads (FLA's RMSNorm(hidden_size)), in float32 at least
        return self.o_proj(norm_and_gate(self.g_norm, None, o.reshape(B, T, self.dim), None))

    def new_cache(self, batch_size: int) -> HGRN2Cache:
        if not self.causal:
            return super().new_cache(batch_size)  # raises: only causal layers decode
        return HGRN2Cache(batch_size)

    def state_size(self, seq_len: int) -> int:
        size = self.num_heads * self.head_f_dim * self.head_i_dim
        if self.use_short_conv:
            width = self.q_conv1d.state_width
            size += width * (2 * self.forget_dim + self.dim)
        return size
