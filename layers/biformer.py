"""Bi-level routing attention — Zhu et al. 2023, "BiFormer: Vision Transformer with Bi-Level Routing Attention",
https://arxiv.org/abs/2303.08125. Reference impl: https://github.com/rayleizhu/BiFormer (ops/bra_legacy.py
``BiLevelRoutingAttention``, ops/bra_nchw.py ``nchwBRA``, models/biformer.py for the model defaults).

The (h, w) token grid is split into n x n regions of r_h x r_w tokens. Region-level queries and keys are the means of
the region's token queries and keys (full channel vector, before the head split); each region routes to the top-k
regions of the region affinity, and its tokens attend (token to token, per head) to all tokens of those k regions:

    Q_r = mean_region(Q),  K_r = mean_region(K)                  (n^2, C)
    A_r = Q_r K_r^T,  I_r = topk_rows(A_r, k)                   (n^2, k)  region indices, shared by all heads
    o_i = softmax_{j in regions I_r[region(i)]}(s q_i k_j^T) v_j + LCE(V)_i,   y = proj(o)

LCE is a depthwise ``side_dwconv`` x ``side_dwconv`` convolution of V laid out as the image (local context
enhancement, from Shunted Transformer). Gradients: the top-k choice is piecewise constant, so no gradient flows
through which regions are chosen; as in the official default config (``diff_routing=False``) Q_r and K_r are also
detached, so the routing receives no gradient at all and the projections learn only through the token-level attention
over the routed regions and through LCE.

Defaults (official code): ``n_win`` 7 (all models); ``topk`` 4 (``BiLevelRoutingAttention``'s default; biformer_tiny
uses 1, 4, 16 in its first three stages); ``side_dwconv`` 5 (all models; the op's own default is 3); ``qk_scale`` None
= dim^-0.5, the full qk width rather than the head width ("to be consistent with old models", bra_nchw.py);
``qkv_bias`` True (``QKVLinear``); no parameterised or soft routing (``param_routing=False, soft_routing=False`` in
every released model) and no key/value downsampling (``kv_downsample_mode='identity'``).

Grids: the region side is ceil(h / n_win) (the legacy op's ``auto_pad``), so a grid with fewer than n_win rows or
columns gets one-token regions and never an empty one; the grid is padded at the bottom/right to whole regions. Where
the official code lets the zero padding take part (as keys and in the region means), the padded slots, and keys
masked by ``padding_mask``, are left out here of the means, of the keys and of LCE (zeroed values), so outputs never
depend on padding; on a multiple of n_win both agree. k is clamped to the number of regions. Without ``grid_size``
the input is a 1-D sequence: min(n_win, T) regions of consecutive tokens and a 1-D LCE of width ``side_dwconv``
(the regions follow the padded length T, so a right-padded sequence is cut differently from the same one alone).
Prefix tokens (``num_prefix_tokens``, the ViT's class token) are not in any region: they attend globally to every
token, and every token sees them besides its routed regions; they get no LCE term.

The regions are made contiguous by a window-major permutation (``attnzoo.layers.windows``). The routed token
attention is lowered two ways: on the CPU (and with dropout) a gather of the k key regions per query region and one
batched SDPA, cost O(T x k r_h r_w); on CUDA the routing as a block-sparse pattern (:func:`routed_pattern`, each
region one block, per-sequence key blocks) through FlexAttention. The generic gathered-tile lowering of that pattern
measured 1.4-1.6x slower than the dedicated gather on the CPU (14 x 14 and 28 x 28 grids, fwd+bwd), hence two.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.errors import unknown
from attnzoo.kernels.sparse_attention import BlockPattern, sparse_attention
from attnzoo.layers.registry import Attention, register_attention
from attnzoo.layers.sdpa import sdpa
from attnzoo.layers.windows import WindowLayout, check_grid, check_prefix, token_grid, window_layout

BACKENDS = ("auto", "torch", "flex")


def depthwise_conv(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Depthwise k (or k x k) convolution with zero padding k // 2 on (B, C, L) or (B, C, h, w), k odd.

    Same numbers as ``F.conv1d``/``F.conv2d(..., padding=k // 2, groups=C)`` (cross-correlation), applied as a sum of
    shifted copies because torch's CPU depthwise convolution costs ~0.15 s per call on a (2, 32, 4, 4) input in
    float32 and ~1 s forward+backward in float64 on (8, 192, 14, 14) (torch 2.14, measured on this repo's CI machine).
    """
    size = weight.shape[-1]
    half = size // 2
    if x.dim() == 3:
        L = x.shape[-1]
        padded = F.pad(x, (half, half))
        out = sum(weight[:, 0, j, None] * padded[..., j : j + L] for j in range(size))
        return out + bias[:, None]
    h, w = x.shape[-2:]
    padded = F.pad(x, (half, half, half, half))
    taps = (
        weight[:, 0, i, j, None, None] * padded[..., i : i + h, j : j + w] for i in range(size) for j in range(size)
    )
    return sum(taps) + bias[:, None, None]


