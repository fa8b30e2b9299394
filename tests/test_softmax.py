"""Softmax attention equals an explicit float64 matmul-softmax reference: causal, non-causal, cross, causal cross,
padded keys, with a KV cache, and with RoPE."""

from __future__ import annotations

import math

import pytest
import torch

from attnzoo.layers import build_attention, pattern_flags

DIM, H = 32, 4
D = DIM // H


def rotate(x: torch.Tensor, offset: int = 0, base: float = 10000.0) -> torch.Tensor:
    """RoPE written out per position (half-split layout), independent of layers/rope.py."""
    T = x.shape[1]
    out = torch.empty_like(x)
    half = D // 2
    for t in range(T):
        for i in range(half):
            angle = (offset + t) * base ** (-2 * i / D)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[:, t, :, i], x[:, t, :, i + half]
            out[:, t, :, i] = a * c - b * s
            out[:, t, :, i + half] = b * c + a * s
    return out


def reference(layer, x, context=None, padding_mask=None):
    """o = softmax(q k^T / sqrt(D) + mask) v per head, then proj; float64, explicit matmuls."""
    B, T, _ = x.shape
    if layer.cross:
        q = x @ layer.q.weight.T
        k, v = (context @ layer.kv.weight.T).view(B, context.shape[1], 2, H, D).unbind(2)
        q = q.view(B, T, H, D)
    else:
        q, k, v = (x @ layer.qkv.weight.T).view(B, T, 3, H, D).unbind(2)
    if layer.rope is not None:
        q, k = rotate(q), rotate(k)
    S = k.shape[1]
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)  # (B, H, T, S)
    allowed = torch.ones(B, 1, T, S, dtype=torch.bool)
    if layer.causal:
        allowed &= torch.ones(T, S, dtype=torch.bool).tril()
    if padding_mask is not None:
        allowed &= padding_mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    o = torch.einsum("bhts,bshd->bthd", probs, v).reshape(B, T, DIM)
    return o @ layer.proj.weight.T + layer.proj.bias


CASES = [
    pytest.param(p, rope, pad, id=f"{p}-{'rope' if rope else 'nope'}-{'padded' if pad else 'dense'}")
    for p in ("noncausal_self", "causal_self", "noncausal_cross", "causal_cross")
    for rope in (False, True)
    for pad in (False, True)
]


def make_inputs(pattern, T=7, S=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, DIM, generator=gen, dtype=torch.float64)
    context = None
    if pattern.endswith("cross"):
        context = torch.randn(2, T if pattern == "causal_cross" else S, DIM, generator=gen, dtype=torch.float64)
    return x, context


@pytest.mark.parametrize("pattern,rope,padded", CASES)
def test_matches_explicit_reference(pattern, rope, padded):
    torch.manual_seed(0)
    layer = build_attention("softmax", dim=DIM, num_heads=H, rope=rope, **pattern_flags(pattern)).double().eval()
    x, context = make_inputs(pattern)
    mask = None
    if padded:
        kv_len = x.shape[1] if context is None else context.shape[1]
        mask = torch.ones(2, kv_len, dtype=torch.bool)
        mask[0, 1] = mask[1, 3] = False  # never a query's only visible key: row 0 keeps key 0
    got = layer(x, context=context, padding_mask=mask)
    torch.testing.assert_close(got, reference(layer, x, context, mask), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("rope", [False, True], ids=["nope", "rope"])
def test_kv_cache_decoding_matches_reference(rope):
    torch.manual_seed(0)
    layer = build_attention("softmax", dim=DIM, num_heads=H, causal=True, rope=rope).double().eval()
    x, _ = make_inputs("causal_self", T=9)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 2] = False
    cache = layer.new_cache(2)
    parts = [layer(x[:, :4], padding_mask=mask[:, :4], cache=cache)]
    parts += [layer(x[:, t : t + 1], padding_mask=mask[:, t : t + 1], cache=cache) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(parts, 1), reference(layer, x, padding_mask=mask), atol=1e-10, rtol=1e-10)
    assert layer.state_size(9) == 2 * 9 * DIM


def test_rope_makes_scores_depend_on_relative_position_only():
    """With RoPE, shifting every position by the same offset (through the cache) leaves the output unchanged."""
    torch.manual_seed(0)
    layer = build_attention("softmax", dim=DIM, num_heads=H, causal=True, rope=True).double().eval()
    x, _ = make_inputs("causal_self", T=6)
    q = torch.randn(1, 3, H, D, dtype=torch.float64)
    k = torch.randn(1, 3, H, D, dtype=torch.float64)
    a = torch.einsum("bthd,bshd->bhts", layer.rope(q, 0), layer.rope(k, 0))
    b = torch.einsum("bthd,bshd->bhts", layer.rope(q, 11), layer.rope(k, 11))
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(layer.rope(q, 5), rotate(q, 5), atol=1e-12, rtol=1e-12)
    assert x.shape == (2, 6, DIM)
