"""Swin window attention — Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer using Shifted
Windows", https://arxiv.org/abs/2103.14030. Semantics of timm's ``WindowAttention`` / ``SwinTransformerBlock``
(timm/models/swin_transformer.py), which follows microsoft/Swin-Transformer.

The (h, w) token grid is cut into non-overlapping windows of M_h x M_w tokens; each token attends to the tokens of its
own window only, per head with a learned relative position bias:

    o_i = softmax_{j in window(i)}(q_i k_j^T / sqrt(D) + B[h, rel(i, j)] + mask(i, j)) v_j
    rel(i, j) = (r_i - r_j + M_h - 1) * (2 M_w - 1) + (c_i - c_j + M_w - 1)      (timm's relative_position_index)

with the bias table B of (2 M_h - 1)(2 M_w - 1) x H entries (trunc-normal std 0.02, timm). Shifted windows (SW-MSA):
on every other block the grid is cyclically shifted by (M_h // 2, M_w // 2) before partitioning, so windows straddle
the previous block's window borders; tokens that the shift wrapped around from the opposite edge are masked apart
(timm's ``img_mask`` regions; timm adds -100, here they are -inf, the same to float64 rounding).

Sizes and defaults:
* ``window_size`` 7 (Swin-T/S/B at 224 px). As in timm's ``SwinTransformerBlock``, a window larger than the grid is
  clamped to the grid and a clamped axis is not shifted; a grid that is no multiple of the window is padded at the
  bottom/right. Unlike timm (whose zero padding tokens take part as keys and which rolls before padding), the padded
  slots are masked out as keys and the grid is padded before the shift (the order of the official detection code),
  so outputs never depend on the padding; on grids that are a multiple of the window both agree (tested).
* ``shift_size`` None: M // 2 on odd ``layer_index`` and 0 on even ones (Swin's W-MSA / SW-MSA alternation). The
  ViT backbone passes each block's ``layer_index``; an explicit ``shift_size`` applies to every block.
* ``qkv_bias`` True (timm ``WindowAttention``). Swin's patch merging and stage hierarchy belong to a hierarchical
  backbone, not to the token mixer: inside the isotropic ViT every block keeps the same grid.
* Without ``grid_size`` the input is a 1-D sequence, i.e. a (1, T) grid: windows of ``window_size`` consecutive
  tokens, shifted by window_size // 2 on odd layers.
* Prefix tokens (``num_prefix_tokens``, the ViT's class/register tokens) sit outside the grid: they attend globally
  to every token, and every grid token sees them besides its window (no position bias on those pairs), so the class
  token collects the image and feeds it back, which window attention alone would not allow.

The windows are made contiguous by a window-major permutation (``attnzoo.layers.windows``). The pattern (same window,
same shift region, real key; prefix keys for everyone) and the position bias are written once, as a FlexAttention
``mask_mod`` / ``bias_mod`` pair (:func:`window_mods`), and lowered two ways: on the CPU (and with dropout) one
batched SDPA over the windows with the mods evaluated on each window's own positions as a float mask, cost
O(T x M_h M_w); on CUDA :func:`attnzoo.kernels.sparse_attention` with FlexAttention over blocks of one window each.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.errors import unknown
from attnzoo.kernels.sparse_attention import BiasMod, BlockPattern, MaskMod, sparse_attention
from attnzoo.layers.registry import Attention, register_attention
from attnzoo.layers.sdpa import sdpa
from attnzoo.layers.windows import WindowLayout, check_grid, check_prefix, token_grid, window_layout

BIAS_STD = 0.02  # timm trunc_normal_ std of the relative position bias table
BACKENDS = ("auto", "torch", "flex")


def prefix_slots(num_prefix_tokens: int, window_area: int) -> int:
    """Positions before the grid slots: the prefix tokens padded to whole blocks of one window."""
    return -(-num_prefix_tokens // window_area) * window_area


def window_mods(
    layout: WindowLayout, num_prefix_tokens: int, table: Tensor, table_window: tuple[int, int]
) -> tuple[MaskMod, BiasMod]:
    """Swin's pattern, written once as FlexAttention-style ``mask_mod`` and ``bias_mod`` over attention positions.

    The first G = ceil(P / A) * A positions are prefix slots (A = window area; real for p < P =
    ``num_prefix_tokens``), position p >= G is grid slot p - G in window-major order. A grid query sees the real
    slots of its own window in its own shift region, with the relative position bias ``table[rel(i, j), h]``
    (timm's index on the in-window coordinates, ``table_window`` = the window the table was built for), and every
    real prefix slot, without a bias. Prefix queries see nothing here: they attend globally through a plain SDPA call.
    """
    A, P = layout.window_area, num_prefix_tokens
    G = prefix_slots(P, A)
    region, real, row, col = layout.region, layout.is_real, layout.row, layout.col
    table_h, table_w = table_window

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q_slot, k_slot = (q_idx - G).clamp(min=0), (kv_idx - G).clamp(min=0)
        grid_pair = (q_idx >= G) & (kv_idx >= G) & (q_slot // A == k_slot // A)
        grid_pair = grid_pair & (region[q_slot] == region[k_slot]) & real[k_slot]
        return grid_pair | ((q_idx >= G) & (kv_idx < P))

    def bias_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q_slot, k_slot = (q_idx - G).clamp(min=0), (kv_idx - G).clamp(min=0)
        index = (row[q_slot] - row[k_slot] + table_h - 1) * (2 * table_w - 1) + col[q_slot] - col[k_slot] + table_w - 1
        return torch.where(kv_idx >= G, table[index, h], 0.0)

    return mask_mod, bias_mod


def window_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, allowed: Tensor, *, dropout_p: float = 0.0, scale: float
) -> Tensor:
    """Softmax attention of each window's queries over its keys, all windows in one batched SDPA call.

    Args:
        q: (B, W, H, A, D) queries of W windows of A slots.
        k, v: (B, W, H, A', D) keys and values each window may see (its own A slots, then any prefix keys).
        bias: float bias broadcastable to (B, W, H, A, A').
        allowed: bool broadcastable to (B, W, H, A, A'), True = may attend.
        dropout_p: attention dropout.
        scale: logit scale.

    Returns:
        (B, W, H, A, D); a query with no allowed key gets zeros (not NaN).
    """
    allowed = allowed.expand(*q.shape[:-1], k.shape[-2])
    has_key = allowed.any(dim=-1, keepdim=True)
    # a row with no key would be softmax over nothing (NaN): open it, then zero its output
    mask = torch.where(allowed | ~has_key, bias.to(q.dtype), float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out * has_key.to(out.dtype)


@register_attention("swin")
class SwinAttention(Attention):
    """Swin (shifted) window attention with relative position bias on the patch grid; prefix tokens attend globally."""

    patterns = frozenset({"noncausal_self"})
    pattern_note = (
        "Swin windows are two-sided neighbourhoods on an image grid; for causal local attention use sliding_window."
    )

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        window_size: int = 7,
        shift_size: int | None = None,
        layer_index: int | None = None,
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
            window_size: M, the window side (7 in Swin-T/S/B); clamped to the grid (timm).
            shift_size: cyclic shift of the windows; None = window_size // 2 on odd ``layer_index``, 0 on even.
            layer_index: the block's index in the backbone (the ViT passes it), which picks the shift when
                ``shift_size`` is None; None = 0.
            grid_size: (h, w) token grid (ViT patches, row-major), or None for a 1-D sequence (grid (1, T)).
            num_prefix_tokens: tokens before the grid (class/register tokens); they attend and are seen globally;
                None = 0 (the ViT sets its class tokens).
            qkv_bias: bias in the q/k/v projection (timm default True).
            attn_drop: dropout on the attention probabilities (training only).
            proj_drop: dropout after the output projection.
            backend: ``"auto"`` (FlexAttention on CUDA without dropout, else ``"torch"``), ``"torch"`` (the windows
                gathered into one batched SDPA call) or ``"flex"`` (:func:`attnzoo.kernels.sparse_attention` over
                the window-major positions; forward only off CUDA, for testing the lowering). Both evaluate the
                same :func:`window_mods`.
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        label = self.name
        if backend not in BACKENDS:
            raise ValueError(f"{label}: " + unknown("backend", backend, BACKENDS))
        self.backend = backend
        if not isinstance(window_size, int) or isinstance(window_size, bool) or window_size < 1:
            raise ValueError(f"{label}: window_size must be a positive integer; got {window_size!r}.")
        layer_index = 0 if layer_index is None else layer_index
        if not isinstance(layer_index, int) or isinstance(layer_index, bool) or layer_index < 0:
            raise ValueError(f"{label}: layer_index must be an integer >= 0 or None (0); got {layer_index!r}.")
        if shift_size is None:
            shift_size = window_size // 2 if layer_index % 2 == 1 else 0
        if not isinstance(shift_size, int) or not 0 <= shift_size < window_size:
            raise ValueError(
                f"{label}: shift_size must be an integer with 0 <= shift_size < window_size={window_size} "
                f"(Swin: window_size // 2 = {window_size // 2}), or None; got {shift_size!r}."
            )
        num_prefix_tokens = check_prefix(label, num_prefix_tokens)
        self.grid_size = check_grid(label, grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        self.layer_index = layer_index
        self.shift_size = shift_size
        # the bias table is built for the window the layer will use: clamped to the grid when it is known (timm's
        # block clamps before building WindowAttention, so its tables load unchanged); (1, M) on a 1-D sequence
        if self.grid_size is None:
            self.window_size = (1, window_size)
        else:
            self.window_size = tuple(min(window_size, s) for s in self.grid_size)
        table = (2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.empty(table, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=BIAS_STD)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def layout(self, grid: tuple[int, int], device: torch.device | None = None) -> WindowLayout:
        """The window-major layout on ``grid``: the window clamped to it, no shift along an axis it covers (timm)."""
        window = tuple(min(m, s) for m, s in zip(self.window_size, grid))
        shift = tuple(0 if s <= m else min(self.shift_size, m - 1) for m, s in zip(window, grid))
        return window_layout(grid, window, shift, device=device)

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: Any = None,
    ) -> Tensor:
        self.check_inputs(x, context, padding_mask, cache)
        B, T, _ = x.shape
        H, D, P = self.num_heads, self.head_dim, self.num_prefix_tokens
        grid = token_grid(self.name, self.grid_size, P, T)
        layout = self.layout(grid, device=x.device)
        q, k, v = self.qkv(x).view(B, T, 3, H, D).unbind(2)  # (B, T, H, D) each
        # softmax in float32 at least (float64 stays float64), also under autocast
        dtype = torch.promote_types(q.dtype, torch.float32)
        dropout_p = self.attn_drop if self.training else 0.0
        with torch.autocast(x.device.type, enabled=False):
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            mask_mod, bias_mod = window_mods(layout, P, self.relative_position_bias_table.to(dtype), self.window_size)
            key_real = layout.is_real[None]  # (B|1, slots): grid slots that hold a real, unpadded token
            prefix_real = torch.ones(B, P, dtype=torch.bool, device=x.device)
            if padding_mask is not None:
                key_real = key_real & layout.to_windows(padding_mask[:, P:, None])[..., 0]
                prefix_real = padding_mask[:, :P]
            scale = D**-0.5
            use_flex = self.backend == "flex" or (self.backend == "auto" and x.is_cuda and dropout_p == 0.0)
            if use_flex:
                o = self._flex_windows(q[:, P:], k, v, layout, key_real, prefix_real, mask_mod, bias_mod, scale)
            else:
                o = self._batched_windows(
                    q[:, P:], k, v, layout, key_real, prefix_real, mask_mod, bias_mod, scale, dropout_p
                )
            if P > 0:  # prefix queries: global attention over every token
                prefix = sdpa(q[:, :P], k, v, causal=False, key_mask=padding_mask, dropout_p=dropout_p, scale=scale)
                o = torch.cat([prefix, o], dim=1)
        return self.proj_drop(self.proj(o.reshape(B, T, self.dim).to(x.dtype)))

    def _batched_windows(
        self, q, k, v, layout, key_real, prefix_real, mask_mod, bias_mod, scale: float, dropout_p: float
    ) -> Tensor:
        """The torch lowering: each window's A queries over its A slots (+ the P prefix keys) in one batched SDPA,
        with the mask and bias of :func:`window_mods` evaluated on those positions only. Returns (B, L, H, D)."""
        B, _, H, D = q.shape
        P = self.num_prefix_tokens
        nW, A = layout.num_windows[0] * layout.num_windows[1], layout.window_area

        def windows(t: Tensor) -> Tensor:  # (B, L, H, D) grid tokens -> (B, nW, H, A, D)
            return layout.to_windows(t).view(B, nW, A, H, D).transpose(2, 3)

        qw, kw, vw = windows(q), windows(k[:, P:]), windows(v[:, P:])
        positions = prefix_slots(P, A) + torch.arange(nW * A, device=q.device).view(nW, A)  # the grid slots
        keys = torch.cat([positions, torch.arange(P, device=q.device).expand(nW, P)], dim=1)  # (nW, A + P)
        allowed = mask_mod(None, None, positions[:, None, :, None], keys[:, None, None, :])  # (nW, 1, A, A + P)
        real = torch.cat([key_real.expand(B, -1).view(B, nW, A), prefix_real[:, None].expand(B, nW, P)], dim=-1)
        allowed = allowed & real[:, :, None, None, :]  # (B, nW, 1, A, A + P)
        # the bias depends on in-window coordinates only: the first window's positions give every window's
        heads = torch.arange(H, device=q.device).view(H, 1, 1)
        bias = bias_mod(None, heads, positions[0][None, :, None], keys[0][None, None, :])  # (H, A, A + P)
        if P > 0:  # every window also sees the prefix keys
            kw = torch.cat([kw, k[:, None, :P].transpose(2, 3).expand(B, nW, H, P, D)], dim=3)
            vw = torch.cat([vw, v[:, None, :P].transpose(2, 3).expand(B, nW, H, P, D)], dim=3)
        ow = window_attention(qw, kw, vw, bias, allowed, dropout_p=dropout_p, scale=scale)  # (B, nW, H, A, D)
        return layout.from_windows(ow.transpose(2, 3).reshape(B, nW * A, H, D))

    def _flex_windows(self, q, k, v, layout, key_real, prefix_real, mask_mod, bias_mod, scale: float) -> Tensor:
        """The FlexAttention lowering: positions [prefix slots padded to whole windows | grid slots], blocks of one
        window each, a window's block listing the prefix blocks and itself. Returns (B, L, H, D), the grid queries."""
        B, _, H, D = q.shape
        P = self.num_prefix_tokens
        nW, A = layout.num_windows[0] * layout.num_windows[1], layout.window_area
        G = prefix_slots(P, A)

        def sequence(t: Tensor | None, prefix: Tensor) -> Tensor:  # (B, G + slots, H, D)
            return torch.cat([F.pad(prefix, (0, 0, 0, 0, 0, G - P)), layout.to_windows(t)], dim=1)

        qs = sequence(q, q.new_zeros(B, P, H, D))
        ks, vs = sequence(k[:, P:], k[:, :P]), sequence(v[:, P:], v[:, :P])
        n_prefix = G // A
        # window n's block lists the prefix blocks and itself; the prefix queries' blocks list nothing
        windows = torch.arange(n_prefix, n_prefix + nW, device=q.device)[:, None]
        rows = torch.cat([torch.arange(n_prefix, device=q.device).expand(nW, n_prefix), windows], dim=1)
        kv_blocks = torch.cat([torch.full_like(rows[:1], -1).expand(n_prefix, -1), rows], dim=0)
        pattern = BlockPattern(mask_mod, G + nW * A, G + nW * A, A, kv_blocks)
        key_mask = torch.cat([F.pad(prefix_real, (0, G - P)), key_real.expand(B, -1)], dim=1)
        out = sparse_attention(qs, ks, vs, pattern, key_mask=key_mask, bias_mod=bias_mod, scale=scale, backend="flex")
        return layout.from_windows(out[:, G:])

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, window_size={self.window_size}, shift_size={self.shift_size}, "
            f"grid_size={self.grid_size}, num_prefix_tokens={self.num_prefix_tokens}"
        )
