"""Mamba-2 (SSD) — Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through
Structured State Space Duality", https://arxiv.org/abs/2405.21060

    [z, xBC, dt] = in_proj(u);   [x, B, C] = SiLU(causal_depthwise_conv(xBC))
    dt_t = softplus(dt_t + dt_bias) (per head),   A_h = -exp(A_log_h)
    H_t = exp(dt_t A_h) H_{t-1} + dt_t B_t^T x_t     (per head: H in R^{N x P}),   y_t = C_t H_t + D_h x_t
    out = out_proj( RMSNorm(y * SiLU(z)) )           (gated RMSNorm, norm after the gate, over groups of E / G)

The scan is ``attnzoo.kernels.simple_gla`` with q = C, k = B, v = dt * x, g = dt * A, scale = 1 — SSD is GLA with
one scalar data-dependent decay per head; the state is kept as (B, H, N, P) (mamba_ssm keeps
(B, H, P, N)).

Defaults, parameter names (``in_proj conv1d dt_bias A_log D norm.weight out_proj``) and initialisation follow
state-spaces/mamba ``mamba_ssm/modules/mamba2.py``: d_state 128, d_conv 4, expand 2, ngroups 1, conv bias on, no
linear biases, chunk 256; A_log = ln U(1, 16); dt_bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max] =
[1e-3, 0.1] floored at 1e-4; D = 1; A_log, D and dt_bias marked ``_no_weight_decay``; in_proj, conv1d and out_proj
keep PyTorch's default init as mamba_ssm does (its model-level out_proj rescale by 1/sqrt(n_layer) belongs to the
backbone).

Heads: the registry passes ``num_heads``. With ``headdim=None`` (the default here) the layer has ``num_heads`` heads
of ``headdim = expand * dim / num_heads``; mamba_ssm's own default corresponds to ``headdim=64``, which sets
``nheads = expand * dim / 64`` and ignores ``num_heads``.

Patterns: ``causal_self`` with a constant-size cache (conv inputs + SSM state); ``noncausal_self`` is bidirectional
as Vim: the forward scan plus a scan over the reversed sequence (the convolution run anti-causally, same weights),
each with its own D skip, summed before the gated norm (layers/bidirectional.py). A padded position has its conv
input zeroed and dt = 0 there, so it neither writes nor decays the state in either direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.kernels import simple_gla
from attnzoo.layers.bidirectional import scan_both_ways
from attnzoo.layers.gla import MIN_LOG_DECAY, check_cache, float32_at_least
from attnzoo.layers.registry import Attention, register_attention
from attnzoo.layers.short_conv import ShortConvolution


class RMSNormGated(nn.Module):
    """mamba_ssm's ``RMSNormGated``: ``RMSNorm(y * SiLU(z))`` (or ``RMSNorm(y) * SiLU(z)`` with norm_before_gate),
    normalising over groups of ``group_size`` channels, with a learnable ``weight`` (E,)."""

    def __init__(self, dim: int, *, group_size: int, eps: float = 1e-5, norm_before_gate: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size, self.eps, self.norm_before_gate = group_size, eps, norm_before_gate

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        # y, z: (B, T, E); float32 at least, as mamba_ssm's kernel computes the norm in float32
        y, z = float32_at_least(y), float32_at_least(z)
        if not self.norm_before_gate:
            y = y * F.silu(z)
        groups = y.unflatten(-1, (-1, self.group_size))  # (B, T, G, E / G)
        groups = groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + self.eps)
        out = groups.flatten(-2) * self.weight
        return out * F.silu(z) if self.norm_before_gate else out


@dataclass
class Mamba2Cache:
    """Decoding state of one :class:`Mamba2` layer.

    Attributes:
        batch_size: B, fixed at creation.
        conv_state: (B, E + 2 G N, d_conv - 1) the last pre-convolution xBC inputs; None before the first call.
        ssm_state: (B, H, N, P) SSM state, float32 at least; None before the first call.
        length: positions consumed so far.
    """

    batch_size: int
    conv_state: Tensor | None = None
    ssm_state: Tensor | None = None
    length: int = 0


@register_attention("mamba2")
class Mamba2(Attention):
    """Mamba-2 / SSD: selective state space with one scalar decay per head, gated RMSNorm; mamba_ssm defaults."""

    patterns = frozenset({"causal_self", "noncausal_self"})
    pattern_note = "Mamba-2's scan orders the positions, so there is no cross-attention form."
    # A_log and D stay float32 under half precision, as mamba_ssm keeps them
    float32_params = frozenset({"A_log", "D"})

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int | None = None,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        norm_eps: float = 1e-5,
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 64,
        backend: str = "auto",
    ) -> None:
        """
        Args:
            dim: model width D (mamba_ssm's d_model).
            num_heads: SSM heads H when ``headdim`` is None (then P = expand * dim / num_heads).
            causal: True = causal_self with a recurrent cache; False = the bidirectional layer.
            cross: must be False (no cross pattern).
            d_state: N, the state size per head (B and C width).
            d_conv: window of the causal depthwise convolution over xBC.
            expand: E = expand * dim inner width.
            headdim: P; if given, H = E / P and ``num_heads`` is ignored (mamba_ssm's default is 64).
            ngroups: G groups of B and C shared by H / G consecutive heads (like GQA).
            A_init_range: A_h = -exp(A_log_h) with exp(A_log_h) ~ U(A_init_range) at init.
            dt_min: smallest initial dt (log-uniform init of dt_bias).
            dt_max: largest initial dt.
            dt_init_floor: lower clamp of the initial dt.
            D_has_hdim: the skip D has one value per channel (H * P) instead of per head.
            rmsnorm: gated RMSNorm on the output; False = y * SiLU(z) only.
            norm_before_gate: RMSNorm(y) * SiLU(z) instead of RMSNorm(y * SiLU(z)).
            norm_eps: epsilon of the gated RMSNorm.
            bias: biases in in_proj and out_proj.
            conv_bias: bias in the convolution.
            chunk_size: chunk length of the scan kernel (results do not depend on it; 64 measured fastest on a CPU,
                mamba_ssm's GPU kernel uses 256).
            backend: kernel backend, ``auto``/``reference``/``torch``/``triton``.
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        label = self.name
        self.d_inner = int(expand * dim)
        if headdim is None:
            if self.d_inner % num_heads:
                raise ValueError(f"{label}: expand * dim = {self.d_inner} is not divisible by num_heads={num_heads}.")
            headdim = self.d_inner // num_heads
        elif not isinstance(headdim, int) or headdim <= 0 or self.d_inner % headdim:
            raise ValueError(
                f"{label}: headdim must divide expand * dim = {self.d_inner}; got {headdim!r} "
                f"(or pass headdim=None to use num_heads={num_heads} heads)."
            )
        self.headdim, self.nheads = headdim, self.d_inner // headdim
        if not isinstance(ngroups, int) or ngroups <= 0 or self.nheads % ngroups:
            raise ValueError(f"{label}: ngroups must divide the {self.nheads} heads; got {ngroups!r}.")
        low, high = A_init_range
        if not 0 < low <= high:
            raise ValueError(f"{label}: A_init_range must be (low, high) with 0 < low <= high; got {A_init_range!r}.")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"{label}: need 0 < dt_min <= dt_max; got dt_min={dt_min!r}, dt_max={dt_max!r}.")
        self.d_state, self.ngroups = d_state, ngroups
        self.chunk_size, self.backend = chunk_size, backend
        E, N, G, H = self.d_inner, d_state, ngroups, self.nheads

        self.in_proj = nn.Linear(dim, 2 * E + 2 * G * N + H, bias=bias)  # -> [z, x, B, C, dt]
        self.conv1d = ShortConvolution(E + 2 * G * N, d_conv, bias=conv_bias, activation="silu")
        # dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max] (mamba2.py; inverse softplus as in
        # https://github.com/pytorch/pytorch/issues/72759: dt + log(-expm1(-dt)))
        dt = torch.exp(torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        # A_h = -exp(A_log_h), exp(A_log_h) ~ U(A_init_range); kept in float32 (mamba2.py)
        self.A_log = nn.Parameter(torch.empty(H, dtype=torch.float32).uniform_(low, high).log())
        self.D = nn.Parameter(torch.ones(E if D_has_hdim else H))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = (
            RMSNormGated(E, group_size=E // G, eps=norm_eps, norm_before_gate=norm_before_gate) if rmsnorm else None
        )
        self.out_proj = nn.Linear(E, dim, bias=bias)

    def _ssm_inputs(self, xbc: Tensor, dt: Tensor, keep: Tensor | None) -> tuple[Tensor, ...]:
        """Split the convolved xBC into the scan's (q, k, v, g) = (C, B, dt * x, dt * A) plus x for the D skip."""
        Bsz, T, _ = xbc.shape
        E, N, G, H, P = self.d_inner, self.d_state, self.ngroups, self.nheads, self.headdim
        x, B, C = xbc.split([E, G * N, G * N], dim=-1)
        dtype = float32_at_least(dt).dtype
        x = x.reshape(Bsz, T, H, P).to(dtype)  # (B, T, H, P)
        B = B.reshape(Bsz, T, G, N).repeat_interleave(H // G, dim=2).to(dtype)  # (B, T, H, N)
        C = C.reshape(Bsz, T, G, N).repeat_interleave(H // G, dim=2).to(dtype)  # (B, T, H, N)
        if keep is not None:  # padded positions write nothing (their dt is already 0)
            B = B * keep[..., None]
        A = -torch.exp(self.A_log.to(dtype))  # (H,)
        log_decay = (dt * A).clamp_min(MIN_LOG_DECAY)  # exp(-60) ~ 1e-26 is already a full reset (see gla.py)
        return C, B, x * dt[..., None], log_decay, x

    def _skip(self, x: Tensor) -> Tensor:
        D = self.D.to(x.dtype)
        return x * (D.view(self.nheads, self.headdim) if D.numel() == self.d_inner else D[:, None])

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: Mamba2Cache | None = None,
    ) -> Tensor:
        self.check_inputs(x, context, padding_mask, cache)
        if cache is not None:
            check_cache(self.name, cache, Mamba2Cache, x)
        Bsz, T, _ = x.shape
        E, N, G, H = self.d_inner, self.d_state, self.ngroups, self.nheads
        z, xbc, dt = self.in_proj(x).split([E, E + 2 * G * N, H], dim=-1)
        dt = F.softplus(float32_at_least(dt) + self.dt_bias.to(float32_at_least(dt).dtype))  # (B, T, H)
        keep = None
        if padding_mask is not None:
            keep = padding_mask[:, :, None].to(dt.dtype)  # (B, T, 1)
            xbc = xbc * keep.to(xbc.dtype)  # zero padded inputs before the convolution
            dt = dt * keep  # dt = 0: no decay (g = dt * A = 0) and no write (v = dt * x = 0)

        xbc_forward, conv_state = self.conv1d(xbc, state=None if cache is None else cache.conv_state)
        q, k, v, g, x_skip = self._ssm_inputs(xbc_forward, dt, keep)
        kernel_options = dict(scale=1.0, chunk_size=self.chunk_size, backend=self.backend)
        if self.causal:
            y, state = simple_gla(
                q,
                k,
                v,
                g,
                initial_state=None if cache is None else cache.ssm_state,
                output_final_state=cache is not None,
                **kernel_options,
            )  # (B, T, H, P)
            if cache is not None:
                cache.conv_state, cache.ssm_state, cache.length = conv_state, state, cache.length + T
            y = y + self._skip(x_skip)
        else:
            q_b, k_b, v_b, g_b, x_skip_b = self._ssm_inputs(self.conv1d(xbc, reverse=True)[0], dt, keep)
            y = scan_both_ways(simple_gla, (q, k, v, g), (q_b, k_b, v_b, g_b), **kernel_options)
            y = y + self._skip(x_skip) + self._skip(x_skip_b)  # each direction has its own D skip (Vim)

        y = y.reshape(Bsz, T, E)
        y = self.norm(y, z) if self.norm is not None else y * F.silu(float32_at_least(z))
        return self.out_proj(y.to(x.dtype))

    def new_cache(self, batch_size: int) -> Mamba2Cache:
        if not self.causal:
            return super().new_cache(batch_size)  # raises: only causal layers decode
        return Mamba2Cache(batch_size)

    def state_size(self, seq_len: int) -> int:
        return self.nheads * self.d_state * self.headdim + self.conv1d.state_width * self.conv1d.in_channels
