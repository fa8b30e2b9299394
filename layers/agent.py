"""Agent attention — Han et al. 2024, "Agent Attention: On the Integration of Softmax and Linear Attention",
https://arxiv.org/abs/2312.08874. Reference impl: https://github.com/LeapLabTHU/Agent-Attention
(agent_transformer/models/agent_deit.py ``AgentAttention``; agentsd/patch.py for the cross-attention form).

M agent tokens A are pooled from the queries; they first gather from the keys, then broadcast to the queries,
per head with s = D^-1/2:

    A   = AvgPool(Q)                                 (M, D)   pooled over the full channel vector, then split
    V_A = softmax(s A K^T + B_1) V                   (M, D)   agent aggregation
    O   = softmax(s Q A^T + B_2) V_A + DWC(V)        (T, D)   agent broadcast plus a depthwise conv on the values
    y   = proj(O)

i.e. a generalised linear attention of cost O(T M D) (M = ``agent_num``, 49 in the paper). Position biases (all
trunc_normal std 0.02): on a 2-D token grid (h, w), B_1[a, p] = an(a, p) + ah(a, row p) + aw(a, col p) and
B_2[p, a] = na(a, p) + ha(row p, a) + wa(col p, a), with the 7x7 ``an``/``na`` tables bilinearly resized to (h, w)
(align_corners=False) and the row/column tables linearly resized when the grid differs from the one they were built
for. The DWC is a 3x3 depthwise Conv2d on V laid out as an image. On a 1-D sequence (``grid_size=None``, the
default) the pooling is AdaptiveAvgPool1d, ``an``/``na`` are (H, M, 49) tables linearly resized to the length and
the DWC is a depthwise Conv1d (k=3).

Prefix tokens (``num_prefix_tokens``, e.g. ViT's class token) sit before the sequence/grid: they are left out of the
pooling and of the DWC, their key column in B_1 is ``ac_bias`` and their query row in B_2 is ``ca_bias`` (DeiT).
The official DeiT code always treats token 0 as a class token on a square grid; here the default is a plain 1-D
sequence (``grid_size=None, num_prefix_tokens=0``) and ``grid_size=(window, window), num_prefix_tokens=1`` is the
official behaviour (:meth:`AgentAttention.from_official` loads its state dict by a straight key copy). Padded tokens
are left out of the pooling average and the aggregation softmax, and their values are zeroed before the DWC.

noncausal_cross follows AgentSD: agents pooled from the queries, aggregation over the context, broadcast to the
queries, no position biases and no DWC (the context has no grid). There is no causal form (``pattern_note``).
Defaults: agent_num 49 and qkv_bias False (the official constructor; the DeiT models pass qkv_bias=True).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.layers.registry import Attention, register_attention
from attnzoo.layers.windows import check_grid, check_prefix

BIAS_TABLE = 7  # side of the an/na tables (official); 1-D tables have BIAS_TABLE**2 entries, the same count
BIAS_STD = 0.02  # official trunc_normal_ std of every position bias


def _resize(table: Tensor, size: int) -> Tensor:
    """Linearly resize the last dim of (N, C, L) to ``size`` (align_corners=False); identity at the native size."""
    if table.shape[-1] == size:
        return table
    return F.interpolate(table, size=size, mode="linear", align_corners=False)


def _pool_shape(agent_num: int, grid: tuple[int, int]) -> tuple[int, int]:
    """Factor ``agent_num`` = p_h * p_w with the aspect ratio closest to the grid's (7x7 for 49 agents on 14x14)."""
    pairs = [(a, agent_num // a) for a in range(1, agent_num + 1) if agent_num % a == 0]
    target = math.log(grid[0] / grid[1])
    return min(pairs, key=lambda p: abs(math.log(p[0] / p[1]) - target))


def _depthwise_conv(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Depthwise 3 (or 3x3) convolution with zero padding 1 on (B, C, L) or (B, C, h, w), as a sum of shifted copies.

    Same numbers as ``F.conv1d``/``F.conv2d(..., padding=1, groups=C)`` (cross-correlation), but torch's CPU
    depthwise convolution costs ~0.1 s per call in float32 and ~2 s in float64 on small inputs (torch 2.14), so the
    nine (or three) taps are applied directly.
    """
    if x.dim() == 3:
        L = x.shape[-1]
        padded = F.pad(x, (1, 1))
        out = sum(weight[:, 0, j, None] * padded[..., j : j + L] for j in range(3))
        return out + bias[:, None]
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1))
    out = sum(weight[:, 0, i, j, None, None] * padded[..., i : i + h, j : j + w] for i in range(3) for j in range(3))
    return out + bias[:, None, None]


def _masked_pool(x: Tensor, mask: Tensor | None, pool: nn.Module) -> Tensor:
    """Average pool (B, C, *spatial) over the real tokens only (mask (B, *spatial), True = real)."""
    if mask is None:
        return pool(x)
    weight = mask[:, None].to(x.dtype)  # (B, 1, *spatial)
    total, count = pool(x * weight), pool(weight)
    # a pooling window with no real token gives a zero agent instead of 0/0
    return torch.where(count > 0, total / count.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(total))


@register_attention("agent")
class AgentAttention(Attention):
    """Agent attention: M agents pooled from the queries aggregate from the keys, then broadcast to the queries."""

    patterns = frozenset({"noncausal_self", "noncausal_cross"})
    pattern_note = (
        "Agent attention has no causal form: the agent tokens are averages of the queries over the whole sequence "
        "and the aggregation softmax runs over all keys, so every output sees the future."
    )

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        cross: bool = False,
        agent_num: int = 49,
        grid_size: tuple[int, int] | None = None,
        num_prefix_tokens: int | None = None,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        """
        Args:
            dim: model width.
            num_heads: heads; head_dim = dim // num_heads.
            causal: must be False (see ``pattern_note``).
            cross: keys/values from ``context`` (AgentSD: no position biases, no DWC).
            agent_num: agent tokens M (49 in the paper). On a grid they are pooled to p_h x p_w = M.
            grid_size: (h, w) of the token grid (ViT patches, row-major) or None for a 1-D sequence. The row/column
                bias tables are built for this grid; assign ``layer.grid_size`` later to run on another grid.
            num_prefix_tokens: tokens before the sequence/grid (class tokens) with their own ac/ca biases; None = 0
                (the ViT sets its class tokens).
            qkv_bias: bias in the q/k/v projection (official default False; DeiT models use True).
            attn_drop: dropout on both attention maps (training only).
            proj_drop: dropout after the output projection.
        """
        super().__init__(dim, num_heads, causal=causal, cross=cross)
        label = self.name
        if not isinstance(agent_num, int) or agent_num < 1:
            raise ValueError(f"{label}: agent_num must be a positive integer; got {agent_num!r}.")
        grid_size = check_grid(label, grid_size)
        num_prefix_tokens = check_prefix(label, num_prefix_tokens)
        self.agent_num = agent_num
        self.grid_size = grid_size
        self.num_prefix_tokens = num_prefix_tokens
        self.scale = self.head_dim**-0.5
        self.attn_drop = nn.Dropout(attn_drop)
        if cross:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        H, M = num_heads, agent_num
        if grid_size is None:
            self.pool = nn.AdaptiveAvgPool1d(M)
        else:
            self.pool = nn.AdaptiveAvgPool2d(_pool_shape(M, grid_size))
        if cross:  # AgentSD: the context has no grid, so no position biases and no DWC
            return
        if grid_size is None:
            self.dwc = nn.Conv1d(dim, dim, kernel_size=3, padding=1, groups=dim)
            self.an_bias = nn.Parameter(torch.zeros(H, M, BIAS_TABLE**2))
            self.na_bias = nn.Parameter(torch.zeros(H, M, BIAS_TABLE**2))
        else:
            h, w = grid_size
            self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
            self.an_bias = nn.Parameter(torch.zeros(H, M, BIAS_TABLE, BIAS_TABLE))
            self.na_bias = nn.Parameter(torch.zeros(H, M, BIAS_TABLE, BIAS_TABLE))
            self.ah_bias = nn.Parameter(torch.zeros(1, H, M, h, 1))
            self.aw_bias = nn.Parameter(torch.zeros(1, H, M, 1, w))
            self.ha_bias = nn.Parameter(torch.zeros(1, H, h, 1, M))
            self.wa_bias = nn.Parameter(torch.zeros(1, H, 1, w, M))
        if num_prefix_tokens > 0:
            self.ac_bias = nn.Parameter(torch.zeros(1, H, M, num_prefix_tokens))
            self.ca_bias = nn.Parameter(torch.zeros(1, H, num_prefix_tokens, M))
        for name, p in self.named_parameters(recurse=False):
            if name.endswith("_bias"):
                nn.init.trunc_normal_(p, std=BIAS_STD)

    @classmethod
    def from_official(cls, state_dict: dict[str, Tensor], **init_kwargs: Any) -> AgentAttention:
        """Build from the official DeiT ``AgentAttention`` (agent_transformer/models/agent_deit.py).

        Args:
            state_dict: the official module's ``state_dict()`` (qkv, proj, dwc and the eight ``*_bias`` tables).
            **init_kwargs: the official constructor arguments: ``dim``, ``num_heads``, ``qkv_bias``, ``attn_drop``,
                ``proj_drop``, ``agent_num``, ``window`` (the grid side).

        Returns:
            A noncausal_self ``agent`` layer with ``grid_size=(window, window)`` and one prefix (class) token, in the
            state dict's dtype. Like the official code it expects x of 1 + window**2 tokens, class token first.
        """
        kwargs = dict(init_kwargs)
        dim, num_heads = kwargs.pop("dim"), kwargs.pop("num_heads", 8)
        window = kwargs.pop("window", 14)
        layer = cls(dim, num_heads, grid_size=(window, window), num_prefix_tokens=1, **kwargs)
        dtype = next(iter(state_dict.values())).dtype
        layer.to(dtype).load_state_dict(state_dict, strict=True)
        return layer

    def position_biases(self, length: int) -> tuple[Tensor, Tensor]:
        """B_1 (H, M, L) and B_2 (H, L, M) for the L sequence/grid tokens (prefix tokens excluded)."""
        H, M = self.num_heads, self.agent_num
        if self.grid_size is None:
            bias1 = _resize(self.an_bias, length)  # (H, M, L)
            bias2 = _resize(self.na_bias, length).transpose(1, 2)  # (H, L, M)
            return bias1, bias2
        h, w = self.grid_size
        an = F.interpolate(self.an_bias, size=(h, w), mode="bilinear", align_corners=False)  # (H, M, h, w)
        na = F.interpolate(self.na_bias, size=(h, w), mode="bilinear", align_corners=False)
        ah = _resize(self.ah_bias.view(H, M, -1), h).view(H, M, h, 1)
        aw = _resize(self.aw_bias.view(H, M, -1), w).view(H, M, 1, w)
        ha = _resize(self.ha_bias.view(H, -1, M).transpose(1, 2), h).transpose(1, 2).view(H, h, 1, M)
        wa = _resize(self.wa_bias.view(H, -1, M).transpose(1, 2), w).transpose(1, 2).view(H, 1, w, M)
        bias1 = (an + ah + aw).reshape(H, M, h * w)  # row-major grid positions
        bias2 = na.reshape(H, M, h * w).transpose(1, 2) + (ha + wa).reshape(H, h * w, M)
        return bias1, bias2

    def _check_length(self, length: int) -> None:
        if self.grid_size is not None and length != self.grid_size[0] * self.grid_size[1]:
            h, w = self.grid_size
            raise ValueError(
                f"{self.name}: built for num_prefix_tokens={self.num_prefix_tokens} + a {h}x{w} grid = "
                f"{self.num_prefix_tokens + h * w} tokens; got {self.num_prefix_tokens + length}. Set "
                f"layer.grid_size to the new (h, w) or build it with grid_size=None for a 1-D sequence."
            )

    def _grid(self, x: Tensor) -> Tensor:
        """(B, L, C) sequence tokens -> (B, C, L) or (B, C, h, w) for pooling and the DWC."""
        x = x.transpose(1, 2)
        return x if self.grid_size is None else x.reshape(*x.shape[:2], *self.grid_size)

    def _grid_mask(self, mask: Tensor) -> Tensor:
        return mask if self.grid_size is None else mask.reshape(mask.shape[0], *self.grid_size)

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: Any = None,
    ) -> Tensor:
        self.check_inputs(x, context, padding_mask, cache)
        B, T, C = x.shape
        H, D, M, P = self.num_heads, self.head_dim, self.agent_num, self.num_prefix_tokens
        if T <= P:
            raise ValueError(f"{self.name}: x has {T} tokens, no more than its num_prefix_tokens={P}.")
        L = T - P  # sequence/grid tokens
        self._check_length(L)
        if self.cross:
            q = self.q(x)  # (B, T, C)
            k, v = self.kv(context).view(B, context.shape[1], 2, C).unbind(2)  # (B, S, C) each
        else:
            q, k, v = self.qkv(x).view(B, T, 3, C).unbind(2)  # (B, T, C) each
        # softmax denominators in float32 at least (float64 stays float64)
        dtype = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            query_mask = None if self.cross or padding_mask is None else padding_mask[:, P:]
            if query_mask is not None:
                v = v * padding_mask[..., None].to(dtype)  # padded values must not reach the DWC
            grid_mask = None if query_mask is None else self._grid_mask(query_mask)
            pooled = _masked_pool(self._grid(q[:, P:]), grid_mask, self.pool)  # (B, C, M) or (B, C, p_h, p_w)
            agents = pooled.reshape(B, C, M).transpose(1, 2).reshape(B, M, H, D)  # (B, M, H, D)
            qh = q.view(B, T, H, D)
            kh = k.view(B, -1, H, D)
            vh = v.view(B, -1, H, D)
            logits1 = torch.einsum("bmhd,bshd->bhms", agents * self.scale, kh)  # (B, H, M, S)
            logits2 = torch.einsum("bthd,bmhd->bhtm", qh * self.scale, agents)  # (B, H, T, M)
            if not self.cross:
                bias1, bias2 = self.position_biases(L)
                bias1, bias2 = bias1.to(dtype), bias2.to(dtype)
                if P > 0:
                    bias1 = torch.cat([self.ac_bias[0].to(dtype), bias1], dim=-1)  # (H, M, T)
                    bias2 = torch.cat([self.ca_bias[0].to(dtype), bias2], dim=-2)  # (H, T, M)
                logits1, logits2 = logits1 + bias1, logits2 + bias2
            if padding_mask is not None:
                keep = padding_mask[:, None, None, :]  # (B, 1, 1, S)
                has_key = keep.any(dim=-1, keepdim=True)
                # a sequence with no real key: any finite softmax, then zero weights (not softmax over nothing, NaN)
                logits1 = logits1.masked_fill(~keep & has_key, float("-inf"))
                attn1 = torch.softmax(logits1, dim=-1) * has_key.to(dtype)
            else:
                attn1 = torch.softmax(logits1, dim=-1)
            agent_v = torch.einsum("bhms,bshd->bhmd", self.attn_drop(attn1), vh)  # (B, H, M, D)
            attn2 = self.attn_drop(torch.softmax(logits2, dim=-1))
            o = torch.einsum("bhtm,bhmd->bthd", attn2, agent_v).reshape(B, T, C)  # (B, T, C)
            if not self.cross:
                weight, bias = self.dwc.weight.to(dtype), self.dwc.bias.to(dtype)
                dwc = _depthwise_conv(self._grid(v[:, P:]), weight, bias)  # (B, C, L) or (B, C, h, w)
                o = torch.cat([o[:, :P], o[:, P:] + dwc.flatten(2).transpose(1, 2)], dim=1)
        return self.proj_drop(self.proj(o.to(x.dtype)))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, agent_num={self.agent_num}, grid_size={self.grid_size}, "
            f"num_prefix_tokens={self.num_prefix_tokens}"
        )
