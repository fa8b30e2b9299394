"""Block-sparse attention patterns: one mask function plus the key blocks each query block may touch.

A pattern is written once, as a ``mask_mod`` with the signature of FlexAttention's ``mask_mod``
(``(b, h, q_idx, kv_idx) -> bool``, True = may attend), using only broadcasting tensor ops so the same function runs on
whole index tensors (the torch lowering, the dense oracle) and elementwise under FlexAttention's vmap. ``kv_blocks``
says which key blocks can hold a True entry for each query block; the layers build it analytically (a band, a routing
choice), never by evaluating a T x S mask, so the torch lowering costs O(T x visible keys).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (b, h, q_idx, kv_idx) -> bool, True = may attend
BiasMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (b, h, q_idx, kv_idx) -> float logit bias


def num_blocks(length: int, block_size: int) -> int:
    """Blocks of ``block_size`` positions covering ``length`` (the last one may be partial)."""
    return -(-length // block_size)


@dataclass(frozen=True)
class BlockPattern:
    """An attention pattern over ``q_len`` queries and ``kv_len`` keys, cut into blocks of ``block_size``.

    Attributes:
        mask_mod: the single definition of the pattern, ``(b, h, q_idx, kv_idx) -> bool`` on broadcasting index
            tensors (absolute positions: query ``q_idx`` in ``[0, q_len)``, key ``kv_idx`` in ``[0, kv_len)``).
        q_len: number of queries T.
        kv_len: number of keys S.
        block_size: positions per query block and per key block (the last block of each may be partial).
        kv_blocks: long, (num_q_blocks, max_kv_blocks), or (B, H, num_q_blocks, max_kv_blocks) for data-dependent
            routing: the key blocks query block n may attend to, -1 = unused slot, no block listed twice in a row.
            Every (query, key) pair where ``mask_mod`` is True must lie in a listed block; pairs outside the listed
            blocks are never computed (:func:`check_kv_blocks` verifies the cover on small shapes, for tests).
    """

    mask_mod: MaskMod
    q_len: int
    kv_len: int
    block_size: int
    kv_blocks: Tensor

    def __post_init__(self) -> None:
        for name in ("q_len", "kv_len", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockPattern: {name} must be a positive int; got {value!r}.")
        if not callable(self.mask_mod):
            raise TypeError(
                f"BlockPattern: mask_mod must be callable (b, h, q_idx, kv_idx) -> bool; got {self.mask_mod!r}."
            )
        blocks = self.kv_blocks
        if (
            not isinstance(blocks, Tensor)
            or blocks.dtype not in (torch.int64, torch.int32)
            or blocks.dim() not in (2, 4)
        ):
            got = f"{blocks.dtype} {tuple(blocks.shape)}" if isinstance(blocks, Tensor) else type(blocks).__name__
            raise ValueError(
                "BlockPattern: kv_blocks must be an integer tensor of shape (num_q_blocks, max_kv_blocks) or "
                f"(B, H, num_q_blocks, max_kv_blocks); got {got}."
            )
        if blocks.shape[-2] != self.num_q_blocks or blocks.shape[-1] < 1:
            raise ValueError(
                f"BlockPattern: kv_blocks must have num_q_blocks = ceil(q_len / block_size) = "
                f"ceil({self.q_len} / {self.block_size}) = {self.num_q_blocks} rows and at least one slot; "
                f"got shape {tuple(blocks.shape)}."
            )
        if torch.compiler.is_compiling():  # the value checks below read data; a compiled layer built them itself
            return
        if blocks.numel() and (int(blocks.min()) < -1 or int(blocks.max()) >= self.num_kv_blocks):
            raise ValueError(
                f"BlockPattern: kv_blocks entries must be -1 (unused) or key block indices in "
                f"[0, {self.num_kv_blocks}) (kv_len={self.kv_len}, block_size={self.block_size}); got values in "
                f"[{int(blocks.min())}, {int(blocks.max())}]."
            )
        ordered = blocks.sort(dim=-1).values
        if ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any():
            raise ValueError("BlockPattern: a row of kv_blocks lists the same key block twice (it would count twice).")

    @property
    def num_q_blocks(self) -> int:
        return num_blocks(self.q_len, self.block_size)

    @property
    def num_kv_blocks(self) -> int:
        return num_blocks(self.kv_len, self.block_size)


def band_kv_blocks(
    q_len: int, kv_len: int, block_size: int, min_offset: int, max_offset: int, *, device: torch.device | None = None
) -> Tensor:
    """Key blocks each query block needs when query i sees at most keys ``i + min_offset .. i + max_offset``.

    Query i is aligned with key ``i + kv_len - q_len`` (bottom-right, FlashAttention's convention; the identity when
    ``q_len == kv_len``), and the offsets are relative to that key. Returns (num_q_blocks, m) long with -1 in slots a
    border block does not need; m is the most blocks any query block's key range can span.
    """
    if min_offset > max_offset:
        raise ValueError(f"band_kv_blocks: min_offset={min_offset} must be <= max_offset={max_offset}.")
    nqb, nkb = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    shift = kv_len - q_len
    # a query block's key range holds block_size + max_offset - min_offset positions and starts at offset
    # (shift + min_offset) mod block_size inside its first key block, the same for every query block: that fixes
    # how many key blocks it can span (one fewer than an unaligned range of that length, in the common case)
    start_in_block = (shift + min_offset) % block_size
    width = min(nkb, (start_in_block + block_size + max_offset - min_offset - 1) // block_size + 1)
    q_start = torch.arange(nqb, device=device) * block_size
    q_end = torch.clamp(q_start + block_size - 1, max=q_len - 1)
    first = torch.clamp(q_start + shift + min_offset, min=0) // block_size  # (nqb,)
    last = torch.clamp(q_end + shift + max_offset, max=kv_len - 1)
    last = torch.where(last < 0, -1, last // block_size)
    blocks = first[:, None] + torch.arange(width, device=device)  # (nqb, width)
    return torch.where(blocks <= last[:, None], blocks, -1)


def band_pattern(
    q_len: int,
    kv_len: int,
    before: int,
    after: int,
    *,
    dilation: int = 1,
    causal: bool = False,
    block_size: int = 64,
    device: torch.device | None = None,
) -> BlockPattern:
    """Banded (sliding-window, optionally dilated) attention: query i sees key j when

        -before * dilation <= j - a(i) <= after * dilation  and  (j - a(i)) % dilation == 0  [and j <= a(i) if causal]

    with a(i) = i + kv_len - q_len the key aligned with query i (bottom-right alignment; a(i) = i for self-attention),
    so each query sees up to ``before + after + 1`` keys. Sliding-window causal attention of window w is
    ``band_pattern(T, T, w - 1, 0, causal=True)``. A dilated band skips keys inside the blocks it touches, so its
    cost is ``dilation`` times the visible keys.
    """
    for name, value in (("before", before), ("after", after)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"band_pattern: {name} must be an int >= 0; got {value!r}.")
    if not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"band_pattern: dilation must be a positive int; got {dilation!r}.")
    shift = kv_len - q_len
    lo, hi = -before * dilation, (0 if causal else after) * dilation

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        offset = kv_idx - (q_idx + shift)
        visible = (offset >= lo) & (offset <= hi)
        return visible & (offset % dilation == 0) if dilation > 1 else visible

    blocks = band_kv_blocks(q_len, kv_len, block_size, lo, hi, device=device)
    return BlockPattern(mask_mod, q_len, kv_len, block_size, blocks)
