"""Gated softmax attention (Qiu et al. 2025): a zero gate halves standard attention before the output
projection, a large positive gate bias gives standard attention, the gate is per head (and per channel)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnzoo.layers import build_attention

DIM, HEADS = 32, 4
F64 = dict(atol=1e-12, rtol=1e-12)
PATTERNS = [dict(), dict(causal=True), dict(cross=True), dict(causal=True, cross=True)]


def pair(gate: str, **pattern):
    """A gated layer and a softmax layer with the same q/k/v/proj weights."""
    torch.manual_seed(0)
    gated = build_attention("gated_softmax", dim=DIM, num_heads=HEADS, gate=gate, qkv_bias=True, **pattern)
    mha = build_attention("softmax", dim=DIM, num_heads=HEADS, qkv_bias=True, **pattern)
    missing, unexpected = gated.load_state_dict(mha.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"gate.weight", "gate.bias"}
    return gated.double().eval(), mha.double().eval()


def data(pattern, T: int = 9):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, T, DIM, generator=gen, dtype=torch.float64)
    context = torch.randn(2, T, DIM, generator=gen, dtype=torch.float64) if pattern.get("cross") else None
    return x, context


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("gate", ["elementwise", "headwise"])
def test_zero_gate_is_half_of_standard_attention(gate, pattern):
    gated, mha = pair(gate, **pattern)
    nn.init.zeros_(gated.gate.weight)
    nn.init.zeros_(gated.gate.bias)
    x, context = data(pattern)
    # sigmoid(0) = 1/2 on every head output; proj is affine, so halve its weight instead and keep its bias
    mha.proj.weight.data.mul_(0.5)
    torch.testing.assert_close(gated(x, context=context), mha(x, context=context), **F64)


@pytest.mark.parametrize("gate", ["elementwise", "headwise"])
def test_large_gate_bias_is_standard_attention(gate):
    gated, mha = pair(gate)
    nn.init.constant_(gated.gate.bias, 60.0)  # sigmoid(60 + small) = 1 - 1e-26
    x, _ = data({})
    torch.testing.assert_close(gated(x), mha(x), **F64)


def test_headwise_gate_scales_whole_heads():
    """A headwise gate multiplies each head's output by one number: a head gated to ~0 drops out entirely."""
    gated, mha = pair("headwise")
    assert gated.gate.out_features == HEADS
    nn.init.zeros_(gated.gate.weight)
    with torch.no_grad():
        gated.gate.bias.copy_(torch.tensor([60.0, -60.0, 60.0, 60.0]))
    x, _ = data({})
    heads = {}
    mha.proj.register_forward_pre_hook(lambda m, a: heads.update(o=a[0]))
    mha(x)
    o = heads["o"].view(2, 9, HEADS, -1).clone()
    o[:, :, 1] = 0
    torch.testing.assert_close(gated(x), mha.proj(o.flatten(2)), **F64)


def test_gate_depends_on_the_query_token_only():
    """In causal decoding the gate of a token is fixed once it is seen (the cache needs no gate state)."""
    gated, _ = pair("elementwise", causal=True)
    x, _ = data({}, T=8)
    full = gated(x)
    cache = gated.new_cache(2)
    steps = torch.cat([gated(x[:, t : t + 1], cache=cache) for t in range(8)], dim=1)
    torch.testing.assert_close(steps, full, **F64)


def test_unknown_gate_raises():
    with pytest.raises(ValueError, match=r"unknown gate 'element'\. Did you mean 'elementwise'"):
        build_attention("gated_softmax", dim=DIM, num_heads=HEADS, gate="element")
