"""Neighborhood Attention — Hassani et al. 2023, "Neighborhood Attention Transformer", CVPR,
https://arxiv.org/abs/2204.07143; dilated: Hassani & Shi 2022, "Dilated Neighborhood Attention Transformer",
https://arxiv.org/abs/2209.15001. Semantics of SHI-Labs/NATTEN (``natten/functional.py``, the masks of its
FlexAttention backend ``natten/backends/flex.py``); module defaults of its ``NeighborhoodAttention1D/2D``.

Each query attends to its ``kernel_size`` nearest neighbours per axis, with a relative position bias in 2-D:

    o_i = softmax_{j in N(i)}(q_i k_j^T / sqrt(D) + rpb[h, rel(i, j)]) v_j

N(i), per axis of length L, with dilation d and k = kernel_size: the axis splits into d dilation groups (positions
with the same p mod d, group length L_g = ceil((L - p mod d) / d)); inside its group a query at group index
g = p // d sees the k consecutive group positions starting at

    start = clamp(g - k // 2, 0, L_g - k)            (non-causal; k odd)

so a query near a border keeps k keys: its window is shifted inward, not truncated (what distinguishes NA from a
plain sliding window; at the centre it is the symmetric window g - k//2 .. g + k//2). Causal (1-D): the k most recent
positions of its group, p, p - d, ..., p - (k - 1) d, fewer at the start. In 2-D (the ViT's patch grid) N(i) is the
product of the row and column neighbourhoods (k x k keys) and rel(i, j) = (g_row(j) - g_row(i) + k - 1,
g_col(j) - g_col(i) + k - 1) indexes a (H, 2k - 1, 2k - 1) table (NATTEN's ``rpb``; (H, 2k - 1) in 1-D).

Defaults and where they come from:
* ``kernel_size`` 7 and ``dilation`` 1: NAT's kernel (all stages of NAT-Mini..Base); DiNAT alternates dilation 1 with
  a dilation that makes the kernel span the feature map (set it per layer: ``attention=[{name: neighborhood},
  {name: neighborhood, dilation: 2}]``). Non-causal kernels must be odd (a centred neighbourhood, NAT's check); causal
  windows have no centre, so any kernel_size >= 2 is accepted there (as NATTEN's current argument check does).
* ``rel_pos_bias`` None = on for the 2-D grid (NAT and DiNAT use the bias; trunc-normal std 0.02 as NATTEN's
  module), off for 1-D sequences and causal layers (NATTEN raises for causal + bias: the bias is undefined there).
* ``qkv_bias`` True (NATTEN's module). ``rope`` False: NAT's position signal is the bias; turn it on for causal LMs
  in a GPT whose ``positions`` is ``none``.
* An axis shorter than kernel_size * dilation: NATTEN's ``NeighborhoodAttention2D`` zero-pads the input up to that
  size. Here the padded positions are masked out as keys instead, which is the same as each query seeing its whole
  dilation group along that axis (outputs never depend on padding). The functional op
  :func:`neighborhood_attention` raises instead unless ``pad_to_kernel=True`` (NATTEN's functional ``na1d``/``na2d``
  raise too).
* ``padding_mask`` (a key padding mask; NATTEN has none: its ops take equal-length sequences, so the reference for
  a padded sequence is the same sequence run alone). 1-D non-causal: when a sequence's real tokens form one contiguous
  span, start s_b and length L_b (right, left or both-sided padding), its windows follow the edge rule of that span,
  not of the padded length T: query i = s_b + p sees the keys s_b + N_{L_b}(p), where N_L is the rule above on an
  axis of L positions (dilation groups by p mod d; a span shorter than kernel_size * dilation sees its whole groups,
  as ``pad_to_kernel``). A padded sequence therefore gives the outputs it gives alone (the Encoder's padded batches).
  A mask with holes (real tokens not contiguous) keeps the rule of the padded length T, masking the holes as keys
  (there is no single "sequence alone" to match), and so do the padded queries themselves (their outputs are
  unused). Causal 1-D needs nothing: a causal window never looks right and its groups are lags of d, both
  translation invariant, so left padding only masks keys the sequence alone does not have. The 2-D grid keeps the
  rule of the full grid (a ViT's patch grid is never padded).
* Prefix tokens (``num_prefix_tokens``, the ViT's class/register tokens) sit outside the grid, as in ``swin``: they
  attend globally to every token, and every grid token sees them besides its neighbourhood (no bias on those pairs).

Lowering: the neighbourhood is written once, as a FlexAttention-style ``mask_mod`` (:func:`neighborhood_mask_mod`),
with the key blocks of each query block given analytically (the band |i - j| <= (k - 1) d rows: the border shift
moves a window inside it, never past it, also at the borders of a padded sequence's span, so the per-sequence
windows need no wider band; the mask_mod reads the spans as two (B,) tensors).
:func:`attnzoo.kernels.sparse_attention.sparse_attention` lowers it to gathered-tile SDPA on the CPU and to
FlexAttention on CUDA, so cost grows with T x window, never T x T. Causal 1-D on the CPU takes a blocked path:
query blocks of b = 64 attend to their own and the ceil((k - 1) d / b) previous key blocks in one batched SDPA over
time-major tensors, where every block's keys are a strided window (no copy), under a cached mask evaluated from the
same mask_mod (fwd+bwd 6.2-7.9x SDPA causal at T = 8192, window 256, 2 CPU threads; the generic lowering 2.7-5.2x).
Decoding keeps the last (k - 1) d keys and values (constant-size cache).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.errors import unknown
from attnzoo.kernels.sparse_attention import BiasMod, BlockPattern, MaskMod, band_kv_blocks, sparse_attention
from attnzoo.layers.registry import Attention, register_attention
from attnzoo.layers.rope import RotaryEmbedding
from attnzoo.layers.sdpa import sdpa
from attnzoo.layers.sliding_window import SlidingWindowCache
from attnzoo.layers.windows import check_grid, check_prefix, token_grid

RPB_STD = 0.02  # NATTEN NeighborhoodAttention1D/2D: trunc_normal_(rpb, std=0.02)
BACKENDS = ("auto", "blocked", "flex", "reference", "torch")
BLOCK_SIZE = 64  # query/key block of the gathered-tile lowering (and the least block of the causal blocked path)


def check_kernel(label: str, kernel_size: Any, dilation: Any, causal: bool) -> None:
    """Validate kernel_size (odd >= 3 non-causal, >= 2 causal) and dilation (int >= 1)."""
    if not isinstance(kernel_size, int) or isinstance(kernel_size, bool) or kernel_size < 2:
        raise ValueError(f"{label}: kernel_size must be an integer >= 2; got {kernel_size!r}.")
    if not causal and kernel_size % 2 == 0:
        raise ValueError(
            f"{label}: kernel_size must be odd for non-causal neighborhood attention (a neighbourhood centred on "
            f"the query: k // 2 keys on each side); got {kernel_size}. Use {kernel_size - 1} or {kernel_size + 1}."
        )
    if not isinstance(dilation, int) or isinstance(dilation, bool) or dilation < 1:
        raise ValueError(f"{label}: dilation must be an integer >= 1; got {dilation!r}.")


def _axis_neighbours(
    q: Tensor, kv: Tensor, length: int | Tensor, kernel_size: int, dilation: int, causal: bool
) -> Tensor:
    """True where coordinate ``kv`` is in the neighbourhood of ``q`` along one axis of ``length`` positions
    (an int, or a tensor broadcasting with q: per-sequence span lengths)."""
    d, k = dilation, kernel_size
    same_group = (q % d) == (kv % d)
    gq, gk = torch.div(q, d, rounding_mode="floor"), torch.div(kv, d, rounding_mode="floor")  # index in the group
    if causal:
        lag = gq - gk
        return same_group & (lag >= 0) & (lag < k)
    group_len = torch.div(length - q % d + d - 1, d, rounding_mode="floor")  # positions of q's dilation group
    last_start = torch.clamp(group_len - k, min=0)  # a group shorter than k (padded axis) is seen whole
    start = torch.minimum(torch.clamp(gq - k // 2, min=0), last_start)  # shifted inward at the borders
    return same_group & (gk >= start) & (gk < start + k)


def _coords(idx: Tensor, grid: tuple[int, int] | None) -> list[Tensor]:
    """Per-axis coordinates of grid tokens (row-major): [row, col] on a grid, [idx] on a 1-D sequence."""
    if grid is None:
        return [idx]
    return [torch.div(idx, grid[1], rounding_mode="floor"), idx % grid[1]]


def sequence_spans(key_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Each sequence's real span: (start, length), two (B,) long tensors, from a (B, L) key mask (True = real).

    A row whose real positions are one contiguous run s .. s + n - 1 gives (s, n); a row with holes, or with no real
    position, gives (0, L): the padded length's rule (see the module docstring). Tensor ops only (no host sync), so
    it runs under torch.compile and costs O(B L)."""
    L = key_mask.shape[-1]
    pos = torch.arange(L, device=key_mask.device)
    count = key_mask.sum(-1)
    first = torch.where(key_mask, pos, L).amin(-1)
    last = torch.where(key_mask, pos, -1).amax(-1)
    contiguous = (count > 0) & (last - first + 1 == count)
    return torch.where(contiguous, first, 0), torch.where(contiguous, count, L)