def region_layout(grid: tuple[int, int], n_win: int, device: torch.device | None = None) -> WindowLayout:
    """Regions of side ceil(side / n_win) per axis (at most n_win per axis, none empty), in window-major order."""
    region = tuple(math.ceil(s / min(n_win, s)) for s in grid)
    return window_layout(grid, region, device=device)


def route(q_regions: Tensor, k_regions: Tensor, key_count: Tensor, topk: int) -> Tensor:
    """Top-k key regions per query region from the region affinity Q_r K_r^T.

    Args:
        q_regions, k_regions: (B, R, C) region means.
        key_count: (B, R) real keys per region; a region without one is chosen only when fewer than k regions have
            a real key (its keys are masked anyway).
        topk: k <= R.

    Returns:
        (B, R, k) long region indices (no gradient: top-k is piecewise constant).
    """
    affinity = q_regions @ k_regions.transpose(-1, -2)  # (B, R, R)
    affinity = affinity.masked_fill((key_count == 0)[:, None, :], float("-inf"))
    return torch.topk(affinity, k=topk, dim=-1).indices


def routed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_real: Tensor,
    regions: Tensor,
    *,
    scale: float,
    shared: tuple[Tensor, Tensor, Tensor] | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Token attention of each query region over the tokens of its routed key regions.

    Args:
        q, k, v: (B, R, A, H, D) tokens grouped by region (A slots per region).
        key_real: (B, R, A) bool, True = real key.
        regions: (B, R, K) routed key-region indices per query region.
        scale: logit scale.
        shared: optional (k, v, real) of P keys every query sees besides its regions (prefix tokens):
            (B, P, H, D), (B, P, H, D), (B, P) bool.
        dropout_p: attention dropout.

    Returns:
        (B, R, A, H, D); a query with no real key among its routed regions gets zeros.
    """
    B, R, A, H, D = q.shape
    K = regions.shape[-1]
    flat = (regions + torch.arange(B, device=q.device).view(B, 1, 1) * R).reshape(-1)  # (B * R * K,)

    # 4-D SDPA with the query regions as the batch: (B * R, H, A, D) queries over (B * R, H, K * A [+ P], D) keys
    def gather(t: Tensor) -> Tensor:  # (B, R, A, H, D) -> (B * R, H, K * A, D)
        return t.reshape(B * R, A, H, D).index_select(0, flat).view(B * R, K * A, H, D).transpose(1, 2)

    keys, values = gather(k), gather(v)
    mask = key_real.reshape(B * R, A).index_select(0, flat).view(B * R, 1, 1, K * A)
    if shared is not None:
        shared_k, shared_v, shared_real = shared
        P = shared_k.shape[1]

        def broadcast(t: Tensor) -> Tensor:  # (B, P, H, D) -> (B * R, H, P, D)
            return t.transpose(1, 2)[:, None].expand(B, R, H, P, D).reshape(B * R, H, P, D)

        keys = torch.cat([keys, broadcast(shared_k)], dim=2)
        values = torch.cat([values, broadcast(shared_v)], dim=2)
        shared_mask = shared_real[:, None].expand(B, R, P).reshape(B * R, 1, 1, P)
        mask = torch.cat([mask, shared_mask], dim=-1)
    has_key = mask.any(dim=-1, keepdim=True)
    queries = q.reshape(B * R, A, H, D).transpose(1, 2)  # (B * R, H, A, D)
    out = F.scaled_dot_product_attention(
        queries, keys, values, attn_mask=mask | ~has_key, dropout_p=dropout_p, scale=scale
    )
    out = out * has_key.to(out.dtype)
    return out.transpose(1, 2).reshape(B, R, A, H, D)


def routed_pattern(routed: Tensor, num_prefix_tokens: int, region_area: int) -> BlockPattern:
    """The routed token attention as one block-sparse pattern over attention positions.

    The first G = ceil(P / A) * A positions are prefix slots (A = ``region_area``; the first P =
    ``num_prefix_tokens`` real), then the region slots in window-major order, region r filling block G / A + r.
    Region r's queries see the tokens of its routed regions ``routed[b, r]`` and every prefix slot; prefix queries see
    nothing here (they attend globally through SDPA). ``routed`` (B, R, K) long. Which slots hold real, unpadded
    tokens is the op's key mask, passed separately.
    """
    B, R = routed.shape[:2]
    A, P = region_area, num_prefix_tokens
    prefix_blocks = -(-P // A)
    G = prefix_blocks * A
    chosen = torch.zeros(B, R, R, dtype=torch.bool, device=routed.device)
    chosen.scatter_(-1, routed, True)  # chosen[b, query region, key region]

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q_region, k_region = (q_idx - G).clamp(min=0) // A, (kv_idx - G).clamp(min=0) // A
        grid_pair = (q_idx >= G) & (kv_idx >= G) & chosen[b, q_region, k_region]
        return grid_pair | ((q_idx >= G) & (kv_idx < P))

    prefix = torch.arange(prefix_blocks, device=routed.device).expand(B, R, prefix_blocks)
    blocks = torch.cat([prefix, routed + prefix_blocks], dim=-1)  # (B, R, prefix_blocks + K)
    blocks = torch.cat([torch.full_like(blocks[:, :1], -1).expand(B, prefix_blocks, -1), blocks], dim=1)
    return BlockPattern(mask_mod, G + R * A, G + R * A, A, blocks[:, None])  # (B, 1, prefix_blocks + R, .)


@register_attention("biformer")
class BiFormerAttention(Attention):
    """Bi-level routing attention: regions route to their top-k regions, tokens attend within them, plus LCE."""

    patterns = frozenset({"noncausal_self"})
    pattern_note = (
        "BiFormer's region means and routing look at the whole image; it has no causal or cross form in the paper."
    )

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        n_win: int = 7,
        topk: int = 4,
        side_dwconv: int = 5,
        qk_scale: float | None = None,
        grid_size: tuple[int, int] | None = None,
        num_prefix_tokens: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ) -> None:
        """
        Args:
            dim: model width.
            num_heads: heads; head_dim = dim // num_heads.
            causal: must be False.
            cross: must be False.
            n_win: regions per side (7 in every BiFormer); at most the grid side.
            topk: routed regions per region (official op default 4); clamped to the number of regions.
            side_dwconv: LCE kernel size, odd (official models 5); 0 disables LCE.
            qk_scale: logit scale; None = dim^-0.5 (official: the full qk width, not the head width).
            grid_size: (h, w) token grid (ViT patches, row-major), or None for a 1-D sequence.
            num_prefix_tokens: tokens before the grid (class tokens); they attend and are seen globally; None = 0
                (the ViT sets its class tokens).
            qkv_bias: bias in the q/k/v projection (official ``QKVLinear``: True).
            attn_drop: dropout on the token attention probabilities (training only; the official op has none).
            proj_drop: dropout after the output projection.
            backend: the routed token attention: ``"auto"`` (FlexAttention on CUDA without dropout, else
                ``"torch"``), ``"torch"`` (the routed regions gathered per query region, one batched SDPA) or
                ``"flex"`` (:func:`routed_pattern` through :func:`attnzoo.kernels.sparse_attention`; forward only off
                CUDA, for testing the lowering).
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        label = self.name
        if backend not in BACKENDS:
            raise ValueError(f"{label}: " + unknown("backend", backend, BACKENDS))
        self.backend = backend
        for key, value in (("n_win", n_win), ("topk", topk)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{label}: {key} must be a positive integer; got {value!r}.")
        if not isinstance(side_dwconv, int) or side_dwconv < 0 or (side_dwconv > 0 and side_dwconv % 2 == 0):
            raise ValueError(f"{label}: side_dwconv must be 0 (no LCE) or an odd kernel size; got {side_dwconv!r}.")
        if qk_scale is not None and not qk_scale > 0:
            raise ValueError(f"{label}: qk_scale must be a positive number or None (dim^-0.5); got {qk_scale!r}.")
        num_prefix_tokens = check_prefix(label, num_prefix_tokens)
        self.n_win = n_win
        self.topk = topk
        self.scale = float(qk_scale) if qk_scale is not None else dim**-0.5
        self.grid_size = check_grid(label, grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if side_dwconv == 0:
            self.lepe = None
        elif self.grid_size is None:
            self.lepe = nn.Conv1d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        else:
            self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: Any = None,
    ) -> Tensor:
        self.check_inputs(x, context, padding_mask, cache)
        B, T, C = x.shape
        H, D, P = self.num_heads, self.head_dim, self.num_prefix_tokens
        grid = token_grid(self.name, self.grid_size, P, T)
        layout = region_layout(grid, self.n_win, device=x.device)
        R, A = layout.num_windows[0] * layout.num_windows[1], layout.window_area
        q, k, v = self.qkv(x).view(B, T, 3, C).unbind(2)  # (B, T, C) each
        # softmax and region means in float32 at least (float64 stays float64), also under autocast
        dtype = torch.promote_types(q.dtype, torch.float32)
        dropout_p = self.attn_drop if self.training else 0.0
        with torch.autocast(x.device.type, enabled=False):
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            real = torch.ones(B, T, dtype=torch.bool, device=x.device) if padding_mask is None else padding_mask
            if padding_mask is not None:
                v = v * real[..., None].to(dtype)  # padded values must not reach LCE
            key_real = (layout.to_windows(real[:, P:, None])[..., 0] & layout.is_real).view(B, R, A)

            def regions(t: Tensor) -> Tensor:  # (B, L, C) grid tokens -> (B, R, A, C)
                return layout.to_windows(t).view(B, R, A, C)

            qr, kr, vr = regions(q[:, P:]), regions(k[:, P:]), regions(v[:, P:])
            # routing on detached region means over the real tokens (official: diff_routing=False)
            weight = key_real[..., None].to(dtype)  # (B, R, A, 1)
            count = key_real.sum(-1)  # (B, R)
            denominator = count.clamp_min(1)[..., None].to(dtype)
            q_mean = (qr.detach() * weight).sum(2) / denominator  # (B, R, C)
            k_mean = (kr.detach() * weight).sum(2) / denominator
            routed = route(q_mean * self.scale, k_mean, count, min(self.topk, R))  # (B, R, K)
            use_flex = self.backend == "flex" or (self.backend == "auto" and x.is_cuda and dropout_p == 0.0)
            if use_flex:  # the routing as a block-sparse pattern: FlexAttention
                pattern = routed_pattern(routed, P, A)
                G = pattern.q_len - R * A  # prefix slots, padded to whole blocks

                def positions(grid: Tensor, prefix: Tensor) -> Tensor:  # (B, G + R A, H, D): [prefix | regions]
                    heads = (B, -1, H, D)
                    return torch.cat([F.pad(prefix.reshape(heads), (0, 0, 0, 0, 0, G - P)), grid.reshape(heads)], dim=1)

                key_mask = torch.cat([F.pad(real[:, :P], (0, G - P)), key_real.reshape(B, R * A)], dim=1)
                o = sparse_attention(
                    positions(qr, q.new_zeros(B, P, C)),
                    positions(kr, k[:, :P]),
                    positions(vr, v[:, :P]),
                    pattern,
                    key_mask=key_mask,
                    scale=self.scale,
                    dropout_p=dropout_p,
                    backend="flex",
                )[:, G:]  # (B, R * A, H, D): the grid queries
            else:  # the same attention with the routed regions gathered: one batched SDPA
                split = (B, R, A, H, D)
                shared = None
                if P > 0:  # every token also sees the prefix keys
                    shared = (k[:, :P].view(B, P, H, D), v[:, :P].view(B, P, H, D), real[:, :P])
                o = routed_attention(
                    qr.view(split),
                    kr.view(split),
                    vr.view(split),
                    key_real,
                    routed,
                    scale=self.scale,
                    shared=shared,
                    dropout_p=dropout_p,
                )  # (B, R, A, H, D)
            o = layout.from_windows(o.reshape(B, R * A, C))  # (B, L, C)
            if self.lepe is not None:
                weight_, bias_ = self.lepe.weight.to(dtype), self.lepe.bias.to(dtype)
                image = v[:, P:].transpose(1, 2).reshape(B, C, *([grid[1]] if self.grid_size is None else grid))
                o = o + depthwise_conv(image, weight_, bias_).flatten(2).transpose(1, 2)
            if P > 0:  # prefix queries: global attention over every token
                heads = (B, T, H, D)
                prefix = sdpa(
                    q[:, :P].reshape(B, P, H, D),
                    k.view(heads),
                    v.view(heads),
                    causal=False,
                    key_mask=padding_mask,
                    dropout_p=dropout_p,
                    scale=self.scale,
                )
                o = torch.cat([prefix.reshape(B, P, C), o], dim=1)
        return self.proj_drop(self.proj(o.to(x.dtype)))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, n_win={self.n_win}, topk={self.topk}, grid_size={self.grid_size}, "
            f"num_prefix_tokens={self.num_prefix_tokens}"
        )
