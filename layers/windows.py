"""Window-major token order on a 2-D grid: the index plumbing that window (Swin) and region (BiFormer) attention share.

Tokens of a ViT arrive row-major over an (h, w) grid, so a 7x7 window is 7 separate runs of 7 tokens. Reordering the
tokens window by window (the idea of timm's ``window_partition``) makes every window one contiguous block of
``window_h * window_w`` positions, which a block-sparse attention can then treat as one block. The grid is first
padded at the bottom and right to a multiple of the window (padding slots are reported by ``is_real`` so the layers
mask them as keys), then optionally cyclically shifted up-left by ``shift`` (Swin's ``torch.roll(x, -shift)``) on the
padded grid, then cut into windows. Everything here is computed from the sizes alone (no data-dependent indexing), so
it traces under ``torch.compile(fullgraph=True)``; a layer gathers with ``to_windows`` and scatters back with
``from_windows``, both O(T).

Region labels (``region``) are Swin's shifted-window mask: after the cyclic shift, the last window row/column holds
tokens from the bottom/right edge next to tokens wrapped around from the top/left. Slots get one of 3 x 3 labels by
the bands [0, H - window), [H - window, H - shift), [H - shift, H) of the padded height H (and the same for the width),
exactly timm's ``img_mask`` counting; two tokens of a window may attend to each other only if their labels agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class WindowLayout:
    """Where each grid token sits in window-major order, for one (grid, window, shift).

    Attributes:
        grid: (h, w) of the real tokens (row-major).
        window: (window_h, window_w); each window is ``window_h * window_w`` consecutive slots.
        shift: (shift_h, shift_w) cyclic shift applied before partitioning (0 = plain windows).
        num_windows: (n_h, n_w) windows along each axis; slots = n_h * n_w * window_h * window_w.
        gather_index: (slots,) long: the row-major grid index of the token in each slot, ``h * w`` for a padding slot
            (the layers append one zero token there).
        scatter_index: (h * w,) long: the slot of each grid token (inverse of ``gather_index`` on real slots).
        is_real: (slots,) bool: False for padding slots.
        region: (slots,) long: Swin's shifted-window region label (all 0 without a shift).
        row, col: (slots,) long: the slot's coordinates inside its window (for relative position biases).
    """

    grid: tuple[int, int]
    window: tuple[int, int]
    shift: tuple[int, int]
    num_windows: tuple[int, int]
    gather_index: Tensor
    scatter_index: Tensor
    is_real: Tensor
    region: Tensor
    row: Tensor
    col: Tensor

    @property
    def window_area(self) -> int:
        return self.window[0] * self.window[1]

    @property
    def num_slots(self) -> int:
        return self.num_windows[0] * self.num_windows[1] * self.window_area

    def to_windows(self, x: Tensor) -> Tensor:
        """(B, h * w, ...) row-major grid tokens -> (B, slots, ...) window-major, zeros in padding slots."""
        pad = x.new_zeros(x.shape[0], 1, *x.shape[2:])
        return torch.cat([x, pad], dim=1).index_select(1, self.gather_index)

    def from_windows(self, x: Tensor) -> Tensor:
        """(B, slots, ...) window-major -> (B, h * w, ...) row-major; padding slots are dropped."""
        return x.index_select(1, self.scatter_index)


def _band(coord: Tensor, size: int, window: int, shift: int) -> Tensor:
    """Swin's region band of a (shifted, padded) coordinate: 0, 1 or 2 (timm's slices (0, -w), (-w, -s), (-s, None))."""
    return (coord >= size - window).long() + (coord >= size - shift).long()


def window_layout(
    grid: tuple[int, int],
    window: tuple[int, int],
    shift: tuple[int, int] = (0, 0),
    device: torch.device | str | None = None,
) -> WindowLayout:
    """The window-major order of an (h, w) grid cut into (window_h, window_w) windows after a cyclic ``shift``.

    Args:
        grid: (h, w) token grid, row-major.
        window: window size per axis, each between 1 and the grid size (callers clamp, as timm does).
        shift: cyclic shift per axis, 0 <= shift < window (Swin: window // 2 on every other block).
        device: where the index tensors live.
    """
    (h, w), (wh, ww), (sh, sw) = grid, window, shift
    if not (1 <= wh <= h and 1 <= ww <= w):
        raise ValueError(f"window {window} must fit the grid {grid} (1 <= window <= grid on each axis).")
    if not (0 <= sh < wh and 0 <= sw < ww):
        raise ValueError(f"shift {shift} must satisfy 0 <= shift < window {window} on each axis.")
    nh, nw = math.ceil(h / wh), math.ceil(w / ww)
    Hp, Wp = nh * wh, nw * ww
    kw = {"device": device, "dtype": torch.long}
    # slot s = ((window row, window col), row in window, col in window), window-major then row-major
    win_r = torch.arange(nh, **kw).view(nh, 1, 1, 1)
    win_c = torch.arange(nw, **kw).view(1, nw, 1, 1)
    row = torch.arange(wh, **kw).view(1, 1, wh, 1)
    col = torch.arange(ww, **kw).view(1, 1, 1, ww)
    shifted_r = (win_r * wh + row).expand(nh, nw, wh, ww).reshape(-1)  # coordinates on the shifted padded grid
    shifted_c = (win_c * ww + col).expand(nh, nw, wh, ww).reshape(-1)
    # torch.roll(x, -shift) puts padded-grid element (r + shift) % H at r
    source_r, source_c = (shifted_r + sh) % Hp, (shifted_c + sw) % Wp
    is_real = (source_r < h) & (source_c < w)
    gather_index = torch.where(is_real, source_r * w + source_c, torch.full_like(source_r, h * w))
    if sh or sw:
        region = _band(shifted_r, Hp, wh, sh) * 3 + _band(shifted_c, Wp, ww, sw)
    else:
        region = torch.zeros_like(shifted_r)
    # inverse map, analytically: grid token (i, j) sits at shifted coordinates ((i - shift) mod H, (j - shift) mod W)
    i = torch.arange(h, **kw).view(h, 1)
    j = torch.arange(w, **kw).view(1, w)
    r, c = (i - sh) % Hp, (j - sw) % Wp
    scatter_index = (((r // wh) * nw + c // ww) * (wh * ww) + (r % wh) * ww + c % ww).reshape(-1)
    return WindowLayout(
        grid=(h, w),
        window=(wh, ww),
        shift=(sh, sw),
        num_windows=(nh, nw),
        gather_index=gather_index,
        scatter_index=scatter_index,
        is_real=is_real,
        region=region,
        row=(row.expand(nh, nw, wh, ww).reshape(-1)),
        col=(col.expand(nh, nw, wh, ww).reshape(-1)),
    )


def check_grid(label: str, grid_size: tuple[int, int] | None) -> tuple[int, int] | None:
    """Validate a layer's ``grid_size`` option: None (1-D sequence) or (h, w) positive ints."""
    if grid_size is None:
        return None
    grid = tuple(grid_size)
    if len(grid) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in grid):
        raise ValueError(f"{label}: grid_size must be (h, w) with positive integers or None; got {grid_size!r}.")
    return grid


