"""Cottention's own properties (Mongaras et al. 2024); the contract is in test_contract.py."""

from __future__ import annotations

import pytest
import torch

from attnzoo.layers import build_attention
from attnzoo.layers.cottention import cosine_attention

B, H, D = 2, 3, 8


def randn(*shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def quadratic_cosine(q, k, v, norm_const, *, causal, mask=None):
    """The T x T form from the paper: A_ij = cos(q_i, k_j) (masked), O = A V', v'_j = v_j / max(c_j^sigmoid(m), 1),
    with c_j = the real keys in row j of the mask (written with explicit norms and an explicit row count)."""
    T, S = q.shape[1], k.shape[1]
    real = torch.ones(q.shape[0], S, dtype=torch.bool) if mask is None else mask
    cos = torch.einsum("bthd,bshd->bhts", q, k) / (
        q.norm(dim=-1).permute(0, 2, 1)[..., :, None] * k.norm(dim=-1).permute(0, 2, 1)[..., None, :]
    )
    allowed = real[:, None, None, :].expand(-1, 1, T, S)
    rows = real[:, None, :].expand(-1, S, S)  # row j of the official mask: keys visible to position j
    if causal:
        allowed = allowed & torch.ones(T, S, dtype=torch.bool).tril()
        rows = rows & torch.ones(S, S, dtype=torch.bool).tril()
    count = rows.sum(-1).double()  # (B, S)
    scale = (count[..., None] ** torch.sigmoid(norm_const)).clamp(min=1)  # (B, S, H)
    weights = cos * allowed
    return torch.einsum("bhts,bshv->bthv", weights, v / scale[..., None])


@pytest.mark.parametrize("causal,T,S", [(False, 37, 23), (True, 70, 70), (True, 1, 1)], ids=str)
def test_linear_form_equals_quadratic_form(causal, T, S):
    q, k, v = randn(B, T, H, D, seed=0), randn(B, S, H, D, seed=1), randn(B, S, H, D, seed=2)
    norm_const = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    got, _, count = cosine_attention(q, k, v, norm_const, causal=causal)
    torch.testing.assert_close(got, quadratic_cosine(q, k, v, norm_const, causal=causal), atol=1e-12, rtol=1e-10)
    assert count.tolist() == [S, S]


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_padded_keys_are_not_counted(causal):
    T = 17
    q, k, v = randn(B, T, H, D, seed=3), randn(B, T, H, D, seed=4), randn(B, T, H, D, seed=5)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, [0, 1, 6]] = False
    mask[1, -4:] = False
    norm_const = torch.full((H,), 0.5, dtype=torch.float64)
    got, _, count = cosine_attention(q, k, v, norm_const, causal=causal, padding_mask=mask)
    ref = quadratic_cosine(q, k, v, norm_const, causal=causal, mask=mask)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)
    assert count.tolist() == [T - 3, T - 4]


def test_cosine_weights_are_bounded_and_scale_invariant():
    """Each weight is a cosine in [-1, 1]: with v = 1 the output is bounded by sum_j 1 / c_j^p and reaches that bound
    when every key points along its query; positive rescaling of q or k rows changes nothing; weights can be < 0."""
    T = 12
    q, k = randn(B, T, H, D, seed=6), randn(B, T, H, D, seed=7)
    ones = torch.ones(B, T, H, 1, dtype=torch.float64)
    norm_const = torch.zeros(H, dtype=torch.float64)  # power 1/2
    o, _, _ = cosine_attention(q, k, ones, norm_const, causal=True)
    bound = (torch.arange(1, T + 1, dtype=torch.float64) ** -0.5).cumsum(0)[None, :, None, None]  # sum_{j<=i} j^-1/2
    assert (o.abs() <= bound + 1e-12).all() and (o < 0).any()
    aligned, _, _ = cosine_attention(
        q[:, :1].expand(B, T, H, D), q[:, :1].expand(B, T, H, D), ones, norm_const, causal=True
    )
    torch.testing.assert_close(aligned, bound.expand_as(aligned))
    scales_q, scales_k = randn(B, T, H, 1, seed=8).abs() + 0.1, randn(B, T, H, 1, seed=9).abs() * 10 + 0.1
    v = randn(B, T, H, D, seed=10)
    ref, _, _ = cosine_attention(q, k, v, norm_const, causal=False)
    got, _, _ = cosine_attention(q * scales_q, k * scales_k, v, norm_const, causal=False)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)


def test_norm_const_sets_the_length_normalisation():
    """Non-causal, identical keys along the query: o = m * v / m^sigmoid(norm_const), so the learned power spans no
    normalisation (m^0: sum) to full averaging (m^1: mean)."""
    S = 16
    q = randn(1, 1, H, D, seed=11)
    v = randn(1, 1, H, D, seed=12).expand(1, S, H, D)
    norm_const = torch.tensor([-30.0, 0.0, 30.0], dtype=torch.float64)  # powers ~0, 1/2, ~1
    o, _, _ = cosine_attention(q, q.expand(1, S, H, D), v, norm_const, causal=False)
    expected = S * v[:, :1] / S ** torch.sigmoid(norm_const)[:, None]
    torch.testing.assert_close(o, expected, atol=1e-10, rtol=1e-10)


def test_layer_is_projections_around_cosine_attention():
    torch.manual_seed(0)
    layer = build_attention("cottention", dim=24, num_heads=3, causal=True).double().eval()
    with torch.no_grad():
        layer.norm_const.copy_(torch.tensor([0.1, 0.5, 3.0]))
    x = torch.randn(2, 19, 24, dtype=torch.float64)
    q, k, v = (proj(x).view(2, 19, 3, 8) for proj in (layer.q_proj, layer.k_proj, layer.v_proj))
    ref = layer.out_proj(quadratic_cosine(q, k, v, layer.norm_const.detach(), causal=True).reshape(2, 19, 24))
    torch.testing.assert_close(layer(x), ref, atol=1e-12, rtol=1e-10)
    assert layer.q_proj.bias is None and torch.allclose(
        layer.norm_const.new_full((3,), 0.5), build_attention("cottention", dim=24, num_heads=3).norm_const.double()
    )


def test_rope_decoding_equals_full_forward_and_rotation_is_relative():
    torch.manual_seed(0)
    layer = build_attention("cottention", dim=24, num_heads=3, causal=True, rope=True).double().eval()
    x = torch.randn(2, 13, 24, dtype=torch.float64)
    full = layer(x)
    cache = layer.new_cache(2)
    stepped = torch.cat([layer(x[:, :5], cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(5, 13)], 1)
    torch.testing.assert_close(stepped, full, atol=1e-12, rtol=1e-10)
    assert cache.state.shape == (2, 3, 8, 8) and cache.count.tolist() == [13, 13] and cache.length == 13
    with pytest.raises(ValueError, match="rope=True rotates q and k"):
        build_attention("cottention", dim=24, num_heads=3, cross=True, rope=True)
