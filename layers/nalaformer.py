"""NaLaFormer's norm-aware linear attention (NaLa) — Meng et al. 2025, "NaLaFormer: Norm-Aware Linear Attention for
Transformer Models", https://arxiv.org/abs/2506.21137 (at ICML 2026 as "Norm x Direction: Restoring the Missing
Query Norm in Vision Linear Attention"). Reference impl: https://github.com/ZacharyMeng/NaLaFormer
(``NaLaformer/NALA.py``, ``NormAwareLinearAttn``); the equations below are that code's.

Linear attention (the elu+1 or ReLU kind) normalises away the query norm, although in softmax attention the norm sets
how spiky a query's distribution is. NaLa splits each query into its norm and its direction and lets the norm set a
power on the direction's features. Its non-negativity (the paper's cosine-based direction similarity, "cosine
inhibit") is, in the official code, a split of q and k into positive and negative parts: features stay >= 0, yet a
coordinate that is negative in both q and k still counts, where a plain ReLU map would drop it. Per head, with
D = head_dim and the official constants:

    p(q)      = 3 (0.5 + tanh(|q|_2))                                     power in [1.5, 4.5), grows with the norm
    phi_q(q)  = [ (relu(q) / |q|_2) ** p(q) ; (relu(-q) / |q|_2) ** p(q) ]       2 D features in [0, 1]
    phi_k(k)  = [ relu(k ** 3) ; relu(-(k ** 3)) ]                               2 D features >= 0
    o_i       = phi_q(q_i) (1/n_i) sum_j phi_k(k_j)^T v_j / (phi_q(q_i) . (1/n_i) sum_j phi_k(k_j) + eps)
    y         = out_proj(LayerNorm(o) * SiLU(g))                                   (gate=True, official)

with n_i the number of real keys query i sees (all of them; j <= i and n_i = i if causal) and eps = 1e-6: the
official code divides both sums by the key count (``k.mean`` and the N ** -0.5 factors on k and v) before adding
eps, so eps acts against the mean. phi_q(q) . phi_k(k) = sum_d [q_d k_d > 0] (|q_d| / |q|)^p |k_d|^3: a coordinate
with opposite signs in q and k contributes 0, matching signs contribute, and a larger |q| sharpens the distribution
over the keys. Every feature is per token, so the sums run through :func:`attnzoo.kernels.linear_attn` (chunked on
CPU, O(T)) and causal NaLa decodes with the constant state S (2D x D), z (2D) per head plus the key count.

Defaults and names from ``NormAwareLinearAttn``: one fused ``qkvg`` projection (dim -> 4 dim, with bias; order q, k,
v, g), ``ln`` = LayerNorm(dim) and SiLU gate on the attention output, ``out_proj`` with bias, features and sums in
float32. ``gate=False`` drops g, the LayerNorm and the SiLU (``qkvg`` then projects to 3 dim).

LePE (official ``lepe``): a depthwise convolution of V (one filter per channel of dim, with bias, zero 'same'
padding) added to o before the LayerNorm, 5 x 5 in the official model. Layouts as the zoo's SLAB layer: on a 2-D
token grid (``grid_size=(h, w)``, row-major; the ViT backbone passes its patch grid) a k x k ``Conv2d`` (the official
module, so its weights load); on a 1-D sequence a centred length-k ``Conv1d``; for ``causal_self`` a causal length-k
convolution (the current token and the k - 1 before it, this zoo's form), whose last k - 1 inputs ride in the
decoding cache. Prefix tokens (``num_prefix_tokens``, the ViT's class token) take part in the attention but get no
LePE (they have no grid position). Cross-attention has no LePE (the values live on the context's positions, not the
queries'): ``lepe_kernel=None`` means 5 for self-attention and 0 for cross. Padded tokens get zero values before the
convolution. Left out: the official 2-D RoPE on the numerator features (the zoo's backbones bring their own
positions). The paper's home is vision (non-causal); the causal form is the same equations with prefix sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.kernels import linear_attn
from attnzoo.layers.registry import Attention, register_attention
from attnzoo.layers.short_conv import ShortConvolution
from attnzoo.layers.windows import check_grid, check_prefix

POWER_SCALE, POWER_OFFSET = 3.0, 0.5  # official: power = 3 * (0.5 + tanh(|q|))
KEY_POWER = 3  # official: k = k ** 3 before the sign split
LEPE_KERNEL = 5  # official: nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
NORM_FLOOR = 1e-12  # |q| below this is treated as this (a zero query has no direction); keeps 0 / 0 out


def norm_aware_query_features(q: Tensor) -> Tensor:
    """phi_q: (..., D) -> (..., 2 D), [(relu(q)/|q|) ** p ; (relu(-q)/|q|) ** p] with p = 3 (0.5 + tanh |q|)."""
    norm = q.norm(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)
    power = POWER_SCALE * (POWER_OFFSET + torch.tanh(norm))
    # the direction's parts lie in [0, 1], so the power (>= 1.5) cannot overflow; 0 ** p = 0 with a zero gradient
    return torch.cat([(F.relu(q) / norm) ** power, (F.relu(-q) / norm) ** power], dim=-1)


def norm_aware_key_features(k: Tensor) -> Tensor:
    """phi_k: (..., D) -> (..., 2 D), [relu(k ** 3) ; relu(-(k ** 3))]."""
    cube = k**KEY_POWER
    return torch.cat([F.relu(cube), F.relu(-cube)], dim=-1)


def norm_aware_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    eps: float = 1e-6,
    padding_mask: Tensor | None = None,
    count_offset: Tensor | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """NaLa on projected per-head q, k, v (the functional core of :class:`NaLaAttention`).

    Args:
        q: (B, T, H, D) queries (feature-mapped here).
        k: (B, S, H, D) keys (feature-mapped here).
        v: (B, S, H, V) values.
        causal: query i sees keys j <= i (S == T).
        eps: added to the mean-normalised denominator (official 1e-6).
        padding_mask: (B, S) bool, True = real key; padded keys are removed and not counted.
        count_offset: (B,) int64 real keys before this call (causal decoding).
        initial_state: (B, H, 2D, V + 1) sums of the earlier keys (last column: sum of phi_k).
        output_final_state: also return the state after the last key.

    Returns:
        ``(o, state, count)``: o (B, T, H, V) in float32 at least, the state or None, and the (B,) count of real keys
        seen after this call.
    """
    B, S = k.shape[:2]
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):  # powers, cubes and sums in float32 at least
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        phi_q, phi_k = norm_aware_query_features(q), norm_aware_key_features(k)
        real = padding_mask if padding_mask is not None else torch.ones(B, S, dtype=torch.bool, device=q.device)
        if padding_mask is not None:  # zero features: a padded key adds nothing to either sum
            phi_k = phi_k * padding_mask[:, :, None, None]
        if causal:
            count = real.long().cumsum(1)  # (B, T): real keys at positions <= i
            if count_offset is not None:
                count = count + count_offset[:, None]
        else:
            count = real.long().sum(1, keepdim=True).expand(B, q.shape[1])
        # the ones column makes the last output column phi_q . sum phi_k (the denominator before the mean)
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        o, state = linear_attn(
            phi_q,
            phi_k,
            v1,
            causal=causal,
            normalize=False,
            initial_state=initial_state,
            output_final_state=output_final_state,
        )
        # (q S / n) / (q z / n + eps) = q S / (q z + eps n); n >= 1 so a query that sees no key gets 0, not 0 / 0
        n = count.clamp_min(1).to(dtype)[:, :, None, None]
        o = o[..., :-1] / (o[..., -1:] + eps * n)
    return o, state, count[:, -1] if causal else real.long().sum(1)


@dataclass
class NaLaCache:
    """Decoding state of one causal NaLa layer: ``state`` (B, H, 2D, D + 1) = [sum phi_k^T v, sum phi_k], ``count``
    (B,) int64 real keys seen (the n of the mean), ``conv_state`` (B, dim, k - 1) the last values seen by LePE."""

    batch_size: int
    state: Tensor | None = None
    count: Tensor | None = None
    conv_state: Tensor | None = None
    length: int = 0


@register_attention("nalaformer")
class NaLaAttention(Attention):
    """NaLaFormer: norm-aware linear attention (query norm sets the power of its direction features), gated output."""

    patterns = frozenset({"noncausal_self", "causal_self", "noncausal_cross"})

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        gate: bool = True,
        lepe_kernel: int | None = None,
        grid_size: tuple[int, int] | None = None,
        num_prefix_tokens: int | None = None,
        eps: float = 1e-6,
        bias: bool = True,
    ) -> None:
        """
        Args:
            dim: model width.
            num_heads: heads; head_dim = dim // num_heads (2 head_dim features per head).
            causal: query i sees keys j <= i (prefix sums of the same equations).
            cross: keys/values from ``context``.
            gate: official output gate out_proj(LayerNorm(o) * SiLU(g)); False: out_proj(o).
            lepe_kernel: LePE window k (odd unless causal; 0 = no LePE); None = 5 (official) for self-attention, 0
                for cross-attention.
            grid_size: (h, w) token grid (row-major) for a 2-D LePE, or None for a 1-D sequence. The ViT backbone
                sets its patch grid. Non-causal only.
            num_prefix_tokens: tokens before the grid/sequence (class tokens), left out of LePE; None = 0
                (the ViT sets its class tokens).
            eps: added to the mean-normalised denominator (official 1e-6).
            bias: bias in ``qkvg`` and ``out_proj`` (official: ``nn.Linear`` default, True).
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        label = self.name
        if not eps >= 0:
            raise ValueError(f"{label}: eps must be >= 0; got {eps!r}.")
        if lepe_kernel is None:
            lepe_kernel = 0 if cross else LEPE_KERNEL
        if not isinstance(lepe_kernel, int) or isinstance(lepe_kernel, bool) or lepe_kernel < 0:
            raise ValueError(
                f"{label}: lepe_kernel must be an integer >= 0 (0 = no LePE) or None; got {lepe_kernel!r}."
            )
        if lepe_kernel and cross:
            raise ValueError(
                f"{label}: LePE convolves the values along the query positions, which a cross-attention context does "
                f"not share; build the cross layer with lepe_kernel=0 (or None); got {lepe_kernel}."
            )
        if lepe_kernel and not causal and lepe_kernel % 2 == 0:
            raise ValueError(
                f"{label}: a non-causal lepe_kernel must be odd (centred 'same' padding); got {lepe_kernel}."
            )
        grid_size = check_grid(label, grid_size)
        if grid_size is not None and causal:
            raise ValueError(f"{label}: grid_size is for the non-causal 2-D layout; a causal layer runs in 1-D.")
        num_prefix_tokens = check_prefix(label, num_prefix_tokens)
        if causal and num_prefix_tokens:
            raise ValueError(f"{label}: num_prefix_tokens (class tokens) is for the non-causal layer; got causal=True.")
        self.eps = eps
        self.gate = gate
        self.lepe_kernel = lepe_kernel
        self.grid_size = grid_size
        self.num_prefix_tokens = num_prefix_tokens
        self.qkvg = nn.Linear(dim, (4 if gate else 3) * dim, bias=bias)  # rows: q, k, v[, g] (official order)
        if not lepe_kernel:
            self.lepe = None
        elif causal:
            self.lepe = ShortConvolution(dim, lepe_kernel, bias=True, activation=None)
        else:
            conv = nn.Conv1d if grid_size is None else nn.Conv2d
            self.lepe = conv(dim, dim, lepe_kernel, padding=lepe_kernel // 2, groups=dim)
        self.ln = nn.LayerNorm(dim) if gate else nn.Identity()
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def _project(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """q, k, v (and g) from the fused projection; cross-attention takes k, v from the context's rows."""
        if not self.cross:
            parts = self.qkvg(x).chunk(4 if self.gate else 3, dim=-1)
            return parts[0], parts[1], parts[2], parts[3] if self.gate else None
        C = self.dim
        weight, bias = self.qkvg.weight, self.qkvg.bias

        def rows(start: int, stop: int) -> tuple[Tensor, Tensor | None]:
            return weight[start:stop], None if bias is None else bias[start:stop]

        q = F.linear(x, *rows(0, C))
        k, v = F.linear(context, *rows(C, 3 * C)).chunk(2, dim=-1)
        g = F.linear(x, *rows(3 * C, 4 * C)) if self.gate else None
        return q, k, v, g

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: NaLaCache | None = None,
    ) -> Tensor:
        self.check_inputs(x, context, padding_mask, cache)
        B, T, _ = x.shape
        H, D, P = self.num_heads, self.head_dim, self.num_prefix_tokens
        if self.lepe is not None and T <= P:
            raise ValueError(f"{self.name}: x has {T} tokens, no more than its num_prefix_tokens={P}.")
        if self.grid_size is not None and self.lepe is not None and self.grid_size[0] * self.grid_size[1] != T - P:
            h, w = self.grid_size
            raise ValueError(
                f"{self.name}: built for num_prefix_tokens={P} + a {h}x{w} grid = {P + h * w} tokens; got {T}. Build "
                f"it with the grid of your input (the ViT passes its patch grid) or grid_size=None for a 1-D sequence."
            )
        q, k, v, g = self._project(x, context)
        S = k.shape[1]
        o, state, count = norm_aware_attention(
            q.view(B, T, H, D),
            k.view(B, S, H, D),
            v.view(B, S, H, D),
            causal=self.causal,
            eps=self.eps,
            padding_mask=padding_mask,
            count_offset=None if cache is None else cache.count,
            initial_state=None if cache is None else cache.state,
            output_final_state=cache is not None,
        )
        o = o.reshape(B, T, self.dim)
        if self.lepe is not None:
            lepe, conv_state = self._lepe(v, padding_mask, None if cache is None else cache.conv_state)
            o = torch.cat([o[:, :P], o[:, P:] + lepe], dim=1)
            if cache is not None:
                cache.conv_state = conv_state
        if cache is not None:
            cache.state, cache.count, cache.length = state, count, cache.length + T
        o = o.to(x.dtype)
        if g is not None:
            o = self.ln(o) * F.silu(g)
        return self.out_proj(o)

    def _lepe(self, v: Tensor, padding_mask: Tensor | None, state: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """LePE of the values (B, T, dim) of the tokens after the prefix, in float32 at least; padded values are
        zeroed first. Returns the convolution and, causal, the new convolution state."""
        dtype = torch.promote_types(v.dtype, torch.float32)
        with torch.autocast(v.device.type, enabled=False):
            v = v.to(dtype)
            if padding_mask is not None:
                v = v * padding_mask[:, :, None]
            if self.causal:
                return self.lepe(v, state=state)
            v = v[:, self.num_prefix_tokens :]
            B, L, C = v.shape
            weight, bias = self.lepe.weight.to(dtype), self.lepe.bias.to(dtype)
            if self.grid_size is None:
                out = F.conv1d(v.transpose(1, 2), weight, bias, padding=self.lepe_kernel // 2, groups=C)
            else:  # row-major tokens -> (B, C, h, w), as the official module's reshape
                image = v.transpose(1, 2).reshape(B, C, *self.grid_size)
                out = F.conv2d(image, weight, bias, padding=self.lepe_kernel // 2, groups=C)
            return out.reshape(B, C, L).transpose(1, 2), None

    def new_cache(self, batch_size: int) -> NaLaCache:
        if not self.causal:
            return super().new_cache(batch_size)  # raises: only causal layers decode
        return NaLaCache(batch_size)

    def state_size(self, seq_len: int) -> int:
        conv = self.dim * (self.lepe_kernel - 1) if self.lepe is not None else 0  # LePE's last k - 1 values
        return self.num_heads * 2 * self.head_dim * (self.head_dim + 1) + conv  # S, z per head (+ an int count)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gate={self.gate}, lepe_kernel={self.lepe_kernel}, grid_size={self.grid_size}"