def check_prefix(label: str, num_prefix_tokens: int | None) -> int:
    """Validate a layer's ``num_prefix_tokens`` option: an int >= 0, or None (unset: 0 unless a backbone fills it in,
    as the ViT does with its class tokens)."""
    if num_prefix_tokens is None:
        return 0
    if not isinstance(num_prefix_tokens, int) or isinstance(num_prefix_tokens, bool) or num_prefix_tokens < 0:
        raise ValueError(f"{label}: num_prefix_tokens must be an integer >= 0 or None; got {num_prefix_tokens!r}.")
    return num_prefix_tokens


def token_grid(label: str, grid_size: tuple[int, int] | None, num_prefix_tokens: int, T: int) -> tuple[int, int]:
    """The (h, w) grid of the T - num_prefix_tokens tokens after the prefix: ``grid_size``, or (1, L) without one."""
    L = T - num_prefix_tokens
    if L < 1:
        raise ValueError(f"{label}: x has {T} tokens, no more than its num_prefix_tokens={num_prefix_tokens}.")
    if grid_size is None:
        return (1, L)
    h, w = grid_size
    if h * w != L:
        raise ValueError(
            f"{label}: built for num_prefix_tokens={num_prefix_tokens} + a {h}x{w} grid = {num_prefix_tokens + h * w} "
            f"tokens; got {T}. Set layer.grid_size to the new (h, w), or grid_size=None for a 1-D sequence."
        )
    return (h, w)
