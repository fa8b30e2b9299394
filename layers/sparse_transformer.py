"""Sparse Transformer attention — Child et al. 2019, "Generating Long Sequences with Sparse Transformers",
https://arxiv.org/abs/1904.10509 (reference semantics: openai/sparse_attention ``attention.py``, attn_mode ``strided``
and ``fixed``; DeepSpeed's ``StridedSparsityConfig`` / ``FixedSparsityConfig``).

    o_i = softmax_{j in A_i}(q_i k_j^T / sqrt(D)) v_j,      A_i = local_i  U  global_i     (j <= i when causal)

with the stride l = ``stride`` and c = ``summary_size``:

    strided:  local_i  = {j : |i - j| < l}             global_i = {j : (i - j) mod l == 0}
    fixed:    local_i  = {j : floor(j / l) == floor(i / l)}    global_i = {j : j mod l >= l - c}

Patterns: causal_self (the paper's autoregressive use) and noncausal_self (the same sets without j <= i).
How the two factorised components meet (paper §4.3, ``combine``):
``merged`` (default) -- every head attends to the union in one softmax (the paper's "merged head", and the single
per-head layout DeepSpeed's sparsity configs build); ``split`` -- even heads attend to local_i, odd heads to global_i
(the paper's multi-head variant); ``local`` / ``global`` -- one component for all heads, for interleaving them across
layers (the paper's first variant): ``attention=[{name: sparse_transformer, combine: local}, {..., combine: global}]``.

Defaults: ``mode="fixed"`` and ``stride=128`` (the paper's text setting), ``summary_size=8`` (the paper: "c in
{8, 16, 32} for typical values of l in {128, 256}"), no RoPE (the paper uses learned absolute positions: pair it with
``model.positions=learned``, or turn ``rope`` on).

Cost, never a T x T mask: the full forward puts queries in blocks of l and gathers, per block, only the keys it can
see: local keys are the own block and its neighbours (T x 2l causal, T x 3l bidirectional, T x l for ``fixed``);
strided columns are the queries' own residue class mod l, reached by a (T/l, l) -> (l, T/l) reshape (T x T/l); the
fixed summary columns are gathered into one (T/l * c)-key set (T x T c / l). The two disjoint parts share one float32
softmax. The column parts are inherently T^2 / l: that is the paper's O(T sqrt T) at l ~ sqrt T. Decoding keeps every
key and value (a KV cache): the strided and summary columns reach back to the first token, so the state grows with T.
Cached calls score their T new queries against all S kept keys under the same rule (T x S, T small when decoding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.kernels.sparse_attention import BlockPattern, sparse_attention
from attnzoo.layers.kv_cache import KVCache
from attnzoo.layers.registry import Attention, register_attention
from attnzoo.layers.rope import RotaryEmbedding

MODES = ("strided", "fixed")
COMBINES = ("merged", "split", "local", "global")


def _blocks(t: Tensor, n: int, size: int) -> Tensor:
    """(B, n * size, H, D) -> (B, H, n, size, D), contiguous: batched matmuls on strided operands are slow."""
    B, _, H, D = t.shape
    return t.view(B, n, size, H, D).permute(0, 3, 1, 2, 4).contiguous()


def _shift_blocks(t: Tensor, shift: int) -> Tensor:
    """Block x of the result holds block x - shift of ``t`` (zeros / False past either end); blocks on dim 2."""
    n = t.shape[2]
    pad = [0, 0] * (t.dim() - 3)
    if shift > 0:
        return F.pad(t, [*pad, shift, 0])[:, :, :n]
    return F.pad(t, [*pad, 0, -shift])[:, :, -shift:]


@register_attention("sparse_transformer")
class SparseTransformerAttention(Attention):
    """Sparse Transformer's strided / fixed factorised attention (Child et al. 2019), exact, without a T x T mask."""

    patterns = frozenset({"causal_self", "noncausal_self"})
    pattern_note = "The strided and fixed patterns are self-attention patterns over one sequence's positions."

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        mode: str = "fixed",
        stride: int = 128,
        summary_size: int = 8,
        combine: str = "merged",
        rope: bool = False,
        rope_base: float = 10000.0,
        bias: bool = False,
    ) -> None:
        """
        Args:
            dim: model width.
            num_heads: heads; head_dim = dim // num_heads.
            causal: query i sees keys j <= i.
            cross: must be False (self-attention patterns only).
            mode: ``strided`` (local band of l + every l-th position; the paper's image setting) or ``fixed`` (own
                block of l + the last c positions of every block; the paper's text setting).
            stride: l, the band width / block length (paper: 128 for text).
            summary_size: c, the summary positions at the end of every block in ``fixed`` mode (paper: 8-32 for
                l in {128, 256}); unused by ``strided``.
            combine: ``merged`` (union per head), ``split`` (even heads local, odd heads global), ``local`` or
                ``global`` (one component, for interleaving across layers).
            rope: rotary position embedding on q and k (off: the paper uses learned absolute positions).
            rope_base: RoPE frequency base.
            bias: bias in the q/k/v/o projections.
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        if mode not in MODES:
            raise ValueError(f"sparse_transformer: mode must be one of {MODES}; got {mode!r}.")
        if combine not in COMBINES:
            raise ValueError(f"sparse_transformer: combine must be one of {COMBINES}; got {combine!r}.")
        if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
            raise ValueError(f"sparse_transformer: stride must be a positive int; got {stride!r}.")
        if mode == "fixed" and (not isinstance(summary_size, int) or not 1 <= summary_size <= stride):
            raise ValueError(
                f"sparse_transformer: summary_size (c) must be an int in [1, stride={stride}]; got {summary_size!r}."
            )
        if combine == "split" and num_heads < 2:
            raise ValueError("sparse_transformer: combine='split' needs num_heads >= 2 (one head per component).")
        self.mode = mode
        self.stride = stride
        self.summary_size = summary_size
        self.combine = combine
        heads = torch.arange(num_heads)
        # which heads attend to which component; buffers so they follow .to(device) and torch.compile sees tensors
        local_heads = {"merged": True, "split": heads % 2 == 0, "local": True, "global": False}[combine]
        global_heads = {"merged": True, "split": heads % 2 == 1, "local": False, "global": True}[combine]
        self.register_buffer("local_heads", torch.as_tensor(local_heads).expand(num_heads).clone(), persistent=False)
        self.register_buffer("global_heads", torch.as_tensor(global_heads).expand(num_heads).clone(), persistent=False)
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)
        self.rope = RotaryEmbedding(self.head_dim, rope_base) if rope else None

    # ------------------------------------------------------------------------------------------------------------
    # the pattern, written once

    def mask_mod(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        """True where query position ``q_idx`` of head ``h`` may attend key position ``kv_idx`` (FlexAttention's
        ``mask_mod`` signature; broadcasting tensors). The oracle and the decoding path use it."""
        L = self.stride
        diff = q_idx - kv_idx
        if self.mode == "strided":
            local = diff.abs() < L
            column = diff % L == 0
        else:
            local = torch.div(q_idx, L, rounding_mode="floor") == torch.div(kv_idx, L, rounding_mode="floor")
            column = kv_idx % L >= L - self.summary_size
        allowed = (local & self.local_heads[h]) | (column & self.global_heads[h])
        return allowed & (diff >= 0) if self.causal else allowed

    # ------------------------------------------------------------------------------------------------------------
    # lowerings

    def _attend_blocked(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
        """Full-sequence attention (no cache): queries in blocks of L, each scoring only the keys it can see."""
        B, T, H, D = q.shape
        L, causal = self.stride, self.causal
        n = -(-T // L)
        pad = n * L - T
        real = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_mask is None else key_mask
        if pad:  # padded keys are masked out; padded queries are dropped at the end
            q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
            real = F.pad(real, (0, pad))
        qb, kb, vb = _blocks(q, n, L), _blocks(k, n, L), _blocks(v, n, L)  # (B, H, n, L, D)
        realb = real.view(B, 1, n, 1, L)  # (B, 1, n, 1, L): key u of block x
        a = torch.arange(L, device=q.device)
        x = torch.arange(n, device=q.device)
        local_heads = self.local_heads.view(1, H, 1, 1, 1)
        global_heads = self.global_heads.view(1, H, 1, 1, 1)
        scale = D**-0.5

        # local part: keys of the own block, and for the strided band the neighbouring block(s)
        if self.mode == "strided":
            shifts = (1, 0) if causal else (1, 0, -1)
            k_loc = torch.cat([_shift_blocks(kb, s) for s in shifts], dim=3)  # (B, H, n, W, D)
            v_loc = torch.cat([_shift_blocks(vb, s) for s in shifts], dim=3)
            real_loc = torch.cat([_shift_blocks(realb, s) for s in shifts], dim=4)  # (B, 1, n, 1, W)
            u = torch.arange(len(shifts) * L, device=q.device)
            lag = (L + a)[:, None] - u[None, :]  # (L, W): i - j for query a and window key u
            band = (lag >= 0) & (lag < L) if causal else lag.abs() < L
            band_column = lag == 0  # the only strided column inside the band: the query itself
        else:
            k_loc, v_loc, real_loc = kb, vb, realb
            band = a[None, :] <= a[:, None] if causal else torch.ones(L, L, dtype=torch.bool, device=q.device)
            band_column = (a >= L - self.summary_size)[None, :]  # the own block's summary columns
        s_loc = (qb * scale) @ k_loc.transpose(-1, -2)  # (B, H, n, L, W)
        # a head without the local component still sees the global columns that fall inside this part
        ok_loc = band & real_loc & (local_heads | (band_column & global_heads))

        # global part, disjoint from the local one: columns outside the query's own band / block
        other = x[None, :] < x[:, None] if causal else x[None, :] != x[:, None]  # (n, n): key block x' vs query x
        if self.mode == "strided":
            # residue reshape: key (x', r) shares query (x, r)'s residue mod L; x' != x is exactly |i - j| >= L
            q_res, k_res = (t.transpose(2, 3).contiguous() for t in (qb, kb))  # (B, H, L, n, D)
            s_glo = ((q_res * scale) @ k_res.transpose(-1, -2)).transpose(2, 3)  # (B, H, n, L, n): [x, r, x']
            real_glo = real.view(B, n, L).transpose(1, 2)[:, None, None]  # (B, 1, 1, L, n)
            ok_glo = other[None, None, :, None, :] & real_glo & global_heads
            v_glo = vb.transpose(2, 3).contiguous()  # (B, H, L, n, D)
        else:
            c = self.summary_size
            k_sum = kb[:, :, :, L - c :].reshape(B, H, n * c, D)  # (B, H, n c, D): every block's summary keys
            v_glo = vb[:, :, :, L - c :].reshape(B, H, n * c, D)
            s_glo = (qb * scale).flatten(2, 3) @ k_sum.transpose(-1, -2)  # (B, H, n L, n c)
            s_glo = s_glo.view(B, H, n, L, n * c)
            real_glo = realb[..., L - c :].reshape(B, 1, 1, 1, n * c)
            ok_glo = other.repeat_interleave(c, dim=1)[None, None, :, None, :] & real_glo & global_heads

        # one softmax over both parts, by hand so every tensor (and gradient) stays contiguous for the matmuls;
        # statistics in float32 at least; a query with no visible key gets zero weights, hence a zero output
        compute = torch.promote_types(s_loc.dtype, torch.float32)
        s_loc = s_loc.to(compute).masked_fill(~ok_loc, float("-inf"))
        s_glo = s_glo.to(compute).masked_fill(~ok_glo, float("-inf"))
        with torch.no_grad():  # the shift only guards exp against overflow: softmax does not depend on it
            row_max = torch.maximum(s_loc.amax(dim=-1, keepdim=True), s_glo.amax(dim=-1, keepdim=True))
            row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
        e_loc, e_glo = torch.exp(s_loc - row_max), torch.exp(s_glo - row_max)
        total = e_loc.sum(dim=-1, keepdim=True) + e_glo.sum(dim=-1, keepdim=True)
        total = torch.where(total > 0, total, 1.0)
        p_loc, p_glo = (e_loc / total).to(v.dtype), (e_glo / total).to(v.dtype)
        o = p_loc @ v_loc  # (B, H, n, L, D)
        if self.mode == "strided":
            o = o + (p_glo.transpose(2, 3) @ v_glo).transpose(2, 3)  # (B, H, L, n, D) -> (B, H, n, L, D)
        else:
            o = o + (p_glo.flatten(2, 3) @ v_glo).view(B, H, n, L, D)
        return o.permute(0, 2, 3, 1, 4).reshape(B, n * L, H, D)[:, :T]

    def block_pattern(self, seq_len: int, device: torch.device | str | None = None) -> BlockPattern:
        """The pattern for :func:`attnzoo.kernels.sparse_attention` (FlexAttention on CUDA), blocks of l: the column
        components reach every earlier block (every block, bidirectional), so all of them are listed."""
        n = -(-seq_len // self.stride)
        blocks = torch.arange(n, device=device)
        kv_blocks = blocks.expand(n, n).clone()
        if self.causal:
            kv_blocks = kv_blocks.masked_fill(blocks[None, :] > blocks[:, None], -1)
        return BlockPattern(self.mask_mod, seq_len, seq_len, self.stride, kv_blocks)

    def _attend_dense(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, q_offset: int) -> Tensor:
        """Cached calls: T new queries (positions q_offset ..) against all S kept keys under ``mask_mod``."""
        T, S, H = q.shape[1], k.shape[1], self.num_heads
        q_pos = torch.arange(q_offset, q_offset + T, device=q.device)
        k_pos = torch.arange(S, device=q.device)
        heads = torch.arange(H, device=q.device)
        mask = self.mask_mod(None, heads[:, None, None], q_pos[None, :, None], k_pos[None, None, :])[None]
        if key_mask is not None:
            mask = mask & key_mask[:, None, None, :]  # (B, H, T, S)
        has_key = mask.any(dim=-1, keepdim=True)
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask | ~has_key) * has_key.to(q.dtype)
        return o.transpose(1, 2)

    # ------------------------------------------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: KVCache | None = None,
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
        if cache is None and q.is_cuda:  # FlexAttention's fused kernels with the same mask function
            o = sparse_attention(q, k, v, self.block_pattern(T, q.device), key_mask=padding_mask)
        elif cache is None or offset == 0:
            o = self._attend_blocked(q, k, v, padding_mask)
            if cache is not None:
                cache.update(k, v, padding_mask)
        else:
            k, v, key_mask = cache.update(k, v, padding_mask)
            o = self._attend_dense(q, k, v, key_mask, offset)
        return self.o_proj(o.reshape(B, T, self.dim))

    def new_cache(self, batch_size: int) -> KVCache:
        if not self.causal:
            return super().new_cache(batch_size)  # raises: only causal layers decode
        return KVCache(batch_size)

    def state_size(self, seq_len: int) -> int:
        # keys and values of every position and head: the strided / summary columns reach back to position 0
        return 2 * seq_len * self.dim

    def extra_repr(self) -> str:
        extra = f", summary_size={self.summary_size}" if self.mode == "fixed" else ""
        return f"{super().extra_repr()}, mode={self.mode}, stride={self.stride}{extra}, combine={self.combine}"
