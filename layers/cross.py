"""Bottom-right alignment of ``causal_cross``: a query stream of length T reading a context stream of length S.

FlashAttention's convention for a causal mask with seqlen_q != seqlen_k (flash-attn README, "causal"): the mask is
aligned to the bottom-right corner of the T x S score matrix, so

    query i (0-based, of T) sees context positions j <= i + S - T.

The last query sees the whole context. With S > T every query also sees the first S - T context positions; with S < T
the first T - S queries see nothing and output zeros (the "no visible key" rule of :func:`attnzoo.layers.sdpa.sdpa`).
With S == T this is the plain causal mask of two aligned streams.

Streaming (a cache): each call passes the next T query positions and the next S context positions, and the alignment is
bottom-right on the totals seen so far. The first new query then sits at context position ``context_seen + S - T``
(:func:`aligned_start`), which depends only on how much context the cache holds, not on how many queries it has seen.
A call must not hide context from a query that an earlier query already saw (a recurrent state cannot forget it): the
first new query has to see every earlier context position, i.e. T <= S + 1 whenever the cache holds context.
Prefill-then-step equals one full forward whenever each call adds as many query as context positions.

Linear-attention layers (a state sum_j phi(k_j)^T v_j with no decay) get the alignment from
:func:`aligned_causal_linear_attn`: the S - T leading context positions that every query sees are folded into the
state by a non-causal pass, and with S < T the queries that see nothing are not computed at all (or, with a state to
read, meet zero keys, which add nothing to such a state). Both forms cost O(max(S, T)) and reuse the equal-length
causal kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnzoo.kernels import linear_attn


def aligned_start(T: int, S: int, *, context_seen: int = 0, name: str = "causal_cross") -> int:
    """The context position the first of T new queries is aligned to, given S new context positions.

    Query t of this call sees context positions j <= start + t (absolute, counting the ``context_seen`` positions of
    earlier calls). ``start`` is negative when the first queries see nothing.

    Args:
        T: query positions in this call (>= 1).
        S: context positions in this call (>= 1).
        context_seen: context positions consumed by earlier calls (the cache's).
        name: layer name for the error message.

    Raises:
        ValueError: the call would hide earlier context from its first query (T > S + 1 with a non-empty cache).
    """
    start = context_seen + S - T
    if context_seen > 0 and start < context_seen - 1:
        raise ValueError(
            f"{name}: causal_cross aligns query and context bottom-right on the totals seen so far (query i sees "
            f"context j <= i + S - T), so this call's first query would see only context positions <= {start}, but "
            f"earlier queries already saw all {context_seen} cached ones. Pass at most one more query than context "
            f"position per call (got T={T}, S={S}), e.g. split the call into single-query steps."
        )
    return start


def query_start(T: int, S: int, offset: int, *, causal: bool, cross: bool, name: str) -> int:
    """Absolute position of this call's first query: ``offset`` (the first new key's, i.e. the cache's length) in
    self-attention and noncausal_cross, the bottom-right aligned context position (:func:`aligned_start`) in
    causal_cross. The position RoPE rotates the first query by, and the causal mask's query offset."""
    return aligned_start(T, S, context_seen=offset, name=name) if causal and cross else offset


def rotate_from(rope: Callable[[Tensor, int], Tensor], x: Tensor, start: int) -> Tensor:
    """``rope(x, start)`` for positions ``start .. start + T - 1`` where ``start`` may be negative.

    Positions below 0 only occur for queries aligned before the first context position; they see no key and output
    zeros, so their rotation is irrelevant and they are left as they are.
    """
    if start >= 0:
        return rope(x, start)
    skip = min(-start, x.shape[1])
    if skip == x.shape[1]:
        return x
    return torch.cat([x[:, :skip], rope(x[:, skip:], 0)], dim=1)


def aligned_causal_linear_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    attn: Callable[..., tuple[Tensor, Tensor | None]] | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """Causal linear attention of T queries over S keys, aligned bottom-right (query t sees keys j <= t + S - T).

    Args:
        q: (B, T, H, K) feature-mapped queries.
        k: (B, S, H, K) feature-mapped keys; a zero key must add nothing to the state (true of linear attention's
            sum_j k_j^T v_j; not of a kernel with a decay).
        v: (B, S, H, V) values.
        initial_state: the state of earlier calls, seen by every query here (needs T <= S + 1, see
            :func:`aligned_start`).
        output_final_state: also return the state after the last key.
        attn: the kernel, with :func:`attnzoo.kernels.linear_attn`'s keywords (``causal``, ``initial_state``,
            ``output_final_state``); default ``linear_attn``.
        **kwargs: passed to ``attn`` (``eps``, ``normalize``, ...).

    Returns:
        ``(o, state)`` as ``attn`` returns them: o (B, T, H, V'), zeros for the queries that see no key; the state
        after all S keys if ``output_final_state``, else None.
    """
    attn = linear_attn if attn is None else attn
    T, S = q.shape[1], k.shape[1]
    if S > T:
        prefix = S - T
        # every query sees the first S - T keys: a non-causal pass sums them into the state (its one output is unused)
        _, initial_state = attn(
            q[:, :1],
            k[:, :prefix],
            v[:, :prefix],
            causal=False,
            initial_state=initial_state,
            output_final_state=True,
            **kwargs,
        )
        k, v = k[:, prefix:], v[:, prefix:]
    elif S < T and initial_state is not None:
        # the first T - S queries see only the state: zero keys in front add nothing to it and keep one-to-one pairs
        pad = (0, 0, 0, 0, T - S, 0)
        k, v = F.pad(k, pad), F.pad(v, pad)
    elif S < T:
        # without a state the first T - S queries see nothing: zeros, and the rest pair one-to-one with the keys
        o, state = attn(q[:, T - S :], k, v, causal=True, output_final_state=output_final_state, **kwargs)
        return F.pad(o, (0, 0, 0, 0, T - S, 0)), state
    return attn(q, k, v, causal=True, initial_state=initial_state, output_final_state=output_final_state, **kwargs)
