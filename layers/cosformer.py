"""cosFormer — Qin et al. 2022, "cosFormer: Rethinking Softmax in Attention", ICLR 2022,
https://arxiv.org/abs/2202.08791

Non-negative ReLU features with a cos-based re-weighting (eq. 9-11), per head:

    s(i, j) = relu(q_i) . relu(k_j) * cos(pi/2 * (i - j) / M),          positions i, j = 1, 2, ... (1-based)
    o_i = sum_j s(i, j) v_j / max(sum_j s(i, j), eps)                   (j <= i if causal)

cos(a - b) = sin a sin b + cos a cos b splits the re-weighting into 2D features, so the sums are linear attention
(``attnzoo.kernels.linear_attn``, chunked prefix sums when causal):

    q~_i = [relu(q_i) sin t_i, relu(q_i) cos t_i],   k~_j = [relu(k_j) sin t_j, relu(k_j) cos t_j],   t_i = pi/2 * i / M

No 1/sqrt(D) scale, eps is a clamp (``clamp_min(den, 1e-6)``), q/k/v/out projections have biases: all as the official
OpenNLPLab/cosFormer ``CosformerAttention`` (parameter names ``q_proj``/``k_proj``/``v_proj``/``out_proj`` follow it,
so its state_dict loads directly).

``M`` (``max_len``): the official code uses M = max(T, S) of each call. Then the weight of a fixed pair (i, j) changes
as the sequence grows, so a causal model is not prefix-consistent and cannot decode incrementally; ``max_len=None``
gives this official behaviour for the non-causal patterns only. A fixed ``max_len`` (default 1024, the GPT backbone's
default ``max_seq_len``) makes the layer a fixed function of positions, streamable with a constant-size state; a
position beyond it raises (there the cosine would turn negative). The re-weighting is strongest when ``max_len`` is
close to the sequence length: set it to your longest sequence. Because only i - j enters the weight, shifting all
positions by a constant changes nothing, so left padding only matters through the ``max_len`` bound and (with
``max_len=None``) through M = max(T, S), which counts padded positions. noncausal_cross indexes both sequences from 1
on the same scale, a locality prior that favours i ~ j. causal_cross aligns them bottom-right (query i of T sees
context j <= i + S - T, :mod:`attnzoo.layers.cross`) and gives each query the position of the context it is aligned
to, so the weight of a pair depends on how far back it reads, as in causal_self.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.kernels import linear_attn
from attnzoo.layers.cross import aligned_causal_linear_attn, query_start
from attnzoo.layers.registry import ALL_PATTERNS, Attention, register_attention


def reweighted_features(x: Tensor, *, offset: int, M: int) -> Tensor:
    """[x sin t_i, x cos t_i] with t_i = pi/2 * i / M for positions i = offset + 1 .. offset + T.

    Args:
        x: (B, T, H, D) non-negative features relu(q) or relu(k).
        offset: positions before x[:, 0].
        M: the re-weighting horizon (``max_len``).

    Returns:
        (B, T, H, 2D), so that ``f(q)_i . f(k)_j = relu(q_i) . relu(k_j) * cos(pi/2 * (i - j) / M)``.
    """
    T = x.shape[1]
    # angles in float64 whatever the compute dtype, in the official order (pi/2 * i) / M: float64 matches it bitwise
    index = math.pi / 2 * torch.arange(offset + 1, offset + T + 1, dtype=torch.float64, device=x.device)
    angle = (index / M)[:, None, None]  # (T, 1, 1)
    return torch.cat([x * angle.sin().to(x.dtype), x * angle.cos().to(x.dtype)], dim=-1)


def cosformer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    max_len: int | None,
    eps: float = 1e-6,
    offset: int = 0,
    query_offset: int | None = None,
    padding_mask: Tensor | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    name: str = "cosformer",
) -> tuple[Tensor, Tensor | None]:
    """cosFormer attention on projected, non-negative (ReLU'd) per-head q and k (the functional core of the layer).

    Args:
        q: (B, T, H, D) query features relu(q), positions query_offset + 1 .. query_offset + T.
        k: (B, S, H, D) key features relu(k), positions offset + 1 .. offset + S.
        v: (B, S, H, V) values.
        causal: query t sees keys j <= t + S - T (bottom-right aligned; the plain causal mask when S == T); pass
            ``query_offset = offset + S - T`` so that each query takes the position of the key it is aligned to.
        max_len: M; None = max(T, S) of this call (official; non-causal only, offset 0).
        eps: clamp of the denominator.
        offset: key positions already consumed (decoding).
        query_offset: positions before q[:, 0] (default ``offset``); may be negative in causal_cross, where the
            queries before the first key see nothing.
        padding_mask: (B, S) bool, True = real key; padded keys get zero features.
        initial_state: (B, H, 2D, V + 1) from an earlier call: rows :D = sum relu(k) sin t [v, 1],
            rows D: = sum relu(k) cos t [v, 1] (S_sin, S_cos and, in the last column, z_sin, z_cos).
        output_final_state: also return the state after the last key.
        name: layer name used in error messages.

    Returns:
        ``(o, state)``: o (B, T, H, V) in float32 (float64 for float64 inputs), state or None.
    """
    T, S = q.shape[1], k.shape[1]
    query_offset = offset if query_offset is None else query_offset
    if max_len is None:
        if causal or offset:
            raise ValueError(f"{name}: max_len=None (M = max(T, S) per call) has no prefix-consistent causal form.")
        M = max(T, S)
    else:
        M = max_len
        last = max(query_offset + T, offset + S)
        if last > M:
            raise ValueError(
                f"{name}: position {last} exceeds max_len={M} (beyond it cos(pi/2 (i - j) / M) turns negative); build "
                f"the layer with max_len >= your longest sequence, or max_len=None for the official per-call M "
                f"(non-causal only)."
            )
    acc = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32
    # features, sums and the denominator in float32 even under bf16/fp16 autocast
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.to(acc), k.to(acc), v.to(acc)
        q_feat = reweighted_features(q, offset=query_offset, M=M)  # (B, T, H, 2D)
        k_feat = reweighted_features(k, offset=offset, M=M)  # (B, S, H, 2D)
        if padding_mask is not None:
            k_feat = k_feat * padding_mask[:, :, None, None]
        v_ext = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # (B, S, H, V + 1): last column -> z
        if causal:  # bottom-right aligned; with S == T the equal-length causal kernel itself
            o, state = aligned_causal_linear_attn(
                q_feat,
                k_feat,
                v_ext,
                normalize=False,
                initial_state=initial_state,
                output_final_state=output_final_state,
            )
        else:
            o, state = linear_attn(
                q_feat,
                k_feat,
                v_ext,
                causal=False,
                normalize=False,
                initial_state=initial_state,
                output_final_state=output_final_state,
            )
        # clamp, not add (official): a dead ReLU row gives 0 / eps = 0 rather than NaN
        o = o[..., :-1] / o[..., -1:].clamp_min(eps)
    return o, state


@dataclass
class CosformerCache:
    """Decoding state of one causal cosFormer layer: ``state`` (B, H, 2D, D + 1) packs S_sin, S_cos (value columns)
    and z_sin, z_cos (last column); ``position`` = key positions consumed, context positions in causal_cross (the
    next key has position ``position + 1``)."""

    batch_size: int
    state: Tensor | None = None
    position: int = 0


@register_attention("cosformer")
class CosFormer(Attention):
    """cosFormer: ReLU linear attention with a cos(pi/2 (i - j) / M) locality re-weighting (linear in length)."""

    patterns = ALL_PATTERNS

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        max_len: int | None = 1024,
        eps: float = 1e-6,
        bias: bool = True,
    ) -> None:
        """
        Args:
            dim: model width.
            num_heads: heads; head_dim = dim // num_heads.
            causal: query i sees keys j <= i.
            cross: keys/values from ``context``.
            max_len: M of the re-weighting, the longest sequence the layer accepts (default 1024 = GPT's
                max_seq_len); None = the official M = max(T, S) per call (non-causal patterns only).
            eps: denominator clamp (official forward's eps=1e-6).
            bias: biases in q/k/v/out projections (official: nn.Linear defaults, True).
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        if max_len is None and causal:
            raise ValueError(
                "cosformer: max_len=None (the official M = max(T, S) of each call) changes the weight of a fixed pair "
                "(i, j) as the sequence grows, so the causal patterns would not be prefix-consistent; pass an int "
                "max_len >= your longest sequence."
            )
        if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
            raise ValueError(f"cosformer: max_len must be a positive int or None; got {max_len!r}.")
        if not eps > 0:
            raise ValueError(f"cosformer: eps must be > 0 (it clamps the denominator); got {eps!r}.")
        self.max_len = max_len
        self.eps = eps
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: CosformerCache | None = None,
    ) -> Tensor:
        self.check_inputs(x, context, padding_mask, cache)
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        source = context if self.cross else x
        S = source.shape[1]
        offset = 0 if cache is None else cache.position
        # causal_cross: each query takes the position of the context it is aligned to
        query_offset = query_start(T, S, offset, causal=self.causal, cross=self.cross, name=self.name)
        q = F.relu(self.q_proj(x)).view(B, T, H, D)  # ReLU before the head split, elementwise: same thing
        k = F.relu(self.k_proj(source)).view(B, S, H, D)
        v = self.v_proj(source).view(B, S, H, D)
        o, state = cosformer_attention(
            q,
            k,
            v,
            causal=self.causal,
            max_len=self.max_len,
            eps=self.eps,
            offset=offset,
            query_offset=query_offset,
            padding_mask=padding_mask,
            initial_state=None if cache is None else cache.state,
            output_final_state=cache is not None,
        )  # (B, T, H, D)
        if cache is not None:
            cache.state = state
            cache.position += S
        return self.out_proj(o.reshape(B, T, self.dim).to(x.dtype))

    def new_cache(self, batch_size: int) -> CosformerCache:
        if not self.causal:
            return super().new_cache(batch_size)  # raises: only causal layers decode
        return CosformerCache(batch_size)

    def state_size(self, seq_len: int) -> int:
        # S_sin, S_cos (D x D each) and z_sin, z_cos (D each) per head, whatever the length
        return self.num_heads * 2 * self.head_dim * (self.head_dim + 1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_len={self.max_len}"
