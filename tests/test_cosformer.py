"""cosFormer's own properties (Qin et al. 2022); the contract is in test_contract.py."""

from __future__ import annotations

import math

import pytest
import torch

from attnzoo.layers import build_attention
from attnzoo.layers.cosformer import cosformer_attention, reweighted_features

B, H, D = 2, 3, 8


def relu_randn(*shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).relu()


def quadratic(q, k, v, *, causal, M, eps=1e-6):
    """The left product: s(i, j) = relu(q_i).relu(k_j) cos(pi/2 (i - j) / M), rows normalised with the clamp."""
    T, S = q.shape[1], k.shape[1]
    i = torch.arange(1, T + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, S + 1, dtype=torch.float64)[None, :]
    scores = torch.einsum("bthd,bshd->bhts", q, k) * torch.cos(math.pi / 2 * (i - j) / M)
    if causal:
        scores = scores * torch.ones(T, S, dtype=torch.bool).tril()
    den = scores.sum(-1, keepdim=True).clamp_min(eps)
    return torch.einsum("bhts,bshv->bthv", scores / den, v)


def test_reweighting_identity():
    T, S, M = 13, 21, 40
    q, k = relu_randn(B, T, H, D, seed=0), relu_randn(B, S, H, D, seed=1)
    got = torch.einsum("bthf,bshf->bhts", reweighted_features(q, offset=0, M=M), reweighted_features(k, offset=0, M=M))
    i, j = torch.arange(1, T + 1)[:, None], torch.arange(1, S + 1)[None, :]
    ref = torch.einsum("bthd,bshd->bhts", q, k) * torch.cos(math.pi / 2 * (i - j).double() / M)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    "causal,T,S,max_len", [(False, 37, 23, None), (False, 37, 23, 64), (True, 70, 70, 100)], ids=str
)
def test_linear_form_equals_quadratic_form(causal, T, S, max_len):
    q, k = relu_randn(B, T, H, D, seed=2), relu_randn(B, S, H, D, seed=3)
    v = torch.randn(B, S, H, D, dtype=torch.float64)
    got, _ = cosformer_attention(q, k, v, causal=causal, max_len=max_len)
    ref = quadratic(q, k, v, causal=causal, M=max_len or max(T, S))
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)


def test_fixed_max_len_step_equals_parallel_and_prefix_is_consistent():
    torch.manual_seed(0)
    layer = build_attention("cosformer", dim=24, num_heads=3, causal=True, max_len=50).double().eval()
    x = torch.randn(2, 30, 24, dtype=torch.float64)
    full = layer(x)
    cache = layer.new_cache(2)
    stepped = torch.cat([layer(x[:, t : t + 1], cache=cache) for t in range(30)], dim=1)
    torch.testing.assert_close(stepped, full, atol=1e-12, rtol=1e-12)
    assert cache.position == 30 and cache.state.shape == (2, 3, 16, 9)
    torch.testing.assert_close(layer(x[:, :11]), full[:, :11], atol=1e-12, rtol=1e-12)


def test_official_per_call_m_is_not_prefix_consistent():
    """max_len=None (official M = max(T, S)): the same prefix gives other outputs in a longer sequence."""
    torch.manual_seed(0)
    layer = build_attention("cosformer", dim=24, num_heads=3, max_len=None).double().eval()
    x = torch.randn(2, 30, 24, dtype=torch.float64)
    assert (layer(x[:, :10]) - layer(x[:, :10].repeat(1, 3, 1))[:, :10]).abs().max() > 1e-6
    with pytest.raises(ValueError, match=r"max_len=None .* not be prefix-consistent"):
        build_attention("cosformer", dim=24, num_heads=3, causal=True, max_len=None)


def test_constant_values_give_constant_output():
    T, S = 19, 26
    q, k = relu_randn(B, T, H, D, seed=4), relu_randn(B, S, H, D, seed=5)
    value = torch.randn(1, 1, H, D, dtype=torch.float64)
    for causal in (False, True):
        kk = k[:, :T] if causal else k
        got, _ = cosformer_attention(q, kk, value.expand(B, kk.shape[1], H, D), causal=causal, max_len=32)
        torch.testing.assert_close(got, value.expand_as(got), atol=1e-12, rtol=1e-12)


def test_dead_relu_rows_give_zero_not_nan():
    q = relu_randn(B, 9, H, D, seed=6)
    q[:, 4] = 0.0  # every feature of query 4 is dead
    k, v = relu_randn(B, 9, H, D, seed=7), torch.randn(B, 9, H, D, dtype=torch.float64)
    got, _ = cosformer_attention(q, k, v, causal=True, max_len=16)
    assert torch.isfinite(got).all() and (got[:, 4] == 0).all()


def test_positions_beyond_max_len_raise():
    layer = build_attention("cosformer", dim=24, num_heads=3, causal=True, max_len=8).eval()
    with pytest.raises(ValueError, match="position 9 exceeds max_len=8"):
        layer(torch.randn(1, 9, 24))
    cache = layer.new_cache(1)
    layer(torch.randn(1, 8, 24), cache=cache)
    with pytest.raises(ValueError, match="position 9 exceeds max_len=8"):
        layer(torch.randn(1, 1, 24), cache=cache)


def test_causal_cross_reads_only_earlier_context():
    torch.manual_seed(0)
    layer = build_attention("cosformer", dim=24, num_heads=3, causal=True, cross=True, max_len=32).double().eval()
    x, context = torch.randn(2, 12, 24, dtype=torch.float64), torch.randn(2, 12, 24, dtype=torch.float64)
    changed = context.clone()
    changed[:, 7:] = torch.randn(2, 5, 24, dtype=torch.float64)
    out, out_changed = layer(x, context=context), layer(x, context=changed)
    torch.testing.assert_close(out[:, :7], out_changed[:, :7], atol=1e-12, rtol=1e-12)
    assert (out[:, 7:] - out_changed[:, 7:]).abs().max() > 1e-6