def neighborhood_mask_mod(
    grid: tuple[int, int] | None,
    length: int,
    kernel_size: int,
    dilation: int,
    causal: bool,
    num_prefix_tokens: int = 0,
    spans: tuple[Tensor, Tensor] | None = None,
) -> MaskMod:
    """The neighbourhood as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` on broadcasting index tensors.

    Queries are the ``length`` grid tokens (q_idx in [0, length)), keys are all tokens, prefix first: key ``kv_idx``
    is prefix token ``kv_idx`` if ``kv_idx < num_prefix_tokens``, else grid token ``kv_idx - num_prefix_tokens``.
    ``grid`` (h, w) with h * w == length, or None for a 1-D sequence.

    ``spans`` (1-D non-causal only): per-sequence (start, length) of the real tokens, two (B,) tensors
    (:func:`sequence_spans`); a query inside its sequence's span gets the windows of that span (the edge rule on an
    axis of span length, shifted by the start), any other query those of the full length. ``b`` must then be a
    batch index tensor.
    """
    P = num_prefix_tokens
    axis_lengths = [length] if grid is None else list(grid)
    if spans is not None:
        if grid is not None or causal:
            raise ValueError(
                "neighborhood_mask_mod: per-sequence spans are for 1-D non-causal neighbourhoods; got "
                f"grid={grid!r}, causal={causal}."
            )
        starts, span_lengths = spans

        def span_mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            kv = kv_idx - P
            start, span = starts[b], span_lengths[b]
            inside = (q_idx >= start) & (q_idx < start + span)
            start = torch.where(inside, start, 0)  # padded queries: the full length's windows (inside the band)
            span = torch.where(inside, span, length)
            q_local, kv_local = q_idx - start, kv - start
            visible = _axis_neighbours(q_local, kv_local, span, kernel_size, dilation, False)
            # a span shorter than k * d sees its whole groups: keep the window from reaching past the span
            visible = visible & (kv_local >= 0) & (kv_local < span)
            return visible | (kv_idx < P) if P > 0 else visible

        return span_mask_mod

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        kv_grid = kv_idx - P
        visible = None
        for q_c, kv_c, size in zip(_coords(q_idx, grid), _coords(kv_grid, grid), axis_lengths):
            axis = _axis_neighbours(q_c, kv_c, size, kernel_size, dilation, causal)
            visible = axis if visible is None else visible & axis
        visible = visible & (kv_grid >= 0)
        return visible | (kv_idx < P) if P > 0 else visible

    return mask_mod


