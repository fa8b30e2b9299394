"""RWKV-7 time mixing — Peng et al. 2025, "RWKV-7 "Goose" with Expressive Dynamic State Evolution",
https://arxiv.org/abs/2503.14456; parameter names, defaults and initialisation of FLA's ``RWKV7Attention``
(fla/layers/rwkv7.py), itself a port of BlinkDL/RWKV-LM's RWKV-v7 ``RWKV_Tmix_x070``.

Per head, with the token shift x'_t = x_{t-1} - x_t (zero before the first token) and mu_* learned mixing weights:

    r, k, v = W_r (x + mu_r x'), W_k (x + mu_k x'), W_v (x + mu_v x')
    w_t = -exp(-1/2) * sigmoid(lora_w(x + mu_w x'))              (log decay per key channel, in (-0.61, 0))
    a_t = sigmoid(lora_a(x + mu_a x'))                           (in-context learning rate per key channel)
    kappa_t = normalize(k_t * k_k)                               (the unit "removal key")
    k_t <- k_t * (1 + (a_t - 1) * k_a)
    v_t <- lerp(v_t, v_first_t, sigmoid(lora_v(x + mu_v x')))   (value residual; every layer but the first)
    S_t = (diag(exp w_t) - kappa_t^T (a_t * kappa_t)) S_{t-1} + k_t^T v_t,     o_t = r_t S_t
    y_t = W_o [ (GroupNorm_h(o_t) + (sum_c r_tc k_tc rk_c) v_t) * lora_g(x + mu_g x') ]

The state (K x V per head) is read along kappa and rewritten along kappa * a: the generalised delta rule, computed by
:func:`attnzoo.kernels.dplr.dplr_delta_rule` (FLA's ``chunk_rwkv7`` with a = -kappa, b = kappa * a, scale 1).

**The value residual crosses layers.** Every layer after the first mixes its values with the *first* layer's values
of the same positions (``v_first``). A backbone that stacks RWKV-7 layers calls :meth:`RWKV7Attention.link_layers`
with them in order (GPT does, for any attention class that defines ``link_layers``): the first becomes the source
and keeps its values from the current forward, the others read them. ``layer_index`` / ``num_layers`` (GPT fills
them in) set FLA's depth-dependent initialisation and whether the layer has the ``v_lora`` mixing (not on layer 0).
A layer with ``layer_index > 0`` that was never linked raises. A standalone layer (``layer_index=0``) is its own
first layer.

Defaults: the LoRA ranks follow FLA's formulas of the width (``max(32, round(c * sqrt(D) * head_dim / 64 / 32) * 32)``
with c = 2.5 for decay and a, 1.7 for v, 5 for the gate, which has no head_dim factor), GroupNorm eps =
head_dim * 1e-5, k_proj orthogonal with gain 0.1, r/v orthogonal, the token-mixing weights, k_k, k_a, r_k and LoRA
biases as FLA's ``_initialize_weights`` for the layer's depth; FLA's zero output projection is an option
(``zero_init_output``; off, so that a fresh layer is not the zero map). Only causal_self: the token shift and the
recurrence run forward in time.
Padded positions are removed: their input is zeroed before the token shift (as FLA does for left padding) and their
k, v, kappa and decay are zeroed, so they neither write, erase nor decay the state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.kernels.dplr import dplr_delta_rule
from attnzoo.layers.gla import check_cache, float32_at_least
from attnzoo.layers.registry import Attention, register_attention

MAX_LOG_DECAY_RATE = math.exp(-0.5)  # w = -exp(-0.5) * sigmoid(.): RWKV-7's decay exp(w) stays in (0.545, 1)


class LowRank(nn.Module):
    """x -> up(act(down(x))), FLA's ``LoRA`` for the data-dependent parts (down starts at zero, up orthogonal x 0.1)."""

    def __init__(self, dim: int, out_dim: int, rank: int, activation: str | None, bias: bool = True) -> None:
        super().__init__()
        acts = {None: nn.Identity, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
        self.lora = nn.Sequential(nn.Linear(dim, rank, bias=False), acts[activation](), nn.Linear(rank, out_dim, bias))
        nn.init.zeros_(self.lora[0].weight)
        gain = math.sqrt(rank / out_dim) if rank > out_dim else 1.0
        nn.init.orthogonal_(self.lora[2].weight, gain=0.1 * gain)
        if bias:
            nn.init.zeros_(self.lora[2].bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.lora(x)


def _rank(width: int, factor: float, head_factor: float) -> int:
    return max(32, int(round(factor * width**0.5 * head_factor / 32) * 32))


@dataclass
class RWKV7Cache:
    """Decoding state of one RWKV-7 layer: the (B, H, K, V) state and the last (masked) input for the token shift."""

    batch_size: int
    state: Tensor | None = None
    last_x: Tensor | None = None  # (B, dim)
    length: int = 0


@register_attention("rwkv7")
class RWKV7Attention(Attention):
    """RWKV-7 time mixing: the generalised delta rule with vector decay and in-context learning rate; FLA names."""

    patterns = frozenset({"causal_self"})
    pattern_note = "RWKV-7's token shift and recurrence run forward in time; for non-causal use gla or deltanet."

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        layer_index: int | None = None,
        num_layers: int | None = None,
        decay_low_rank_dim: int | None = None,
        gate_low_rank_dim: int | None = None,
        a_low_rank_dim: int | None = None,
        v_low_rank_dim: int | None = None,
        norm_eps: float = 1e-5,
        elementwise_affine: bool = True,
        zero_init_output: bool = False,
        chunk_size: int = 16,
        backend: str = "auto",
    ) -> None:
        """
        Args:
            dim: model width D (= key and value width, as in FLA).
            num_heads: H heads of K = V = D / H channels (FLA's default head_dim 64).
            causal: must be True.
            cross: must be False.
            layer_index: position of the layer in the stack (FLA's ``layer_idx``; GPT sets it; None = 0, a layer on its
                own): the initialisation depends on it, and layer 0 is the value-residual source (no ``v_lora``).
            num_layers: depth of the stack (FLA's ``num_hidden_layers``; GPT sets it; None = 1).
            decay_low_rank_dim: rank of the decay LoRA (None: FLA's formula of D and K).
            gate_low_rank_dim: rank of the output-gate LoRA (None: FLA's formula of D).
            a_low_rank_dim: rank of the in-context-learning-rate LoRA (None: FLA's formula).
            v_low_rank_dim: rank of the value-residual LoRA (None: FLA's formula).
            norm_eps: per-head GroupNorm epsilon, multiplied by K (FLA: head_dim * norm_eps).
            elementwise_affine: the GroupNorm has a weight and bias.
            zero_init_output: start ``o_proj`` at zero, as FLA and RWKV-LM do (each layer then begins as the zero
                map, so the residual stream starts as the identity). Off by default: a fresh zoo layer is never the
                zero map, so swapping it in, or checking it, sees the mixer; the rest of FLA's init is kept.
            chunk_size: chunk length of the DPLR kernel (the result does not depend on it).
            backend: DPLR kernel backend, ``auto``/``reference``/``torch``.
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        layer_index = 0 if layer_index is None else layer_index
        num_layers = 1 if num_layers is None else num_layers
        if not (isinstance(layer_index, int) and isinstance(num_layers, int) and 0 <= layer_index < num_layers):
            raise ValueError(
                f"rwkv7: need 0 <= layer_index < num_layers; got layer_index={layer_index!r}, "
                f"num_layers={num_layers!r} (GPT sets both; e.g. layer_index=0, num_layers=1 for one layer)."
            )
        self.layer_index, self.num_layers = layer_index, num_layers
        self.chunk_size, self.backend = chunk_size, backend
        K, head_factor = self.head_dim, self.head_dim / 64
        decay_low_rank_dim = decay_low_rank_dim or _rank(dim, 2.5, head_factor)
        a_low_rank_dim = a_low_rank_dim or _rank(dim, 2.5, head_factor)
        v_low_rank_dim = v_low_rank_dim or _rank(dim, 1.7, head_factor)
        gate_low_rank_dim = gate_low_rank_dim or _rank(dim, 5.0, 1.0)

        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (
            nn.Parameter(torch.zeros(1, 1, dim)) for _ in range(6)
        )
        self.k_k = nn.Parameter(torch.zeros(dim))
        self.k_a = nn.Parameter(torch.zeros(dim))
        self.r_k = nn.Parameter(torch.zeros(num_heads, K))
        self.r_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.w_lora = LowRank(dim, dim, decay_low_rank_dim, "tanh")
        self.v_lora = LowRank(dim, dim, v_low_rank_dim, None) if layer_index > 0 else None
        self.a_lora = LowRank(dim, dim, a_low_rank_dim, None)
        self.g_lora = LowRank(dim, dim, gate_low_rank_dim, "sigmoid", bias=False)
        self.g_norm = nn.GroupNorm(num_heads, dim, eps=K * norm_eps, affine=elementwise_affine)
        self._init_rwkv_(zero_init_output)
        # value-residual wiring (plain attributes, not submodules: the source's parameters stay its own)
        self._value_source: RWKV7Attention | None = None
        self._has_readers = False
        self._first_value: Tensor | None = None

    @torch.no_grad()
    def _init_rwkv_(self, zero_init_output: bool) -> None:
        """FLA's ``_initialize_weights`` for the layer at ``layer_index`` of ``num_layers``."""
        D, K = self.dim, self.head_dim
        ratio_0_to_1 = self.layer_index / max(self.num_layers - 1, 1)
        ratio_1_to_almost0 = 1.0 - self.layer_index / self.num_layers
        n = torch.arange(D, dtype=torch.float64)
        ddd = (n / D).view(1, 1, D)
        linear = n / max(D - 1, 1) - 0.5
        zigzag = ((n % K) - (K - 1) / 2) / max((K - 1) / 2, 1e-12)
        zigzag = zigzag * zigzag.abs()
        www = -6 + 6 * (n / max(D - 1, 1)) ** (1 + ratio_0_to_1**0.3)
        for param, power in ((self.x_r, 0.2), (self.x_w, 0.9), (self.x_k, 0.7), (self.x_v, 0.7), (self.x_a, 0.9)):
            param.copy_(1.0 - ddd.pow(power * ratio_1_to_almost0))
        self.x_g.copy_(1.0 - ddd.pow(0.2 * ratio_1_to_almost0))
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        self.k_k.copy_(0.71 - linear * 0.1)
        self.w_lora.lora[2].bias.copy_(www + 0.5 + zigzag * 2.5)  # + 0.5: the sigmoid's midpoint, as in FLA
        self.a_lora.lora[2].bias.copy_(-0.19 + zigzag * 0.3 + linear * 0.4)
        if self.v_lora is not None:
            self.v_lora.lora[2].bias.copy_(0.73 - linear * 0.4)
        if self.g_norm.weight is not None:
            self.g_norm.weight.fill_(((self.layer_index + 1) / self.num_layers) ** 0.7)
        nn.init.orthogonal_(self.r_proj.weight)
        nn.init.orthogonal_(self.k_proj.weight, gain=0.1)
        nn.init.orthogonal_(self.v_proj.weight)
        if zero_init_output:
            nn.init.zeros_(self.o_proj.weight)
        else:
            nn.init.orthogonal_(self.o_proj.weight)

    @classmethod
    def link_layers(cls, layers: list[RWKV7Attention]) -> None:
        """Wire the value residual of a stack: ``layers`` in order; the first is the source of v_first."""
        if not layers:
            return
        source, readers = layers[0], layers[1:]
        if source.v_lora is not None:
            raise ValueError(
                f"rwkv7: the first RWKV-7 layer of a stack must have layer_index=0 (it has {source.layer_index}); "
                f"it is the source of the value residual."
            )
        for layer in readers:
            if layer.v_lora is None:
                raise ValueError("rwkv7: only the first layer of a stack may have layer_index=0.")
            layer._value_source = source
        source._has_readers = bool(readers)

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: RWKV7Cache | None = None,
    ) -> Tensor:
        self.check_inputs(x, context, padding_mask, cache)
        if cache is not None:
            check_cache(self.name, cache, RWKV7Cache, x)
        B, T, D = x.shape
        H, K = self.num_heads, self.head_dim
        keep = None if padding_mask is None else padding_mask[..., None].to(x.dtype)  # (B, T, 1)
        if keep is not None:
            x = x * keep
        previous = x.new_zeros(B, 1, D) if cache is None or cache.last_x is None else cache.last_x[:, None]
        shift = torch.cat([previous, x[:, :-1]], dim=1) - x  # x_{t-1} - x_t
        xr, xw, xk, xv, xa, xg = (torch.addcmul(x, shift, mu) for mu in (self.x_r, self.x_w, self.x_k, self.x_v,
                                                                           self.x_a, self.x_g))  # fmt: skip
        r, k, v = self.r_proj(xr), self.k_proj(xk), self.v_proj(xv)
        if self.v_lora is None:
            if self._has_readers:
                self._first_value = v
        else:
            if self._value_source is None or self._value_source._first_value is None:
                raise RuntimeError(
                    f"rwkv7 (layer_index={self.layer_index}) mixes in the first layer's values, but it was not linked "
                    f"to a first layer: build it inside GPT, or call RWKV7Attention.link_layers(stack) on the stack "
                    f"and run the stack in order."
                )
            v = torch.lerp(v, self._value_source._first_value, torch.sigmoid(self.v_lora(xv)))
        dtype = float32_at_least(x).dtype
        log_decay = -MAX_LOG_DECAY_RATE * torch.sigmoid(self.w_lora(xw).to(dtype))
        rate = torch.sigmoid(self.a_lora(xa))
        gate = self.g_lora(xg)
        kappa = F.normalize((k * self.k_k).view(B, T, H, K).to(dtype), dim=-1)
        k = k * (1 + (rate - 1) * self.k_a)
        if keep is not None:  # a padded position neither writes, erases nor decays
            v, k = v * keep, k * keep
            kappa = kappa * keep[..., None].to(dtype)
            log_decay = log_decay * keep.to(dtype)
        heads = (B, T, H, K)
        r_h, k_h, v_h, rate_h = r.view(heads), k.view(heads), v.view(heads), rate.view(heads).to(dtype)
        o, state = dplr_delta_rule(
            r_h.to(dtype),
            k_h.to(dtype),
            v_h.to(dtype),
            -kappa,
            kappa * rate_h,
            log_decay.view(heads),
            scale=1.0,
            initial_state=None if cache is None else cache.state,
            output_final_state=cache is not None,
            chunk_size=self.chunk_size,
            backend=self.backend,
        )  # (B, T, H, V)
        if cache is not None:
            cache.state, cache.last_x, cache.length = state, x[:, -1], cache.length + T
        o = self.g_norm(o.reshape(B * T, D).to(x.dtype)).view(B, T, D)
        bonus = (r_h * k_h * self.r_k).sum(-1, keepdim=True) * v_h  # (B, T, H, V): the current token's own k v
        return self.o_proj((o + bonus.reshape(B, T, D)) * gate)

    def new_cache(self, batch_size: int) -> RWKV7Cache:
        return RWKV7Cache(batch_size)

    def state_size(self, seq_len: int) -> int:
        return self.num_heads * self.head_dim * self.head_dim + self.dim  # S per head + the token-shift input
