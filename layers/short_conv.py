"""Short causal depthwise convolution, the token-shift used by H3, Mamba, Mamba-2 and FLA's ``ShortConvolution``.

    y_t[c] = act( sum_{w=0}^{W-1} weight[c, 0, w] * x_{t - W + 1 + w}[c] + bias[c] )

with x_{<0} taken from a carried ``state`` (zeros at the start of a sequence), so a sequence can be fed in pieces
(prefill, then single tokens) and gives exactly the result of one call on the whole sequence. The last tap
(``w = W - 1``) multiplies the current token, as in mamba_ssm's ``nn.Conv1d(padding=W-1)`` followed by truncation.
It subclasses ``nn.Conv1d`` so its parameters are ``weight`` (C, 1, W) and ``bias`` (C,), the names of mamba_ssm's
``conv1d`` and FLA's ``q_conv1d``/``k_conv1d``/``v_conv1d``, and checkpoints load without renaming.

Padding: zero the input at padded positions before the call (the caller's job, since the caller knows the mask); a
zero input contributes nothing to later outputs. ``reverse=True`` runs the mirrored (anti-causal) convolution used by
the backward scan of bidirectional layers: ``flip(conv(flip(x)))``.

Speed. The convolution is one multiply-add per tap on channel-last slices (depthwise ``F.conv1d`` is slower on a
CPU, seconds in float64, and an einsum over unfolded windows becomes per-channel GEMMs with one column), with a
hand-written backward (``_CausalDepthwiseConv``). Its dozen elementwise passes run tile by tile, on (sequences,
positions) tiles of about ``TILE_ELEMENTS`` numbers that stay in the CPU cache: over whole tensors those passes were
bound by memory bandwidth, and the autograd graph of the same ops added a zero-filled input-sized buffer per tap.
Measured fwd + bwd side by side with the autograd version, C = 192-768: 2.2-3.3x on 1 thread (B=64, T=64-256 and
B=1, T=1024-8192), 1.3-3.1x on 2 threads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.errors import unknown
from attnzoo.kernels.numerics import into

_ACTIVATIONS = ("silu", "swish", "identity")
# numbers per (sequences, positions) tile: a few tensors of this size stay in the cache (2^19 measured best or
# within noise of it among 2^16 .. 2^21, on 1 and 2 threads; smaller tiles lose to per-op overhead on 2 threads)
TILE_ELEMENTS = 2**19


def _tiles(B: int, T: int, C: int) -> list[tuple[slice, slice]]:
    """(sequences, positions) tiles of about TILE_ELEMENTS numbers: whole sequences when one fits, else runs of
    positions within one sequence."""
    if T * C <= TILE_ELEMENTS:
        step = max(1, TILE_ELEMENTS // (T * C))
        return [(slice(b, b + step), slice(0, T)) for b in range(0, B, step)]
    rows = max(1, TILE_ELEMENTS // C)
    return [(slice(b, b + 1), slice(t, t + rows)) for b in range(B) for t in range(0, T, rows)]


class _CausalDepthwiseConv(torch.autograd.Function):
    """act(bias + sum_w full[:, t + w] * weight[:, w]) over full = [state; x] (B, W - 1 + T, C), tile by tile.

    Backward, with g = dL/d(pre-activation): d full[:, t + w] += g_t * weight[:, w] (the last tap first, as a plain
    write, so the buffer needs no zero fill beyond the W - 1 state rows), d weight[:, w] = sum over (b, t) of
    g_t full[:, t + w], d bias = sum g; dx and d state are the two row ranges of d full.
    """

    @staticmethod
    def forward(ctx, full: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
        B, rows, C = full.shape
        W = weight.shape[1]
        T = rows - (W - 1)
        taps = weight.t().contiguous()  # (W, C): each tap's C weights contiguous, like the channel-last rows
        pre = full.new_empty(B, T, C)
        # the backward needs the pre-activation; without gradients the activation overwrites it
        keep_pre = silu and any(ctx.needs_input_grad[:3])
        out = full.new_empty(B, T, C) if keep_pre else pre
        for seqs, pos in _tiles(B, T, C):
            tile = pre[seqs, pos]
            window = full[seqs, pos.start : pos.stop + W - 1]  # the tile's positions and the W - 1 before them
            n = tile.shape[1]
            if bias is None:
                into(tile, torch.mul, window[:, :n], taps[0])
            else:
                into(tile, torch.addcmul, bias, window[:, :n], taps[0])
            for w in range(1, W):
                tile.addcmul_(window[:, w : w + n], taps[w])
            if silu and torch.compiler.is_compiling():  # dynamo traces no out= into a strided tile
                out[seqs, pos] = F.silu(tile)
            elif silu:
                torch.ops.aten.silu.out(tile, out=out[seqs, pos])  # in place when out is pre
        ctx.save_for_backward(full, taps, pre if keep_pre else None)
        ctx.has_bias, ctx.silu = bias is not None, silu
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        full, taps, pre = ctx.saved_tensors
        B, rows, C = full.shape
        W = taps.shape[0]
        T = rows - (W - 1)
        grad_out = grad_out.contiguous()
        grad_full = full.new_empty(B, rows, C)
        grad_full[:, : W - 1].zero_()  # the state rows; every later row is first written by the last tap
        tiles = _tiles(B, T, C)
        grad_taps = taps.new_empty(len(tiles), W, C) if ctx.needs_input_grad[1] else None
        grad_bias = taps.new_empty(len(tiles), C) if ctx.has_bias and ctx.needs_input_grad[2] else None
        # one scratch buffer per call for g and for products, sized to the first tile (no later one is larger)
        scratch = full.new_empty(2, grad_out[tiles[0]].numel())
        for i, (seqs, pos) in enumerate(tiles):
            g_out = grad_out[seqs, pos]
            shape = g_out.shape
            if ctx.silu:
                g = scratch[0, : g_out.numel()].view(shape)
                torch.ops.aten.silu_backward.grad_input(g_out, pre[seqs, pos], grad_input=g)
            else:
                g = g_out
            product = scratch[1, : g.numel()].view(shape)
            n = shape[1]
            window = full[seqs, pos.start : pos.stop + W - 1]
            grad_window = grad_full[seqs, pos.start : pos.stop + W - 1]
            for w in range(W - 1, -1, -1):
                if w == W - 1:  # rows not touched by an earlier tile
                    into(grad_window[:, w : w + n], torch.mul, g, taps[w])
                else:
                    grad_window[:, w : w + n].addcmul_(g, taps[w])
                if grad_taps is not None:
                    torch.sum(torch.mul(g, window[:, w : w + n], out=product), (0, 1), out=grad_taps[i, w])
            if grad_bias is not None:
                torch.sum(g, (0, 1), out=grad_bias[i])
        grad_weight = None if grad_taps is None else grad_taps.sum(0).t()
        return grad_full, grad_weight, None if grad_bias is None else grad_bias.sum(0), None


class ShortConvolution(nn.Conv1d):
    """Depthwise causal convolution over (B, T, C) with a carried state of the last ``kernel_size - 1`` inputs."""

    def __init__(
        self, channels: int, kernel_size: int = 4, *, bias: bool = False, activation: str | None = "silu"
    ) -> None:
        """
        Args:
            channels: C, the number of channels (one filter per channel).
            kernel_size: W, the window including the current token (Mamba/FLA default 4).
            bias: a per-channel bias (FLA default False; mamba_ssm default True).
            activation: ``silu`` (alias ``swish``), or ``None``/``identity`` for none.
        """
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"ShortConvolution: kernel_size must be a positive integer; got {kernel_size!r}.")
        act = "identity" if activation is None else activation
        if act not in _ACTIVATIONS:
            raise ValueError("ShortConvolution: " + unknown("activation", act, _ACTIVATIONS))
        super().__init__(channels, channels, kernel_size, groups=channels, bias=bias, padding=0)
        self.activation = act

    @property
    def state_width(self) -> int:
        """Inputs remembered between calls: ``kernel_size - 1``."""
        return self.kernel_size[0] - 1

    def forward(self, x: Tensor, *, state: Tensor | None = None, reverse: bool = False) -> tuple[Tensor, Tensor]:
        """
        Args:
            x: (B, T, C) inputs (zeroed by the caller at padded positions).
            state: (B, C, W - 1) the inputs just before ``x``; None = zeros (a sequence start).
            reverse: run anti-causally (``flip(conv(flip(x)))``), for the backward scan of a bidirectional layer;
                no state then.

        Returns:
            ``(y, new_state)``: y (B, T, C) and the last W - 1 inputs (B, C, W - 1) to pass to the next call.
        """
        if reverse:
            if state is not None:
                raise ValueError("ShortConvolution: reverse=True runs over a whole sequence; pass no state.")
            y, new_state = self.forward(x.flip(1))
            return y.flip(1), new_state
        B, _, C = x.shape
        width = self.state_width
        if state is None:
            state = x.new_zeros(B, C, width)
        elif tuple(state.shape) != (B, C, width):
            raise ValueError(
                f"ShortConvolution: state must have shape (B, C, W-1) = {(B, C, width)}; got {tuple(state.shape)}."
            )
        full = torch.cat([state.transpose(1, 2).to(x.dtype), x], dim=1)  # (B, W - 1 + T, C)
        weight = self.weight[:, 0].to(x.dtype)  # (C, W)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = _CausalDepthwiseConv.apply(full, weight, bias, self.activation != "identity")
        return y, full[:, full.shape[1] - width :].transpose(1, 2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"