def neighborhood_bias_mod(
    rpb: Tensor, grid: tuple[int, int] | None, kernel_size: int, dilation: int, num_prefix_tokens: int = 0
) -> BiasMod:
    """NATTEN's relative position bias as a ``bias_mod``: rpb[h, gk - gq + k - 1] per axis (group indices), 0 on
    prefix keys. ``rpb`` is (H, 2k - 1) in 1-D, (H, 2k - 1, 2k - 1) on a grid."""
    P, k, d = num_prefix_tokens, kernel_size, dilation

    def bias_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        index = []
        for q_c, kv_c in zip(_coords(q_idx, grid), _coords(kv_idx - P, grid)):
            rel = torch.div(kv_c, d, rounding_mode="floor") - torch.div(q_c, d, rounding_mode="floor") + k - 1
            index.append(rel.clamp(0, 2 * k - 2))  # pairs outside the window are masked; keep the index in range
        bias = rpb[(h, *index)]
        return torch.where(kv_idx < P, torch.zeros_like(bias), bias) if P > 0 else bias

    return bias_mod


def neighborhood_pattern(
    grid: tuple[int, int] | None,
    length: int,
    kernel_size: int,
    dilation: int,
    causal: bool,
    num_prefix_tokens: int = 0,
    *,
    q_len: int | None = None,
    spans: tuple[Tensor, Tensor] | None = None,
    block_size: int = BLOCK_SIZE,
    device: torch.device | None = None,
) -> BlockPattern:
    """The :class:`BlockPattern` of the ``length`` grid queries over the num_prefix_tokens + length keys.

    ``q_len`` < length (causal decoding with a cache): the last q_len of the positions are the queries, aligned
    bottom-right with the keys. ``spans``: per-sequence real spans for 1-D non-causal windows
    (:func:`neighborhood_mask_mod`). The key blocks are a band: every neighbour lies within (k - 1) * d positions of
    the query along each axis (the border shift moves the window, never past that; a span's borders are borders
    too), i.e. within (k - 1) * d rows and w - 1 columns of flat offset on a grid of width w; prefix key blocks are
    added to every row.
    """
    P = num_prefix_tokens
    T = length if q_len is None else q_len
    kv_len = P + length
    reach = (kernel_size - 1) * dilation
    if grid is not None:
        reach = reach * grid[1] + grid[1] - 1
    mask_mod = neighborhood_mask_mod(grid, length, kernel_size, dilation, causal, P, spans)
    if length > T:  # bottom-right alignment: query i is position i + length - T; the mask is translation invariant
        base, shift = mask_mod, length - T

        def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return base(b, h, q_idx + shift, kv_idx)

    blocks = band_kv_blocks(T, kv_len, block_size, -reach, 0 if causal else reach, device=device)
    if P > 0:  # the prefix keys' blocks, once per row (dropped from the band where it already lists them)
        prefix_blocks = torch.arange(-(-P // block_size), device=device)
        blocks = torch.where(blocks < len(prefix_blocks), -1, blocks)
        blocks = torch.cat([prefix_blocks.expand(blocks.shape[0], -1), blocks], dim=1)
    return BlockPattern(mask_mod, T, kv_len, block_size, blocks)


@functools.lru_cache(maxsize=16)
def _causal_window_mask(
    kernel_size: int, dilation: int, b: int, p: int, n: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """(n, 1, b, (p + 1) b) additive mask of the blocked path: 0 where query a of block j may attend key u of its
    window (absolute key (j - p) b + u; negative = left padding, hidden), -inf elsewhere; from the mask_mod.

    Cached: it depends on the sizes only, and building it costs a dozen small ops per call."""
    mask_mod = neighborhood_mask_mod(None, 1, kernel_size, dilation, True)  # causal: the length is not used
    j = torch.arange(n, device=device)[:, None, None]
    q_pos = j * b + torch.arange(b, device=device)[None, :, None]  # (n, b, 1)
    kv_pos = (j - p) * b + torch.arange((p + 1) * b, device=device)[None, None, :]  # (n, 1, W)
    visible = mask_mod(None, None, q_pos, kv_pos) & (kv_pos >= 0)
    return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, float("-inf"))[:, None]


def _causal_blocked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel_size: int,
    dilation: int,
    key_mask: Tensor | None,
    dropout_p: float,
    scale: float,
    block_size: int | None = None,
) -> Tensor:
    """Causal neighbourhood by query blocks of b, each attending to its own and the p = ceil(reach / b) previous key
    blocks (reach = (k - 1) d), all in one batched SDPA call with a mask from the mask_mod.

    The tensors are time-major, (T, B H, D), and the keys are left-padded by p b rows: then the (p + 1) b keys of
    every query block are a strided window (``unfold``) of the keys, not a copy, and for B = 1 the (B, T, H, D) inputs
    are already time-major. q, k, v (B, T, H, D) -> (B, T, H, Dv)."""
    B, T, H, _ = q.shape
    Dv = v.shape[-1]
    reach = (kernel_size - 1) * dilation
    b = block_size or BLOCK_SIZE  # 64: window 256 at T=8192 ran 6.1x SDPA causal with b = 64, 4.9x with b = 256
    p = -(-reach // b)  # previous key blocks a query block reaches
    n = -(-T // b)
    Tp, BH, W = n * b, B * H, (p + 1) * b

    def time_major(t: Tensor, left: int) -> Tensor:  # (B, T, H, D) -> (left + Tp, B H, D)
        t = t.transpose(0, 1)  # (T, B, H, D); padded keys at the end come after every real query: causally hidden
        if left or Tp != T:
            t = F.pad(t, (0, 0, 0, 0, 0, 0, left, Tp - T))
        return t.reshape(left + Tp, BH, t.shape[-1])  # a view when B == 1 and nothing is padded

    def windows(t: Tensor) -> Tensor:  # (p b + Tp, B H, D) -> (n, B H, W, D): the keys of query block j
        return t.reshape(p * b + Tp, -1).unfold(0, W, b).view(n, BH, t.shape[-1], W).transpose(-1, -2)

    q_blocks = time_major(q, 0).view(n, b, BH, -1).transpose(1, 2)  # (n, B H, b, D)
    k_win, v_win = windows(time_major(k, p * b)), windows(time_major(v, p * b))  # (n, B H, W, D)
    # compiled code traces the builder itself (the cache would be a Python side effect in the graph)
    build_mask = _causal_window_mask.__wrapped__ if torch.compiler.is_compiling() else _causal_window_mask
    mask = build_mask(kernel_size, dilation, b, p, n, q.dtype, q.device)  # (n, 1, b, W)
    if key_mask is None:  # every query sees itself: no empty rows
        o = F.scaled_dot_product_attention(q_blocks, k_win, v_win, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    else:
        real = F.pad(key_mask, (p * b, Tp - T)).repeat_interleave(H, dim=0)  # (B H, p b + Tp)
        real = real.unfold(1, W, b).transpose(0, 1)[:, :, None, :]  # (n, B H, 1, W)
        visible = real & (mask == 0)
        has_key = visible.any(dim=-1, keepdim=True)  # a row of padded keys only: open it, then zero its output
        mask = torch.where(visible | ~has_key, 0.0, float("-inf")).to(q.dtype)
        o = F.scaled_dot_product_attention(q_blocks, k_win, v_win, attn_mask=mask, dropout_p=dropout_p, scale=scale)
        o = o * has_key.to(o.dtype)
    o = o.transpose(1, 2).reshape(Tp, B, H, Dv)  # (n, B H, b, Dv) -> time-major
    return o.transpose(0, 1)[:, :T]


def neighborhood_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    kernel_size: int,
    dilation: int = 1,
    causal: bool = False,
    grid_size: tuple[int, int] | None = None,
    num_prefix_tokens: int = 0,
    key_mask: Tensor | None = None,
    rpb: Tensor | None = None,
    pad_to_kernel: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str = "auto",
    block_size: int | None = None,
) -> Tensor:
    """(Dilated, causal) neighborhood attention, NATTEN's semantics (see the module docstring).

    Args:
        q: (B, T, H, D) queries; with ``causal`` and fewer queries than keys (decoding), the last T of the S
            positions (bottom-right aligned).
        k: (B, S, H, D) keys: ``num_prefix_tokens`` prefix tokens, then the grid (row-major) or 1-D sequence.
        v: (B, S, H, Dv) values.
        kernel_size: k, neighbours per axis (odd unless causal).
        dilation: d, neighbours are every d-th position (DiNAT).
        causal: 1-D causal neighbourhood (the k most recent positions of the query's dilation group).
        grid_size: (h, w) token grid after the prefix, or None for a 1-D sequence.
        num_prefix_tokens: tokens before the grid that attend and are attended globally (non-causal only).
        key_mask: (B, S) bool, True = real key. 1-D non-causal: a sequence whose real keys are one contiguous span
            gets that span's windows (the same outputs as the span alone); a mask with holes keeps the full length's.
        rpb: relative position bias, (H, 2k - 1) in 1-D or (H, 2k - 1, 2k - 1) on a grid (non-causal only).
        pad_to_kernel: False raises when an axis is shorter than kernel_size * dilation (NATTEN's functional ops);
            True treats it as padded up to that size with masked keys (NATTEN's modules zero-pad).
        dropout_p: attention-probability dropout.
        scale: logit scale, default D^-1/2.
        backend: ``auto`` (causal on CPU: ``blocked``; otherwise sparse_attention's auto: FlexAttention on CUDA,
            gathered tiles elsewhere), ``blocked`` (causal only), or a sparse_attention backend: ``torch``, ``flex``,
            ``reference``.
        block_size: query block b of the causal ``blocked`` path (None = 64); each block reads
            (1 + ceil((k - 1) d / b)) b keys.

    Returns:
        (B, T, H, Dv); a query with no visible real key gets zeros.
    """
    label = "neighborhood_attention"
    check_kernel(label, kernel_size, dilation, causal)
    if backend not in BACKENDS:
        raise ValueError(f"{label}: " + unknown("backend", backend, BACKENDS))
    T, D = q.shape[1], q.shape[-1]
    S, P = k.shape[1], num_prefix_tokens
    grid = check_grid(label, grid_size)
    if causal and (grid is not None or P > 0):
        raise ValueError(
            f"{label}: causal neighborhood attention is 1-D without prefix tokens; got grid_size={grid_size!r}, "
            f"num_prefix_tokens={P}."
        )
    if causal and rpb is not None:
        raise ValueError(f"{label}: a relative position bias is undefined for causal neighborhoods (as in NATTEN).")
    if not causal and T != S:
        raise ValueError(f"{label}: non-causal self-attention needs as many queries as keys; got T={T}, S={S}.")
    if backend == "blocked" and (not causal or T != S):
        raise ValueError(f"{label}: backend='blocked' is the causal full-sequence path (causal=True, T == S).")
    length = S - P
    sizes = token_grid(label, grid, P, S)
    axes = [sizes[1]] if grid is None else list(sizes)
    if not causal and not pad_to_kernel and min(axes) < kernel_size * dilation:
        raise ValueError(
            f"{label}: kernel_size * dilation = {kernel_size} * {dilation} = {kernel_size * dilation} exceeds the "
            f"{'grid ' + str(tuple(sizes)) if grid is not None else f'sequence length {length}'}: every dilation "
            "group must hold kernel_size positions. Use a smaller kernel_size or dilation, or pad_to_kernel=True."
        )
    scale = D**-0.5 if scale is None else float(scale)
    if causal and T == S and (backend == "blocked" or (backend == "auto" and not q.is_cuda)):
        return _causal_blocked(q, k, v, kernel_size, dilation, key_mask, dropout_p, scale, block_size)
    # 1-D non-causal with padding: windows placed per sequence (its real span), so padding changes no output
    spans = None if causal or grid is not None or key_mask is None else sequence_spans(key_mask[:, P:])
    pattern = neighborhood_pattern(
        grid, length, kernel_size, dilation, causal, P, q_len=T - P, spans=spans, device=q.device
    )
    bias_mod = None if rpb is None else neighborhood_bias_mod(rpb, grid, kernel_size, dilation, P)
    o = sparse_attention(
        q[:, P:], k, v, pattern, key_mask=key_mask, bias_mod=bias_mod, scale=scale, dropout_p=dropout_p, backend=backend
    )
    if P > 0:  # prefix queries: global attention over every token
        prefix = sdpa(q[:, :P], k, v, causal=False, key_mask=key_mask, dropout_p=dropout_p, scale=scale)
        o = torch.cat([prefix, o], dim=1)
    return o


@register_attention("neighborhood")
class NeighborhoodAttention(Attention):
    """Neighborhood attention (NAT / DiNAT): k nearest neighbours per axis, shifted at borders, optional dilation."""

    patterns = frozenset({"noncausal_self", "causal_self"})
    pattern_note = "Neighborhoods are defined over one sequence's (or grid's) own positions; there is no cross form."

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        kernel_size: int = 7,
        dilation: int = 1,
        grid_size: tuple[int, int] | None = None,
        num_prefix_tokens: int | None = None,
        rel_pos_bias: bool | None = None,
        qkv_bias: bool = True,
        rope: bool = False,
        rope_base: float = 10000.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        """
        Args:
            dim: model width.
            num_heads: heads; head_dim = dim // num_heads.
            causal: 1-D causal neighbourhoods (the kernel_size most recent positions of the dilation group).
            cross: must be False.
            kernel_size: k, neighbours per axis (NAT: 7); odd unless causal.
            dilation: d, neighbours every d-th position (DiNAT; 1 = NAT).
            grid_size: (h, w) token grid (ViT patches, row-major) for 2-D neighbourhoods, or None for 1-D; the ViT
                backbone sets it. Non-causal only.
            num_prefix_tokens: class/register tokens before the grid; they attend and are seen globally; None = 0
                (the ViT sets its class tokens).
            rel_pos_bias: NATTEN's ``rpb`` table; None = on for a 2-D grid (NAT), off for 1-D and causal.
            qkv_bias: bias in the q/k/v projection (NATTEN default True).
            rope: rotary position embedding on q and k over the token positions (off: NAT uses the bias).
            rope_base: RoPE frequency base.
            attn_drop: dropout on the attention probabilities (training only).
            proj_drop: dropout after the output projection.
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        label = self.name
        check_kernel(label, kernel_size, dilation, causal)
        self.grid_size = check_grid(label, grid_size)
        num_prefix_tokens = check_prefix(label, num_prefix_tokens)
        if causal and (self.grid_size is not None or num_prefix_tokens > 0):
            raise ValueError(
                f"{label}: causal neighborhoods are 1-D without prefix tokens; got grid_size={grid_size!r}, "
                f"num_prefix_tokens={num_prefix_tokens}. Build it with causal=False for a grid."
            )
        if rel_pos_bias is None:
            rel_pos_bias = self.grid_size is not None and not causal
        if rel_pos_bias and causal:
            raise ValueError(
                f"{label}: rel_pos_bias=True is undefined for causal neighborhoods (NATTEN raises too); "
                "use rope=True for positions in a causal model."
            )
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.num_prefix_tokens = num_prefix_tokens
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if rel_pos_bias:
            table = (2 * kernel_size - 1,) * (1 if self.grid_size is None else 2)
            self.rpb = nn.Parameter(torch.empty(num_heads, *table))
            nn.init.trunc_normal_(self.rpb, std=RPB_STD, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.rope = RotaryEmbedding(self.head_dim, rope_base) if rope else None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @property
    def cache_window(self) -> int:
        """Past keys a causal query can reach besides its own: (kernel_size - 1) * dilation."""
        return (self.kernel_size - 1) * self.dilation

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: SlidingWindowCache | None = None,
    ) -> Tensor:
        self.check_inputs(x, context, padding_mask, cache)
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, T, 3, H, D).unbind(2)  # (B, T, H, D) each
        offset = 0 if cache is None else cache.length
        if self.rope is not None:
            q, k = self.rope(q, offset), self.rope(k, offset)
        dtype = torch.promote_types(q.dtype, torch.float32)  # softmax in float32 at least, also under autocast
        dropout_p = self.attn_drop if self.training else 0.0
        with torch.autocast(x.device.type, enabled=False):
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            key_mask = padding_mask
            if cache is not None:
                k, v, key_mask = cache.update(k, v, padding_mask)
            rpb = None if self.rpb is None else self.rpb.to(dtype)
            o = neighborhood_attention(
                q,
                k,
                v,
                kernel_size=self.kernel_size,
                dilation=self.dilation,
                causal=self.causal,
                grid_size=self.grid_size,
                num_prefix_tokens=self.num_prefix_tokens,
                key_mask=key_mask,
                rpb=rpb,
                pad_to_kernel=True,
                dropout_p=dropout_p,
            )
        return self.proj_drop(self.proj(o.reshape(B, T, self.dim).to(x.dtype)))

    def new_cache(self, batch_size: int) -> SlidingWindowCache:
        if not self.causal:
            return super().new_cache(batch_size)  # raises: only causal layers decode
        return SlidingWindowCache(batch_size, self.cache_window)

    def state_size(self, seq_len: int) -> int:
        # keys and values of the last (kernel_size - 1) * dilation positions, every head
        return 2 * min(seq_len, self.cache_window) * self.dim

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
            f"grid_size={self.grid_size}, num_prefix_tokens={self.num_prefix_tokens}, rpb={self.rpb is not None}"
        )
