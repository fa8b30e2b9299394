"""Bidirectional form of a causal linear recurrence: a forward scan plus a scan over the reversed sequence, summed.

For a gated recurrence  S_t = diag(a_t) S_{t-1} + k_t^T v_t,  o_t = q_t S_t  the combined output is

    o_t = sum_{s <= t} q_t diag(prod_{r=s+1}^{t} a_r) k_s^T v_s          (forward scan)
        + sum_{s >= t} q_t diag(prod_{r=t}^{s-1}   a_r) k_s^T v_s          (scan over the reversed sequence)

so position t sees every position, with the decay accumulated over the gates strictly between t and s plus the
query's own gate (the mirror image of the causal form). The diagonal term s = t is counted once in each direction,
as in Vim's sum of its two scans (Zhu et al. 2024, https://arxiv.org/abs/2401.09417: ``out + out_b.flip``). ViG
(Liao et al. 2024, https://arxiv.org/abs/2405.18425, BiGLA) also scans both ways with shared projections but learns a
forget gate per direction; here every projection, the gate included, is shared, so the bidirectional layer has exactly
the causal layer's parameters. A layer with a short convolution runs it causally for the forward scan and
anti-causally (same weights, mirrored) for the backward one.

A padded position carries k = v = 0 and log-decay 0, so it neither writes nor decays the state in either direction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor


def scan_both_ways(
    scan: Callable[..., tuple[Tensor, Any]],
    forward_inputs: Sequence[Tensor],
    backward_inputs: Sequence[Tensor] | None = None,
    **kwargs: Any,
) -> Tensor:
    """``scan(*forward_inputs)[0] + flip(scan(*flip(backward_inputs))[0])`` along time (dim 1).

    Args:
        scan: a kernel with the ``attnzoo.kernels.gla`` calling convention, ``scan(q, k, v, g, **kwargs) -> (o, _)``,
            all tensors (B, T, ...) with time in dim 1.
        forward_inputs: the tensors of the forward scan, in time order.
        backward_inputs: the tensors of the backward scan, also in time order (they are flipped here); None = the
            forward ones (no short convolution, so both directions see the same features).
        **kwargs: passed to both scans (scale, chunk_size, backend); never an initial state.

    Returns:
        o: (B, T, ...) the sum of both directions, in time order.
    """
    backward_inputs = forward_inputs if backward_inputs is None else backward_inputs
    o_forward, _ = scan(*forward_inputs, **kwargs)
    o_backward, _ = scan(*(t.flip(1) for t in backward_inputs), **kwargs)
    return o_forward + o_backward.flip(1)
