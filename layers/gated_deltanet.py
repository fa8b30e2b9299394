"""Gated DeltaNet — Yang, Kautz, Hatamizadeh 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule",
https://arxiv.org/abs/2412.06464

DeltaNet's corrective write (layers/deltanet.py) with Mamba-2's scalar data-dependent forget gate per head, so the
memory can both erase quickly (alpha_t -> 0) and edit one association precisely (the delta rule):

    q_t, k_t = L2norm(SiLU(conv(W_q x)_t)), L2norm(SiLU(conv(W_k x)_t)),     v_t = SiLU(conv(W_v x)_t)
    beta_t = sigmoid(W_b x_t),      log alpha_t = g_t = -exp(A_log) * softplus(W_a x_t + dt_bias)      (per head, <= 0)
    S_t = alpha_t S_{t-1} (I - beta_t k_t^T k_t) + beta_t k_t^T v_t,      o_t = K^-1/2 * q_t S_t
    out_t = o_proj( RMSNorm_head(o_t) * SiLU(g_proj x_t) )

The recurrence is ``attnzoo.kernels.delta_rule`` with ``g``; the decay is applied before the delta update, as in FLA.

Defaults, parameter names and initialisation are fla-org/flash-linear-attention ``fla/layers/gated_deltanet.py``
(``GatedDeltaNet``): expand_v 2 (V = 2 K), output gate on (FLA's ``FusedRMSNormGated``: RMSNorm(o) * SiLU(g)),
short convolutions with window 4 and no bias, SiLU on q, k, v, L2-normalised q/k (eps 1e-6), RMSNorm eps 1e-5;
A_log = ln U(0, 16) and dt_bias = softplus^-1(dt) with dt log-uniform in [1e-3, 0.1] floored at 1e-4 (Mamba-2's
init), both ``_no_weight_decay``; other Linear / Conv1d weights N(0, 0.02), biases zero (layers/gla.py). Names:
``q_proj k_proj v_proj a_proj b_proj A_log dt_bias q_conv1d k_conv1d v_conv1d g_proj o_norm o_proj``.

Heads: FLA fixes head_dim 256 with 6 heads at hidden size 2048, i.e. 0.75 * hidden key channels (its docstring:
"num_heads * head_dim = 0.75 * hidden_size", which with expand_v 2 and the gate gives Mamba-2's ~6 hidden^2
parameters). Here the registry passes ``num_heads``, and ``head_dim=None`` (the default) keeps FLA's ratio:
K = floor(0.75 * dim / num_heads), V = expand_v * K, as layers/mamba2.py keeps mamba_ssm's expand and takes the heads
from the registry.
Pass ``head_dim`` to set K directly. FLA's grouped value heads (``num_v_heads``) are not offered.

Patterns, cache and padding are DeltaNet's (layers/deltanet.py): ``causal_self`` with a constant-size cache,
``noncausal_self`` as the delta rule forwards plus over the reversed sequence; a padded position has its input zeroed
before the convolutions, k = 0, beta = 0 and g = 0, so it neither writes nor decays the state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.layers.deltanet import DeltaRuleAttention
from attnzoo.layers.gla import MIN_LOG_DECAY, float32_at_least, init_fla_
from attnzoo.layers.registry import register_attention

# FLA's Mamba-2-style init ("hard coded for now" in fla/layers/gated_deltanet.py)
A_INIT_RANGE = (0.0, 16.0)
DT_MIN, DT_MAX, DT_INIT_FLOOR = 0.001, 0.1, 1e-4


@register_attention("gated_deltanet")
class GatedDeltaNet(DeltaRuleAttention):
    """Gated DeltaNet: the delta rule with a Mamba-2 scalar forget gate per head and a SiLU output gate; FLA."""

    # A_log stays float32 under half precision (FLA and mamba_ssm's Mamba-2 create it in float32)
    float32_params = frozenset({"A_log"})

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        head_dim: int | None = None,
        expand_v: float = 2.0,
        use_gate: bool = True,
        use_short_conv: bool = True,
        allow_neg_eigval: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
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
            head_dim: K, the key/query width per head; None = floor(0.75 * dim / num_heads) (FLA's 0.75 ratio).
            expand_v: V = expand_v * K, the value width per head (must be an integer).
            use_gate: multiply the normalised output by SiLU(g_proj x) (FLA's FusedRMSNormGated).
            use_short_conv: depthwise causal convolutions + SiLU on q, k, v (FLA: "crucial to the performance").
            allow_neg_eigval: beta = 2 sigmoid(.) in (0, 2), so I - beta k^T k can have a negative eigenvalue.
            conv_size: the convolutions' window.
            conv_bias: their bias.
            norm_eps: epsilon of the per-head output RMSNorm.
            chunk_size: chunk length of the delta-rule kernel (results do not depend on it); None = the
                backend's own (32 on the CPU torch path, 64 on triton: FLA's).
            backend: kernel backend, ``auto``/``reference``/``torch``/``triton``.
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        label = self.name
        if head_dim is None:
            head_dim = max(1, (3 * dim) // (4 * num_heads))
        elif not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(
                f"{label}: head_dim must be a positive integer or None (= 0.75 * dim / num_heads); got {head_dim!r}."
            )
        head_v_dim = int(head_dim * expand_v)
        if head_v_dim <= 0 or not math.isclose(head_dim * expand_v, head_v_dim, rel_tol=1e-5):
            raise ValueError(
                f"{label}: head_dim * expand_v = {head_dim} * {expand_v} = {head_dim * expand_v} must be a positive "
                f"integer (the value width per head); change expand_v or head_dim."
            )
        self._build(
            key_dim=num_heads * head_dim,
            value_dim=num_heads * head_v_dim,
            use_short_conv=use_short_conv,
            conv_size=conv_size,
            conv_bias=conv_bias,
            qk_activation="silu",
            use_beta=True,
            use_gate=use_gate,
            norm_eps=norm_eps,
            allow_neg_eigval=allow_neg_eigval,
            chunk_size=chunk_size,
            backend=backend,
        )
        self.a_proj = nn.Linear(dim, num_heads, bias=False)
        init_fla_(self)
        # alpha = exp(-A * dt): A = exp(A_log) ~ U(0, 16), kept in float32 (FLA, as mamba_ssm's Mamba-2)
        self.A_log = nn.Parameter(torch.empty(num_heads, dtype=torch.float32).uniform_(*A_INIT_RANGE).log())
        # dt_bias = softplus^-1(dt), dt log-uniform in [1e-3, 0.1] (inverse softplus as in
        # https://github.com/pytorch/pytorch/issues/72759: dt + log(-expm1(-dt)))
        dt = torch.exp(torch.rand(num_heads) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
        dt = dt.clamp(min=DT_INIT_FLOOR)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        for p in (self.A_log, self.dt_bias):
            p._no_weight_decay = True

    def log_decay(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, H) g_t = -exp(A_log) * softplus(a_proj x_t + dt_bias) in float32 at least, floored at
        MIN_LOG_DECAY = -60 (a decay of 1e-26, already a full reset; keeps the kernel's exponents in range)."""
        logits = float32_at_least(self.a_proj(x))
        dtype = logits.dtype
        g = -self.A_log.to(dtype).exp() * F.softplus(logits + self.dt_bias.to(dtype))
        return g.clamp_min(MIN_LOG_DECAY)
