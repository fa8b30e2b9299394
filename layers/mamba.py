"""Mamba (selective state-space) block — Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces", https://arxiv.org/abs/2312.00752

    [x, z] = in_proj(u);   x = SiLU(causal_depthwise_conv(x))                                    (E = expand * dim)
    [dt, B_t, C_t] = x_proj(x_t);   delta_t = softplus(dt_proj(dt)) in R^E                      (bias inside softplus)
    h_t = exp(delta_t ⊗ A) ⊙ h_{t-1} + (delta_t * x_t) ⊗ B_t,   y_t = h_t · C_t + D ⊙ x_t,   A = -exp(A_log)
    out = out_proj(y ⊙ SiLU(z))

Parameter names and initialisation are mamba_ssm's (mamba_ssm/modules/mamba_simple.py), so mamba_ssm and FLA
(``fla.layers.Mamba``) state dicts load with ``load_state_dict``: dt bias = softplus^-1 of a log-uniform draw in
[dt_min, dt_max] floored at dt_init_floor; dt_proj weight U(-s, s) with s = dt_rank^-1/2 * dt_scale; A_log = ln(1..N)
(S4D-real) and D = 1, both float32 with ``_no_weight_decay``; dt_proj.bias carries ``_no_reinit``. Defaults are
mamba_simple's (d_state 16, d_conv 4, expand 2, dt_rank ceil(dim / 16)). mamba_ssm's model-level init re-draws
out_proj (kaiming-uniform, divided by sqrt(residuals per layer * layers)); :meth:`Mamba.rescale_out_proj` does that
for a backbone that wants it. Mamba has no heads: ``num_heads`` is accepted for the contract (dim % num_heads is still
checked) and otherwise ignored.

Patterns: ``causal_self`` (the paper's layer; the cache holds mamba_ssm's conv_state (B, E, d_conv), the last d_conv
pre-conv inputs oldest first, and ssm_state (B, E, N)); ``noncausal_self`` is bidirectional as Vim's "bimamba v2"
(Zhu et al. 2024, https://arxiv.org/abs/2401.09417): a second scan runs over the reversed sequence with its own
conv1d_b, x_proj_b, dt_proj_b, A_b_log and D_b (Vim's names), sharing in_proj, the z gate and out_proj, and the two
gated outputs are averaged before out_proj (Vim's ``if_divide_out=True``, used by its released models: averaging
keeps the output scale of the causal layer). Padding: a padded position's input is zeroed before the conv and its
step size delta is 0, so it neither writes to nor decays the state, in either direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.kernels import selective_scan
from attnzoo.layers.registry import Attention, register_attention

DT_INITS = ("random", "constant")


def _acc(t: Tensor) -> Tensor:
    """float32 for low-precision tensors, float64 kept (scan-side numerics)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


@dataclass
class MambaCache:
    """Decoding state of one Mamba layer (mamba_ssm's semantics)."""

    conv_state: Tensor  # (B, E, d_conv): the last d_conv pre-conv inputs, oldest first (zeros before the start)
    ssm_state: Tensor  # (B, E, N): h after the last position, float32 (float64 for a float64 layer)

    @property
    def batch_size(self) -> int:  # read by the contract's input check
        return self.conv_state.shape[0]


