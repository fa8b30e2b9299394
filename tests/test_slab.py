"""SLAB simplified linear attention's own properties (Guo et al. 2024); the contract is in test_contract.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnzoo.layers import build_attention


def shifted_sum_conv(x, weight, bias, padding):
    """Depthwise cross-correlation of (N, C, L) or (N, C, h, w) with zero padding, as a sum of shifted copies."""
    k = weight.shape[-1]
    if x.dim() == 3:
        padded = F.pad(x, (padding, padding))
        L = padded.shape[-1] - k + 1
        return sum(weight[:, 0, j, None] * padded[..., j : j + L] for j in range(k)) + bias[:, None]
    padded = F.pad(x, (padding,) * 4)
    h, w = padded.shape[-2] - k + 1, padded.shape[-1] - k + 1
    taps = (weight[:, 0, i, j, None, None] * padded[..., i : i + h, j : j + w] for i in range(k) for j in range(k))
    return sum(taps) + bias[:, None, None]


def quadratic_slab(layer, x, mask=None):
    """The T x T form: A = relu(q) relu(k + PE)^T (lower-triangular if causal), o = A V / (A 1 + eps) + DWC(V),
    with the DWC written as kernel_size (or k x k) shifted multiply-adds (causal: left padding of kernel_size - 1),
    independent of the layer's torch convolutions, float64."""
    B, T, C = x.shape
    H, D, P = layer.num_heads, layer.head_dim, layer.num_prefix_tokens
    q, k, v = layer.qkv(x).view(B, T, 3, C).unbind(2)
    if layer.positional_encoding is not None:
        k = k + F.pad(layer.positional_encoding, (0, 0, P, 0))  # no encoding on the prefix tokens
    q, k = F.relu(q).view(B, T, H, D), F.relu(k).view(B, T, H, D)
    v = v.view(B, T, H, D)
    if mask is not None:
        k, v = k * mask[:, :, None, None], v * mask[:, :, None, None]
    scores = torch.einsum("bthd,bshd->bhts", q, k)
    if layer.causal:
        scores = scores * torch.ones(T, T, dtype=torch.bool).tril()
    o = torch.einsum("bhts,bshd->bthd", scores, v) / (scores.sum(-1).transpose(1, 2)[..., None] + layer.eps)
    kernel = layer.kernel_size
    heads = v[:, P:].permute(0, 2, 3, 1).reshape(B * H, D, T - P)  # (B*H, D, L)
    if layer.causal:
        conv = shifted_sum_conv(F.pad(heads, (kernel - 1, 0)), layer.dwc.weight, layer.dwc.bias, padding=0)
    elif layer.grid_size is None:
        conv = shifted_sum_conv(heads, layer.dwc.weight, layer.dwc.bias, padding=kernel // 2)
    else:
        grid = heads.reshape(B * H, D, *layer.grid_size)
        conv = shifted_sum_conv(grid, layer.dwc.weight, layer.dwc.bias, padding=kernel // 2).flatten(2)
    o = torch.cat([o[:, :P], o[:, P:] + conv.reshape(B, H, D, T - P).permute(0, 3, 1, 2)], dim=1)
    return layer.proj(o.reshape(B, T, C))


def make(seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = build_attention("slab", dim=24, num_heads=3, **kwargs).double().eval()
    if layer.positional_encoding is not None:  # zero at init (official); random here so the test sees it
        torch.nn.init.normal_(layer.positional_encoding)
    return layer


@pytest.mark.parametrize(
    "kwargs,T",
    [
        ({}, 23),
        ({"kernel_size": 3}, 2),
        ({"causal": True}, 30),
        ({"causal": True, "kernel_size": 4}, 3),
        ({"grid_size": (4, 5)}, 20),
        ({"grid_size": (3, 3), "num_prefix_tokens": 1, "kernel_size": 7}, 10),
    ],
    ids=["1d", "1d-short", "causal", "causal-even-kernel", "grid", "grid-cls"],
)
def test_layer_equals_quadratic_form(kwargs, T):
    layer = make(**kwargs)
    x = torch.randn(2, T, 24, dtype=torch.float64)
    torch.testing.assert_close(layer(x), quadratic_slab(layer, x), atol=1e-12, rtol=1e-10)


def test_oracle_convolution_equals_torch_conv():
    gen = torch.Generator().manual_seed(0)
    x1, w1 = torch.randn(3, 6, 11, generator=gen), torch.randn(6, 1, 5, generator=gen)
    x2, w2 = torch.randn(3, 6, 4, 7, generator=gen), torch.randn(6, 1, 5, 5, generator=gen)
    bias = torch.randn(6, generator=gen)
    torch.testing.assert_close(shifted_sum_conv(x1, w1, bias, 2), F.conv1d(x1, w1, bias, padding=2, groups=6))
    torch.testing.assert_close(shifted_sum_conv(x2, w2, bias, 2), F.conv2d(x2, w2, bias, padding=2, groups=6))
    torch.testing.assert_close(shifted_sum_conv(x1, w1, bias, 0), F.conv1d(x1, w1, bias, groups=6))


def test_padding_matches_the_oracle_and_padded_values_reach_no_dwc():
    layer = make(grid_size=(3, 4))
    x = torch.randn(2, 12, 24, dtype=torch.float64)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, [0, 5]] = False
    torch.testing.assert_close(layer(x, padding_mask=mask), quadratic_slab(layer, x, mask), atol=1e-12, rtol=1e-10)


def test_dwc_restores_rank_of_the_low_rank_map():
    """The paper's point: the linear map A / rowsum has rank <= D, the DWC adds a full-rank local term."""
    layer = make()
    T = 40
    x = torch.randn(1, T, 24, dtype=torch.float64)
    q, k, _ = layer.qkv(x).view(1, T, 3, 24).unbind(2)
    q, k = F.relu(q).view(T, 3, 8)[:, 0], F.relu(k).view(T, 3, 8)[:, 0]  # head 0
    attention = q @ k.T / ((q @ k.T).sum(-1, keepdim=True) + layer.eps)
    conv = torch.zeros(T, T, dtype=torch.float64)  # the DWC of one channel as a T x T band matrix
    weight = layer.dwc.weight[0, 0].detach()
    for i in range(T):
        for j, w in zip(range(i - 2, i + 3), weight, strict=True):
            if 0 <= j < T:
                conv[i, j] = w
    assert torch.linalg.matrix_rank(attention) <= 8
    assert torch.linalg.matrix_rank(attention + conv) == T


def test_causal_decoding_equals_full_forward():
    layer = make(causal=True)
    x = torch.randn(2, 17, 24, dtype=torch.float64)
    full = layer(x)
    cache = layer.new_cache(2)
    stepped = torch.cat([layer(x[:, :6], cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(6, 17)], 1)
    torch.testing.assert_close(stepped, full, atol=1e-12, rtol=1e-10)
    assert cache.state.shape == (2, 3, 8, 9) and cache.conv_state.shape == (6, 8, 4)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="kernel_size must be an odd positive integer"):
        build_attention("slab", dim=24, num_heads=3, kernel_size=4)
    with pytest.raises(ValueError, match="grid_size is for the non-causal"):
        build_attention("slab", dim=24, num_heads=3, causal=True, grid_size=(2, 2))
    layer = build_attention("slab", dim=24, num_heads=3, grid_size=(2, 3))
    with pytest.raises(ValueError, match=r"2x3 grid = 6 tokens; got 7"):
        layer(torch.randn(1, 7, 24))
    with pytest.raises(ValueError, match="no cross-attention form"):
        build_attention("slab", dim=24, num_heads=3, cross=True)
