"""SLAB's simplified linear attention — Guo et al. 2024, "SLAB: Efficient Transformers with Simplified Linear
Attention and Progressive Re-parameterized Batch Normalization", ICML 2024, https://arxiv.org/abs/2405.11582.
Reference impl: https://github.com/xinghaochen/SLAB (classification/models/slab_swin.py
``SimplifiedLinearAttention``; slab_deit.py ``Attention``, the same computation).

ReLU features, the usual linear-attention normaliser, and a depthwise convolution of the values that restores the
local detail (and the rank) a low-rank linear attention map lacks (the DWC of FLatten Transformer), per head:

    q~ = relu(q),   k~ = relu(k + PE)
    o_i = q~_i sum_j k~_j^T v_j / (q~_i . sum_j k~_j + eps) + DWC(V)_i              (j <= i if causal)
    y   = proj(o)

DWC is a depthwise ``kernel_size`` convolution over the token layout with zero padding; its one filter per channel
is shared by the heads (official: ``Conv2d(head_dim, head_dim, groups=head_dim)`` applied to every head's values).
Layouts: on a 2-D token grid (``grid_size=(h, w)``, row-major; the ViT backbone passes its patch grid) a
k x k convolution over the grid; on a 1-D sequence (``grid_size=None``) a centred length-k convolution; for
``causal_self`` a causal length-k convolution (the current token and the k - 1 before it), whose last k - 1 values
are kept in the decoding cache beside the linear-attention state, so decoding is O(1) per token. The causal form is
this zoo's: the paper defines the layer for vision backbones only (its LLaMA experiments keep softmax attention).

PE is a learned absolute position encoding added to the keys (zero-initialised, official), one row per grid
position: it exists only with a ``grid_size`` (the official code sizes it to the window or patch grid); on a 1-D
sequence positions are the backbone's business. Prefix tokens (``num_prefix_tokens``, ViT's class token) take part
in the attention but not in the DWC or PE (they have no grid position; the official DeiT model has no class token).

The progressive re-parameterised BatchNorm (PRepBN) of the paper replaces the backbone's LayerNorm; it is not part
of the attention and is not implemented here. Defaults from ``SimplifiedLinearAttention``: kernel_size 5, qkv_bias
True (the DeiT variant's constructor says False but its models pass True), eps 1e-6 added to the denominator, proj
with bias, no scale on q or k (the ReLU features are scale-equivariant, so a scale would only move eps). Its unused
``focusing_factor`` is left out. Padded tokens get zero key features and zero values, so they enter neither the sums
nor the DWC. The sums run through :func:`attnzoo.kernels.linear_attn` (chunked on CPU, O(T)).
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


@dataclass
class SlabCache:
    """Decoding state of one causal SLAB layer: ``state`` (B, H, D, D + 1) linear-attention sums (last column z),
    ``conv_state`` (B * H, D, kernel_size - 1) the last values seen by the causal DWC."""

    batch_size: int
    state: Tensor | None = None
    conv_state: Tensor | None = None
    length: int = 0


@register_attention("slab")
class SimplifiedLinearAttention(Attention):
    """SLAB: ReLU linear attention plus a depthwise convolution of the values (simplified linear attention)."""

    patterns = frozenset({"noncausal_self", "causal_self"})
    pattern_note = (
        "The DWC adds a convolution of the values at query i's own position, so the values must lie on the queries' "
        "positions: there is no cross-attention form."
    )

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        kernel_size: int = 5,
        grid_size: tuple[int, int] | None = None,
        num_prefix_tokens: int | None = None,
        qkv_bias: bool = True,
        eps: float = 1e-6,
        proj_drop: float = 0.0,
    ) -> None:
        """
        Args:
            dim: model width.
            num_heads: heads; head_dim = dim // num_heads.
            causal: query i sees keys j <= i, and the DWC is causal (current token and the kernel_size - 1 before).
            cross: must be False (see ``pattern_note``).
            kernel_size: DWC window (official 5); odd unless causal.
            grid_size: (h, w) token grid (row-major) for the 2-D DWC and the key position encoding, or None for a
                1-D sequence. The ViT backbone sets its patch grid. Non-causal only.
            num_prefix_tokens: tokens before the grid/sequence (class tokens), left out of the DWC and PE; None = 0
                (the ViT sets its class tokens).
            qkv_bias: bias in the qkv projection (official True).
            eps: added to the denominator q~ . sum k~ (official 1e-6).
            proj_drop: dropout after the output projection.
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        label = self.name
        if not isinstance(kernel_size, int) or kernel_size < 1 or (not causal and kernel_size % 2 == 0):
            need = "a positive integer" if causal else "an odd positive integer (centred 'same' padding)"
            raise ValueError(f"{label}: kernel_size must be {need}; got {kernel_size!r}.")
        grid_size = check_grid(label, grid_size)
        if grid_size is not None and causal:
            raise ValueError(f"{label}: grid_size is for the non-causal 2-D layout; a causal layer runs in 1-D.")
        num_prefix_tokens = check_prefix(label, num_prefix_tokens)
        if causal and num_prefix_tokens:
            raise ValueError(f"{label}: num_prefix_tokens (class tokens) is for the non-causal layer; got causal=True.")
        if not eps >= 0:
            raise ValueError(f"{label}: eps must be >= 0; got {eps!r}.")
        self.kernel_size = kernel_size
        self.grid_size = grid_size
        self.num_prefix_tokens = num_prefix_tokens
        self.eps = eps
        D = self.head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if causal:
            self.dwc = ShortConvolution(D, kernel_size, bias=True, activation=None)
        elif grid_size is None:
            self.dwc = nn.Conv1d(D, D, kernel_size, padding=kernel_size // 2, groups=D)
        else:
            self.dwc = nn.Conv2d(D, D, kernel_size, padding=kernel_size // 2, groups=D)
        self.positional_encoding = (
            nn.Parameter(torch.zeros(1, grid_size[0] * grid_size[1], dim)) if grid_size is not None else None
        )

    def _check_length(self, length: int) -> None:
        if self.grid_size is not None and length != self.grid_size[0] * self.grid_size[1]:
            h, w = self.grid_size
            P = self.num_prefix_tokens
            raise ValueError(
                f"{self.name}: built for num_prefix_tokens={P} + a {h}x{w} grid = {P + h * w} tokens; got "
                f"{P + length}. Build it with the grid of your input (the ViT passes its patch grid) or grid_size=None "
                f"for a 1-D sequence."
            )

    def _dwc_noncausal(self, v: Tensor) -> Tensor:
        """DWC of the grid/sequence values (B, L, H, D) -> (B, L, H, D), the filter shared by the heads."""
        B, L, H, D = v.shape
        weight, bias = self.dwc.weight.to(v.dtype), self.dwc.bias.to(v.dtype)
        if self.grid_size is None:
            image = v.permute(0, 2, 3, 1).reshape(B * H, D, L)  # (B*H, D, L)
        else:
            image = v.permute(0, 2, 3, 1).reshape(B * H, D, *self.grid_size)  # (B*H, D, h, w), row-major tokens
        conv = F.conv1d if self.grid_size is None else F.conv2d
        # zero 'same' padding; torch's depthwise kernel beats k (or k x k) shifted multiply-adds by 1.3-4x (fwd + bwd)
        out = conv(image, weight, bias, padding=self.kernel_size // 2, groups=D)
        return out.reshape(B, H, D, L).permute(0, 3, 1, 2)

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: SlabCache | None = None,
    ) -> Tensor:
        self.check_inputs(x, context, padding_mask, cache)
        B, T, C = x.shape
        H, D, P = self.num_heads, self.head_dim, self.num_prefix_tokens
        if T <= P:
            raise ValueError(f"{self.name}: x has {T} tokens, no more than its num_prefix_tokens={P}.")
        self._check_length(T - P)
        q, k, v = self.qkv(x).view(B, T, 3, C).unbind(2)  # (B, T, C) each
        if self.positional_encoding is not None:  # keys of the grid tokens only
            k = torch.cat([k[:, :P], k[:, P:] + self.positional_encoding.to(k.dtype)], dim=1)
        dtype = torch.promote_types(x.dtype, torch.float32)
        # features, sums and the DWC in float32 at least (official: autocast off around the sums)
        with torch.autocast(x.device.type, enabled=False):
            q = F.relu(q.to(dtype)).view(B, T, H, D)  # (B, T, H, D)
            k = F.relu(k.to(dtype)).view(B, T, H, D)
            v = v.to(dtype).view(B, T, H, D)
            if padding_mask is not None:  # a padded token adds nothing to the sums nor to the DWC
                keep = padding_mask[:, :, None, None]
                k, v = k * keep, v * keep
            o, state = linear_attn(
                q,
                k,
                v,
                causal=self.causal,
                eps=self.eps,
                initial_state=None if cache is None else cache.state,
                output_final_state=cache is not None,
            )  # (B, T, H, D)
            if self.causal:
                heads = v.permute(0, 2, 1, 3).reshape(B * H, T, D)  # (B*H, T, D): one filter bank for all heads
                conv, conv_state = self.dwc(heads, state=None if cache is None else cache.conv_state)
                o = o + conv.view(B, H, T, D).permute(0, 2, 1, 3)
                if cache is not None:
                    cache.state, cache.conv_state, cache.length = state, conv_state, cache.length + T
            else:
                o = torch.cat([o[:, :P], o[:, P:] + self._dwc_noncausal(v[:, P:])], dim=1)
        return self.proj_drop(self.proj(o.reshape(B, T, C).to(x.dtype)))

    def new_cache(self, batch_size: int) -> SlabCache:
        if not self.causal:
            return super().new_cache(batch_size)  # raises: only causal layers decode
        return SlabCache(batch_size)

    def state_size(self, seq_len: int) -> int:
        D = self.head_dim
        # S and z per head, and the causal DWC's last kernel_size - 1 values per head channel
        return self.num_heads * D * (D + 1) + self.num_heads * D * (self.kernel_size - 1)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, kernel_size={self.kernel_size}, grid_size={self.grid_size}, "
            f"num_prefix_tokens={self.num_prefix_tokens}"
        )
