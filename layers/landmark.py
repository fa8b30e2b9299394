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
one softmax over adjusted logits,

    a_ij = s_ij                                   j in own(i)
    a_ij = s_ij + (s_ig - log_norm_ig)            j in block g, g in other(i),  log_norm_ig = logsumexp_{j' in g} s_ij'

and is lowered two ways (``backend``). On the CPU (``"torch"``) it is computed directly with block-shaped matmuls
(queries x blocks x block tokens, no loop over tokens or blocks): the T x S scores are made once and serve both the
normalisers and the softmax. On CUDA (``"flex"``) the same softmax is a block-sparse pattern (:func:`landmark_pattern`)
through ``attnzoo.kernels.sparse_attention``'s FlexAttention: mask_mod = own(i, j) or selected[b, h, i, g(j)],
bias_mod = correction[b, h, i, g(j)] with correction = 0 on the own block and s_ig - log_norm_ig elsewhere, a
(B, H, T, n_blocks) table, key padding through the op's key mask. That path computes the scores twice, once for
log_norm (in chunks of queries, :func:`block_log_norm`, recomputed in the backward) and once inside the kernel, but
never holds T x S at once: O(T x n_blocks) tables plus one chunk.

Deviation from the paper (a contract layer cannot insert tokens into the sequence): there a landmark is an extra
token placed after every block, and its key is whatever the network computes at that token. Here the landmark key is
a content summary of the block, L_g = mean_{j in g, real} k_j + e_h, the mean of the block's (rotated) keys plus a
learned per-head landmark vector e_h (``landmark_key``, zero at init, so a landmark starts as the block's mean
logit). The grouped-softmax semantics above are exact. A block with no real key has no landmark.

Retrieval (``top_k_blocks``, paper §3.2 and ``llama_mem.py``'s ``cache_top_k``): each query keeps only the k other
blocks with the highest landmark scores s_ig (per head), and the grouped softmax runs over those and its own block.
None (default) = every block, as in training. Cost: T x S scores (the grouped softmax weighs every key); the
``"torch"`` path holds them all, the ``"flex"`` path only one chunk. Decoding keeps every key and value plus one
landmark key per completed block; ``"auto"`` runs single-token steps on the torch path (O(S) per step, where a
FlexAttention kernel compiled for each new key length would recompile at every step).

Defaults: ``block_size=50`` (the paper's block length, ``--mem_freq 50``), RoPE on q and k with base 10000 (the
official runs use rotary embeddings), no projection bias (LLaMA's attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from attnzoo.errors import unknown
from attnzoo.kernels.sparse_attention import BiasMod, BlockPattern, num_blocks, sparse_attention
from attnzoo.layers.kv_cache import KVCache
from attnzoo.layers.registry import Attention, register_attention
from attnzoo.layers.rope import RotaryEmbedding

BACKENDS = ("auto", "torch", "flex")

# Score elements (B x H x queries x padded keys) per chunk of the flex path's log-normaliser pass: 2^24, 64 MiB in
# float32, so that pass holds O(T x n_blocks) tables plus one chunk and never the T x S scores.
LOG_NORM_CHUNK_ELEMENTS = 2**24


def block_log_norm(
    q: Tensor, key_blocks: Tensor, key_real: Tensor, scale: float, *, causal: bool, q_offset: int = 0
) -> Tensor:
    """Each block's within-block log-normaliser per query: log_norm[b, h, i, g] = logsumexp_{j in g, real} s_ij.

    Computed over chunks of queries (:data:`LOG_NORM_CHUNK_ELEMENTS` scores at a time); under autograd each chunk is
    recomputed in the backward (activation checkpointing), so the T x S scores are never held, forward or backward.

    Args:
        q: (B, T, H, D) queries at positions q_offset .. q_offset + T - 1.
        key_blocks: (B, n, block_size, H, D) keys cut into blocks (the last one zero-padded).
        key_real: (B, n, block_size) bool, True = real key.
        scale: logit scale.
        causal: only blocks before a query's own block are needed; later ones are skipped (left 0).
        q_offset: position of query 0.

    Returns:
        (B, H, T, n) in float32 at least; 0 where a block has no real key or is not needed (never read there).
    """
    B, T, H, _ = q.shape
    n, size = key_blocks.shape[1], key_blocks.shape[2]
    compute = torch.promote_types(q.dtype, torch.float32)
    real = key_real[:, None, None]  # (B, 1, 1, n, size)
    chunk = max(1, LOG_NORM_CHUNK_ELEMENTS // (B * H * n * size))
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or key_blocks.requires_grad)

    def part(q_chunk: Tensor, keys: Tensor, keep: Tensor) -> Tensor:
        s = (torch.einsum("bthd,bnehd->bhtne", q_chunk, keys) * scale).to(compute)  # (B, H, C, n', size)
        has_real = keep.any(dim=-1, keepdim=True)
        return torch.logsumexp(s.masked_fill(~keep, float("-inf")).masked_fill(~has_real, 0.0), dim=-1)

    parts = []
    for start in range(0, T, chunk):
        end = min(T, start + chunk)
        # causal: query i needs blocks g < b(i) only, so the chunk needs the blocks before its last query's block
        need = min(n, (q_offset + end - 1) // size) if causal else n
        if need == 0:
            parts.append(q.new_zeros(B, H, end - start, n, dtype=compute))
            continue
        args = (q[:, start:end], key_blocks[:, :need], real[..., :need, :])
        log_norm = torch.utils.checkpoint.checkpoint(part, *args, use_reentrant=False) if needs_grad else part(*args)
        parts.append(F.pad(log_norm, (0, n - need)))  # (B, H, C, n)
    return torch.cat(parts, dim=2)


def landmark_pattern(
    selected: Tensor,
    correction: Tensor,
    kv_len: int,
    block_size: int,
    *,
    causal: bool,
    q_offset: int = 0,
    routed: bool = False,
) -> tuple[BlockPattern, BiasMod]:
    """The grouped softmax as a block-sparse pattern and a logit bias for :func:`attnzoo.kernels.sparse_attention`.

    Queries q_idx = 0 .. T - 1 sit at positions i = q_offset + q_idx; keys j = 0 .. kv_len - 1 fall in landmark
    blocks g(j) = j // block_size:

        mask(i, j) = own(i, j) or selected[b, h, q_idx, g(j)]     own(i, j): g(j) == g(i) [and j <= i when causal]
        bias(i, j) = correction[b, h, q_idx, g(j)]                0 on the own block, s_ig - log_norm_ig elsewhere

    so softmax(s_ij + bias(i, j)) over the mask (and the real keys: the op's ``key_mask``) is the grouped softmax.
    Pattern blocks are the landmark blocks: query block r lists every key block (causal: blocks 0 .. its own; a
    query block spans two landmark blocks when q_offset is not a multiple of block_size), or with ``routed`` only its
    own blocks and the union of its queries' selected blocks, per sequence and head (B, H, num_q_blocks, m).

    Args:
        selected: (B, H, T, n) bool, n = ceil(kv_len / block_size): block g is another block of query q_idx that it
            reaches through its landmark (every earlier / other block with a landmark, or the top-k of them).
        correction: (B, H, T, n) float logit correction, 0 on the query's own block.
        kv_len: number of keys S.
        block_size: tokens per landmark block.
        causal: the own block is causal and no later block is listed.
        q_offset: position of query 0 (a cached call: the cache length before it).
        routed: ``selected`` is a top-k choice; list only the chosen blocks instead of every block.

    Returns:
        (pattern, bias_mod).
    """
    B, H, T, n = selected.shape
    size, device = block_size, selected.device
    nqb = num_blocks(T, size)
    rows = torch.arange(nqb, device=device)
    first_own = (q_offset + rows * size) // size  # (nqb,) landmark block of each query block's first query
    last_own = (q_offset + torch.clamp((rows + 1) * size, max=T) - 1) // size  # ... and of its last query
    block = torch.arange(n, device=device)
    if routed:
        chosen = F.pad(selected, (0, 0, 0, nqb * size - T)).view(B, H, nqb, size, n).any(dim=3)  # (B, H, nqb, n)
        listed = chosen | ((block >= first_own[:, None]) & (block <= last_own[:, None]))
        count = listed.sum(dim=-1)  # (B, H, nqb)
        order = torch.sort((~listed).to(torch.int8), dim=-1, stable=True).indices  # listed blocks first, in order
        m = int(count.max())
        kv_blocks = torch.where(torch.arange(m, device=device) < count[..., None], order[..., :m], -1)
    elif causal:
        kv_blocks = torch.where(block <= last_own[:, None], block, -1)  # (nqb, n): the lower triangle
    else:
        kv_blocks = block.repeat(nqb, 1)  # (nqb, n): every block

    # the op's lowerings also call the mods on padded query/key slots (their outputs are discarded): clamp the
    # table indices into range
    def table_index(q_idx: Tensor, kv_idx: Tensor) -> tuple[Tensor, Tensor]:
        return torch.clamp(q_idx, max=T - 1), torch.clamp(kv_idx // size, max=n - 1)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        position = q_idx + q_offset
        own = kv_idx // size == position // size
        if causal:
            own = own & (kv_idx <= position)
        row, g = table_index(q_idx, kv_idx)
        return own | selected[b, h, row, g]

    def bias_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        row, g = table_index(q_idx, kv_idx)
        return correction[b, h, row, g]

    return BlockPattern(mask_mod, T, kv_len, size, kv_blocks), bias_mod


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
        backend: str = "auto",
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
            backend: the grouped softmax: ``"auto"`` (``"flex"`` for CUDA inputs, except single-token decode steps,
                else ``"torch"``), ``"torch"`` (the direct block einsum, T x S scores; the CPU training path) or
                ``"flex"`` (:func:`landmark_pattern` through :func:`attnzoo.kernels.sparse_attention`'s FlexAttention;
                forward only off CUDA, for testing the lowering).
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        if backend not in BACKENDS:
            raise ValueError(f"{self.name}: " + unknown("backend", backend, BACKENDS))
        self.backend = backend
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

    def select_blocks(
        self, q: Tensor, landmark_keys: Tensor, landmark_ok: Tensor, n: int, q_offset: int = 0
    ) -> tuple[Tensor, Tensor]:
        """Landmark scores s_ig (B, H, T, n), float32 at least, and the other blocks each query reaches through its
        landmark: (B, 1, T, n) bool (every earlier / other block that has a landmark), or (B, H, T, n) with
        ``top_k_blocks`` (the k highest s_ig among those). q (B, T, H, D) at positions q_offset ..; landmark keys
        (B, n_L, H, D) of the first n_L <= n blocks."""
        T, size = q.shape[1], self.block_size
        missing = n - landmark_keys.shape[1]  # a cache holds no landmark for the current, partial block
        if missing:
            landmark_keys = F.pad(landmark_keys, (0, 0, 0, 0, 0, missing))
            landmark_ok = F.pad(landmark_ok, (0, missing))
        scale = q.shape[-1] ** -0.5
        compute = torch.promote_types(q.dtype, torch.float32)
        s_landmark = (torch.einsum("bthd,bnhd->bhtn", q, landmark_keys) * scale).to(compute)  # (B, H, T, n)
        q_block = torch.div(torch.arange(q_offset, q_offset + T, device=q.device), size, rounding_mode="floor")
        block = torch.arange(n, device=q.device)[None, :]  # (1, n)
        other = block < q_block[:, None] if self.causal else block != q_block[:, None]  # (T, n)
        selected = other & landmark_ok[:, None, None, :]  # (B, 1, T, n)
        if self.top_k_blocks is not None and self.top_k_blocks < n:
            ranked = s_landmark.masked_fill(~selected, float("-inf"))
            top = ranked.topk(self.top_k_blocks, dim=-1).indices
            selected = selected & torch.zeros_like(ranked, dtype=torch.bool).scatter_(-1, top, True)  # (B, H, T, n)
        return s_landmark, selected

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
        scale = D**-0.5
        compute = torch.promote_types(q.dtype, torch.float32)  # softmax statistics in float32 at least
        s = (torch.einsum("bthd,bnehd->bhtne", q, kb) * scale).to(compute)  # (B, H, T, n, size)
        s_landmark, selected = self.select_blocks(q, landmark_keys, landmark_ok, n, q_offset)

        q_pos = torch.arange(q_offset, q_offset + T, device=q.device)
        q_block = torch.div(q_pos, size, rounding_mode="floor")[:, None]  # (T, 1)
        block = torch.arange(n, device=q.device)[None, :]  # (1, n)
        own = (block == q_block)[:, :, None] & real  # (B, 1, T, n, size)
        if self.causal:
            k_pos = torch.arange(n * size, device=q.device).view(1, n, size)
            own = own & (k_pos <= q_pos[:, None, None])

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

    def block_pattern(
        self,
        q: Tensor,
        k: Tensor,
        landmark_keys: Tensor,
        landmark_ok: Tensor,
        key_mask: Tensor | None,
        q_offset: int = 0,
    ) -> tuple[BlockPattern, BiasMod]:
        """The grouped softmax of q (B, T, H, D) at positions q_offset .. over k (B, S, H, D) as
        :func:`landmark_pattern`'s pattern and bias (the landmark scores, the selection and the chunked log_norm)."""
        B, T, H, D = q.shape
        S, size = k.shape[1], self.block_size
        n = num_blocks(S, size)
        pad = n * size - S
        real = torch.ones(B, S, dtype=torch.bool, device=q.device) if key_mask is None else key_mask
        key_real = F.pad(real, (0, pad)).view(B, n, size)
        key_blocks = F.pad(k, (0, 0, 0, 0, 0, pad)).view(B, n, size, H, D)
        s_landmark, selected = self.select_blocks(q, landmark_keys, landmark_ok, n, q_offset)
        log_norm = block_log_norm(q, key_blocks, key_real, D**-0.5, causal=self.causal, q_offset=q_offset)
        q_block = torch.div(torch.arange(q_offset, q_offset + T, device=q.device), size, rounding_mode="floor")
        own_block = q_block[:, None] == torch.arange(n, device=q.device)  # (T, n)
        correction = torch.where(own_block, 0.0, s_landmark - log_norm)  # (B, H, T, n)
        routed = self.top_k_blocks is not None and self.top_k_blocks < n
        return landmark_pattern(
            selected.expand(B, H, T, n).contiguous(),
            correction,
            S,
            size,
            causal=self.causal,
            q_offset=q_offset,
            routed=routed,
        )

    def sparse_grouped_attention(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        landmark_keys: Tensor,
        landmark_ok: Tensor,
        key_mask: Tensor | None,
        q_offset: int = 0,
        backend: str = "flex",
    ) -> Tensor:
        """:meth:`grouped_attention` (same arguments and result) through :func:`attnzoo.kernels.sparse_attention`
        with ``backend`` (``"flex"`` in the layer; ``"torch"`` or ``"reference"`` check the pattern in tests)."""
        pattern, bias_mod = self.block_pattern(q, k, landmark_keys, landmark_ok, key_mask, q_offset)
        scale = q.shape[-1] ** -0.5
        return sparse_attention(q, k, v, pattern, key_mask=key_mask, bias_mod=bias_mod, scale=scale, backend=backend)

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
        # single-token decode steps stay on the einsum (O(S) each; see the module docstring)
        use_flex = self.backend == "flex" or (self.backend == "auto" and x.is_cuda and (cache is None or T > 1))
        attend = self.sparse_grouped_attention if use_flex else self.grouped_attention
        if cache is None:
            landmark_keys, landmark_ok = self.landmarks(k, padding_mask)
            o = attend(q, k, v, landmark_keys, landmark_ok, padding_mask)
        else:
            k, v, key_mask = cache.update(k, v, padding_mask)
            landmark_keys, landmark_ok = self._update_landmarks(cache, k, key_mask)
            o = attend(q, k, v, landmark_keys, landmark_ok, key_mask, offset)
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
        return (
            f"{super().extra_repr()}, block_size={self.block_size}, top_k_blocks={self.top_k_blocks}, "
            f"backend={self.backend!r}"
        )
