"""Landmark attention — Mohtashami & Jaggi 2023, "Landmark Attention: Random-Access Infinite Context Length for
Transformers", https://arxiv.org/abs/2305.16300 (official code: epfml/landmark-attention, the grouped softmax of
``lm_benchmark/models/landmark.py`` / ``llama/llama_mem.py``).

The keys are cut into blocks of ``block_size`` tokens and every block g has a landmark key L_g. Query i of block b(i)
attends its own block directly and every other block through that block's landmark (grouped softmax):

    s_ij = q_i k_j^T / sqrt(D),   s_ig = q_i L_g^T / sqrt(D)
    Z_i  = sum_{j in own(i)} exp(s_ij) + sum_{g in other(i)} exp(s_ig)
    w_ij = exp(s_ij) / Z_i                                          j in own(i)
    w_ij = exp(s_ig) / Z_i * exp(s_ij) / sum_{j' in g} exp(s_ij')   j in block g, g in other(i)
    o_i  = sum_j w_ij v_j

causal_self (the paper's LM use): own(i) = {j in b(i), j <= i}, other(i) = the earlier blocks g < b(i).
noncausal_self: own(i) = all of b(i), other(i) = every other block. Landmarks carry no value. The grouped softmax is
one softmax over adjusted logits (s_ij for own tokens, s_ig + s_ij - logsumexp_{j' in g} s_ij' for the others), which
is how it is computed here: block-shaped matmuls (queries x blocks x block tokens), no loop over tokens or blocks.

Deviation from the paper (a contract layer cannot insert tokens into the sequence): there a landmark is an extra
token placed after every block, and its key is whatever the network computes at that token. Here the landmark key is
a content summary of the block, L_g = mean_{j in g, real} k_j + e_h, the mean of the block's (rotated) keys plus a
learned per-head landmark vector e_h (``landmark_key``, zero at init, so a landmark starts as the block's mean
logit). The grouped-softmax semantics above are exact. A block with no real key has no landmark.

Retrieval (``top_k_blocks``, paper §3.2 and ``llama_mem.py``'s ``cache_top_k``): each query keeps only the k other
blocks with the highest landmark scores s_ig (per head), and the grouped softmax runs over those and its own block.
None (default) = every block, as in training. Cost: scores are T x S (the grouped softmax weighs every key).
Decoding keeps every key and value plus one landmark key per completed block.

Defaults: ``block_size=50`` (the paper's block length, ``--mem_freq 50``), RoPE on q and k with base 10000 (the
official runs use rotary embeddings), no projection bias (LLaMA's attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.layers.kv_cache import KVCache
from attnzoo.layers.registry import Attention, register_attention
from attnzoo.layers.rope import RotaryEmbedding


@dataclass
class LandmarkCache(KVCache):
    """A :class:`KVCache` plus the landmark key of every completed block (partial blocks are attended directly)."""

    landmark_keys: Tensor | None = None  # (B, completed blocks, H, D)
    landmark_ok: Tensor | None = None  # (B, completed blocks) bool: the block has a real key


@register_attention("landmark")
class LandmarkAttention(Attention):
    """Landmark attention (Mohtashami & Jaggi 2023): grouped softmax over block landmarks, optional top-k retrieval."""

    patterns = frozenset({"causal_self", "noncausal_self"})
    pattern_note = "Landmarks summarise blocks of the attending sequence itself; there is no cross form."

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        block_size: int = 50,
        top_k_blocks: int | None = None,
        rope: bool = True,
        rope_base: float = 10000.0,
        bias: bool = False,
    ) -> None:
        """
        Args:
            dim: model width.
            num_heads: heads; head_dim = dim // num_heads.
            causal: query i sees keys j <= i (earlier blocks through their landmarks).
            cross: must be False.
            block_size: tokens per landmark block (paper: 50).
            top_k_blocks: keep only the k other blocks with the highest landmark score per query and head (the
                paper's retrieval at inference); None = all blocks.
            rope: rotary position embedding on q and k (the official code's rotary config).
            rope_base: RoPE frequency base.
            bias: bias in the q/k/v/o projections.
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"landmark: block_size must be a positive int; got {block_size!r}.")
        if top_k_blocks is not None and (
            not isinstance(top_k_blocks, int) or isinstance(top_k_blocks, bool) or top_k_blocks < 1
        ):
            raise ValueError(
                f"landmark: top_k_blocks must be None (all blocks) or a positive int; got {top_k_blocks!r}."
            )
        self.block_size = block_size
        self.top_k_blocks = top_k_blocks
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)
        # e_h, added to every landmark key; zero: a landmark starts as its block's mean key
        self.landmark_key = nn.Parameter(torch.zeros(num_heads, self.head_dim))
        self.rope = RotaryEmbedding(self.head_dim, rope_base) if rope else None

    def landmarks(self, k: Tensor, key_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Landmark keys of the blocks of ``k`` (B, S, H, D), the last one possibly partial: (B, n, H, D) and
        (B, n) bool (False: the block has no real key, hence no landmark)."""
        B, S, H, D = k.shape
        n = -(-S // self.block_size)
        pad = n * self.block_size - S
        real = torch.ones(B, S, dtype=torch.bool, device=k.device) if key_mask is None else key_mask
        weight = F.pad(real, (0, pad)).view(B, n, self.block_size, 1, 1).to(k.dtype)
        total = (F.pad(k, (0, 0, 0, 0, 0, pad)).view(B, n, self.block_size, H, D) * weight).sum(dim=2)
        count = weight.sum(dim=2)  # (B, n, 1, 1)
        mean = total / count.clamp(min=1)
        return mean + self.landmark_key.to(k.dtype), count[:, :, 0, 0] > 0

    def grouped_attention(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        landmark_keys: Tensor,
        landmark_ok: Tensor,
        key_mask: Tensor | None,
        q_offset: int = 0,
    ) -> Tensor:
        """The grouped softmax: q (B, T, H, D) at positions q_offset ..; k, v (B, S, H, D) at 0 .. S - 1; landmark
        keys (B, n_L, H, D) of the first n_L blocks. Returns (B, T, H, D); a query with no visible key outputs zero."""
        B, T, H, D = q.shape
        S, size = k.shape[1], self.block_size
        n = -(-S // size)
        pad = n * size - S
        real = torch.ones(B, S, dtype=torch.bool, device=q.device) if key_mask is None else key_mask
        real = F.pad(real, (0, pad)).view(B, 1, 1, n, size)  # (B, 1, 1, n, size)
        kb = F.pad(k, (0, 0, 0, 0, 0, pad)).view(B, n, size, H, D)
        vb = F.pad(v, (0, 0, 0, 0, 0, pad)).view(B, n * size, H, D)
        missing = n - landmark_keys.shape[1]  # a cache holds no landmark for the current, partial block
        if missing:
            landmark_keys = F.pad(landmark_keys, (0, 0, 0, 0, 0, missing))
            landmark_ok = F.pad(landmark_ok, (0, missing))
        scale = D**-0.5
        compute = torch.promote_types(q.dtype, torch.float32)  # softmax statistics in float32 at least
        s = (torch.einsum("bthd,bnehd->bhtne", q, kb) * scale).to(compute)  # (B, H, T, n, size)
        s_landmark = (torch.einsum("bthd,bnhd->bhtn", q, landmark_keys) * scale).to(compute)  # (B, H, T, n)

        q_pos = torch.arange(q_offset, q_offset + T, device=q.device)
        q_block = torch.div(q_pos, size, rounding_mode="floor")[:, None]  # (T, 1)
        block = torch.arange(n, device=q.device)[None, :]  # (1, n)
        own = (block == q_block)[:, :, None] & real  # (B, 1, T, n, size)
        if self.causal:
            k_pos = torch.arange(n * size, device=q.device).view(1, n, size)
            own = own & (k_pos <= q_pos[:, None, None])
        other = block < q_block if self.causal else block != q_block  # (T, n)
        selected = other & landmark_ok[:, None, None, :]  # (B, 1, T, n)
        if self.top_k_blocks is not None and self.top_k_blocks < n:
            ranked = s_landmark.masked_fill(~selected, float("-inf"))
            top = ranked.topk(self.top_k_blocks, dim=-1).indices
            selected = selected & torch.zeros_like(ranked, dtype=torch.bool).scatter_(-1, top, True)  # (B, H, T, n)

        # log of each block's within-block normaliser over its real keys (finite for empty blocks: unused there)
        has_real = real.any(dim=-1, keepdim=True)
        log_norm = torch.logsumexp(s.masked_fill(~real, float("-inf")).masked_fill(~has_real, 0.0), dim=-1)
        adjusted = torch.where(own, s, s + (s_landmark - log_norm)[..., None])  # (B, H, T, n, size)
        visible = own | (selected[..., None] & real)
        adjusted, visible = adjusted.flatten(-2), visible.expand_as(s).flatten(-2)  # (B, H, T, n size)
        has_key = visible.any(dim=-1, keepdim=True)
        probs = torch.softmax(adjusted.masked_fill(~visible, float("-inf")).masked_fill(~has_key, 0.0), dim=-1)
        probs = (probs * has_key).to(v.dtype)
        return torch.einsum("bhts,bshd->bthd", probs, vb)

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: LandmarkCache | None = None,
    ) -> Tensor:
        self.check_inputs(x, context, padding_mask, cache)
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, H, D)
        v = self.v_proj(x).view(B, T, H, D)
        offset = 0 if cache is None else cache.length
        if self.rope is not None:
            q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is None:
            landmark_keys, landmark_ok = self.landmarks(k, padding_mask)
            o = self.grouped_attention(q, k, v, landmark_keys, landmark_ok, padding_mask)
        else:
            k, v, key_mask = cache.update(k, v, padding_mask)
            landmark_keys, landmark_ok = self._update_landmarks(cache, k, key_mask)
            o = self.grouped_attention(q, k, v, landmark_keys, landmark_ok, key_mask, offset)
        return self.o_proj(o.reshape(B, T, self.dim))

    def _update_landmarks(self, cache: LandmarkCache, k: Tensor, key_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Append the landmark keys of the blocks completed by this call (computed once, from the kept keys)."""
        done = 0 if cache.landmark_keys is None else cache.landmark_keys.shape[1]
        complete = cache.length // self.block_size
        if cache.landmark_keys is None or complete > done:
            start, end = done * self.block_size, complete * self.block_size
            mask = None if key_mask is None else key_mask[:, start:end]
            new_keys, new_ok = self.landmarks(k[:, start:end], mask)
            if cache.landmark_keys is None:
                cache.landmark_keys, cache.landmark_ok = new_keys, new_ok
            else:
                cache.landmark_keys = torch.cat([cache.landmark_keys, new_keys], dim=1)
                cache.landmark_ok = torch.cat([cache.landmark_ok, new_ok], dim=1)
        return cache.landmark_keys, cache.landmark_ok

    def new_cache(self, batch_size: int) -> LandmarkCache:
        if not self.causal:
            return super().new_cache(batch_size)  # raises: only causal layers decode
        return LandmarkCache(batch_size)

    def state_size(self, seq_len: int) -> int:
        # keys and values of every position, plus one landmark key per completed block, every head
        return (2 * seq_len + seq_len // self.block_size) * self.dim

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}, top_k_blocks={self.top_k_blocks}"
