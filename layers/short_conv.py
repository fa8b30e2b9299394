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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.errors import unknown

_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "identity": lambda t: t}


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
        self._act = _ACTIVATIONS[act]

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
        B, T, C = x.shape
        width = self.state_width
        if state is None:
            state = x.new_zeros(B, C, width)
        elif tuple(state.shape) != (B, C, width):
            raise ValueError(
                f"ShortConvolution: state must have shape (B, C, W-1) = {(B, C, width)}; got {tuple(state.shape)}."
            )
        full = torch.cat([state.transpose(1, 2).to(x.dtype), x], dim=1)  # (B, W - 1 + T, C)
        # one multiply-add per tap on channel-last slices instead of F.conv1d: the same cross-correlation, but
        # depthwise F.conv1d costs ~30 ms per call on CPU whatever the size (seconds in float64), and an einsum
        # over unfolded windows turns into per-channel GEMMs with one column (measured ~0.3 s per backward)
        weight = self.weight[:, 0].to(x.dtype)  # (C, W)
        y = full[:, :T] * weight[:, 0]
        for w in range(1, self.kernel_size[0]):
            y = torch.addcmul(y, full[:, w : w + T], weight[:, w])
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return self._act(y), full[:, full.shape[1] - width :].transpose(1, 2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"