@register_attention("mamba")
class Mamba(Attention):
    """Mamba-1 selective SSM block (mamba_ssm names and init); causal, or bidirectional like Vim."""

    patterns = frozenset({"causal_self", "noncausal_self"})
    pattern_note = "Mamba scans one sequence; it has no cross-attention form."
    # mamba_ssm keeps A_log and D in fp32 whatever the model dtype ("Keep in fp32")
    float32_params = frozenset({"A_log", "D", "A_b_log", "D_b"})

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
    ) -> None:
        """
        Args:
            dim: model width (mamba's d_model).
            num_heads: ignored (Mamba-1 has no heads); dim must still be divisible by it (the contract).
            causal: the causal layer; False gives the bidirectional (Vim) layer.
            cross: must be False (no cross pattern).
            d_state: N, the state size per channel.
            d_conv: width of the causal depthwise convolution.
            expand: E = int(expand * dim) inner channels.
            dt_rank: rank of the delta projection; "auto" = ceil(dim / 16).
            dt_min: smallest initial step size.
            dt_max: largest initial step size.
            dt_init: "random" (dt_proj weight U(-s, s)) or "constant" (all s), s = dt_rank^-1/2 * dt_scale.
            dt_scale: scales s.
            dt_init_floor: initial step sizes are floored at this value.
            conv_bias: bias in the depthwise convolution.
            bias: bias in in_proj and out_proj.
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        if dt_init not in DT_INITS:
            raise ValueError(f"mamba: dt_init must be one of {DT_INITS}; got {dt_init!r}.")
        if dt_rank != "auto" and not (isinstance(dt_rank, int) and dt_rank > 0):
            raise ValueError(f"mamba: dt_rank must be 'auto' or a positive int; got {dt_rank!r}.")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"mamba: need 0 < dt_min <= dt_max; got dt_min={dt_min!r}, dt_max={dt_max!r}.")
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = E = int(expand * dim)
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else dt_rank
        init = dict(dt_min=dt_min, dt_max=dt_max, dt_init=dt_init, dt_scale=dt_scale, dt_init_floor=dt_init_floor)
        self.in_proj = nn.Linear(dim, 2 * E, bias=bias)
        self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D = self._direction(conv_bias, **init)
        if not causal:  # Vim's backward-direction parameters
            self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b = self._direction(conv_bias, **init)
        self.out_proj = nn.Linear(E, dim, bias=bias)

    def _direction(
        self,
        conv_bias: bool,
        *,
        dt_min: float,
        dt_max: float,
        dt_init: str,
        dt_scale: float,
        dt_init_floor: float,
    ) -> tuple[nn.Conv1d, nn.Linear, nn.Linear, nn.Parameter, nn.Parameter]:
        E, N, R = self.d_inner, self.d_state, self.dt_rank
        conv1d = nn.Conv1d(E, E, self.d_conv, groups=E, padding=self.d_conv - 1, bias=conv_bias)
        x_proj = nn.Linear(E, R + 2 * N, bias=False)
        dt_proj = nn.Linear(R, E, bias=True)
        # delta starts in [dt_min, dt_max]: weight small, bias = softplus^-1(dt) (mamba_simple.py)
        std = R**-0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                dt_proj.weight.fill_(std)
            else:
                dt_proj.weight.uniform_(-std, std)
            dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            # inverse softplus, stably: log(exp(dt) - 1) = dt + log(1 - exp(-dt)) = dt + log(-expm1(-dt))
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        dt_proj.bias._no_reinit = True
        # S4D-real initialisation A = -(1..N) per channel, kept in float32 (mamba: "Keep in fp32")
        A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))
        A_log._no_weight_decay = True
        D = nn.Parameter(torch.ones(E))
        D._no_weight_decay = True
        return conv1d, x_proj, dt_proj, A_log, D

    @torch.no_grad()
    def rescale_out_proj(self, num_layers: int, residuals_per_layer: int = 1) -> None:
        """mamba_ssm's model-level init of out_proj (mixer_seq_simple._init_weights, rescale_prenorm_residual):
        kaiming-uniform(a=sqrt(5)), then divided by sqrt(residuals_per_layer * num_layers) (2 per layer with an MLP).
        """
        nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
        self.out_proj.weight /= math.sqrt(residuals_per_layer * num_layers)

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: MambaCache | None = None,
    ) -> Tensor:
        self.check_inputs(x, context, padding_mask, cache)
        xs, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (B, E, T) each
        if padding_mask is not None:  # padded inputs must not reach a real position through the conv window
            xs = xs * padding_mask[:, None, :]
        params = (self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        y = self._scan(xs, z, padding_mask, cache, *params)  # (B, E, T)
        if not self.causal:
            params_b = (self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b)
            mask_b = None if padding_mask is None else padding_mask.flip(-1)
            y_b = self._scan(xs.flip(-1), z.flip(-1), mask_b, None, *params_b).flip(-1)
            y = (y + y_b) / 2  # Vim's if_divide_out
        return self.out_proj(y.transpose(1, 2))

    def _scan(
        self,
        xs: Tensor,
        z: Tensor,
        padding_mask: Tensor | None,
        cache: MambaCache | None,
        conv1d: nn.Conv1d,
        x_proj: nn.Linear,
        dt_proj: nn.Linear,
        A_log: Tensor,
        D: Tensor,
    ) -> Tensor:
        """conv -> SiLU -> x_proj -> delta -> selective scan, gated by SiLU(z): (B, E, T) -> (B, E, T)."""
        T = xs.shape[-1]
        if cache is None:
            xc = conv1d(xs)[..., :T]  # left padding d_conv - 1, truncated: causal
        else:
            # the cached d_conv - 1 previous inputs replace the zero padding
            window = torch.cat([cache.conv_state[..., 1:].to(xs.dtype), xs], dim=-1)  # (B, E, d_conv - 1 + T)
            xc = F.conv1d(window, conv1d.weight, conv1d.bias, groups=self.d_inner)
            cache.conv_state.copy_(window[..., -self.d_conv :])  # T >= 1, so the window holds >= d_conv inputs
        xc = F.silu(xc)
        dt, B, C = x_proj(xc.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # bias inside the softplus, in float32 (mamba_ssm adds it in the kernel)
        delta = F.softplus(_acc(F.linear(dt, dt_proj.weight)) + _acc(dt_proj.bias))  # (B, T, E)
        if padding_mask is not None:  # delta = 0: no write (delta * x) and no decay (exp(0) = 1)
            delta = delta * padding_mask[..., None]
        A = -torch.exp(_acc(A_log))  # (E, N)
        y, last_state = selective_scan(
            xc,
            delta.transpose(1, 2),
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            D,
            z,
            return_last_state=True,
            initial_state=None if cache is None else cache.ssm_state,
        )
        if cache is not None:
            cache.ssm_state.copy_(last_state)
        return y

    def new_cache(self, batch_size: int) -> MambaCache:
        if not self.causal:
            return super().new_cache(batch_size)  # raises: only causal layers decode
        weight = self.in_proj.weight
        return MambaCache(
            conv_state=weight.new_zeros(batch_size, self.d_inner, self.d_conv),
            ssm_state=torch.zeros(
                batch_size, self.d_inner, self.d_state, device=weight.device, dtype=_acc(self.A_log).dtype
            ),
        )

    def state_size(self, seq_len: int) -> int:
        return self.d_inner * (self.d_conv + self.d_state)  # constant: conv window + SSM state per channel
