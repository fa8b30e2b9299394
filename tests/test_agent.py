"""Agent attention properties (Han et al. 2024): the composition identity, identity pooling, row-stochasticity,
a single agent, bias tables at their native size, grids (non-square, resized), padding, cross, and causal raising."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers import build_attention
from attnzoo.layers.agent import _depthwise_conv, _pool_shape

DIM, HEADS = 32, 4
D = DIM // HEADS
F64 = dict(atol=1e-10, rtol=1e-10)


def make(seed: int = 0, **options):
    torch.manual_seed(seed)
    return build_attention("agent", dim=DIM, num_heads=HEADS, qkv_bias=True, **options).double().eval()


def inputs(T: int, B: int = 2, seed: int = 1):
    return torch.randn(B, T, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def zero_biases_and_conv(layer) -> None:
    for name, p in layer.named_parameters():
        if name.endswith("_bias") or name.startswith("dwc"):
            nn.init.zeros_(p)


def identity_proj(layer) -> None:
    nn.init.eye_(layer.proj.weight)
    nn.init.zeros_(layer.proj.bias)


def heads(t, B):
    return t.reshape(B, -1, HEADS, D).transpose(1, 2)  # (B, H, N, D)


@pytest.mark.parametrize(
    "options,T",
    [
        (dict(agent_num=5), 13),  # 1-D, fewer agents than tokens
        (dict(agent_num=20), 13),  # 1-D, more agents than tokens
        (dict(agent_num=4, grid_size=(3, 5)), 15),  # non-square grid
        (dict(agent_num=9, grid_size=(4, 4), num_prefix_tokens=1), 17),  # DeiT layout
    ],
    ids=["1d", "1d-more-agents", "grid3x5", "deit"],
)
def test_composition_identity(options, T):
    """Zero biases and DWC: Agent(Q, K, V) == SDPA(Q, A, SDPA(A, K, V)) with A the pooled queries."""
    layer = make(**options)
    zero_biases_and_conv(layer)
    identity_proj(layer)
    x = inputs(T)
    B, P = 2, options.get("num_prefix_tokens", 0)
    q, k, v = layer.qkv(x).chunk(3, dim=-1)
    grid = options.get("grid_size")
    seq = q[:, P:].transpose(1, 2)  # (B, C, L)
    if grid is None:
        agents = F.adaptive_avg_pool1d(seq, options["agent_num"])
    else:
        agents = F.adaptive_avg_pool2d(seq.reshape(B, DIM, *grid), _pool_shape(options["agent_num"], grid))
    agents = heads(agents.flatten(2).transpose(1, 2), B)
    agent_v = F.scaled_dot_product_attention(agents, heads(k, B), heads(v, B))
    ref = F.scaled_dot_product_attention(heads(q, B), agents, agent_v).transpose(1, 2).reshape(B, T, DIM)
    torch.testing.assert_close(layer(x), ref, **F64)


def test_identity_pooling_is_two_explicit_softmaxes():
    """agent_num == N on a grid (pooling is the identity, A = Q): O = softmax(sQQ^T) softmax(sQK^T) V."""
    layer = make(agent_num=16, grid_size=(4, 4))
    zero_biases_and_conv(layer)
    identity_proj(layer)
    x = inputs(16)
    q, k, v = (heads(t, 2) for t in layer.qkv(x).chunk(3, dim=-1))
    s = D**-0.5
    ref = torch.softmax(s * q @ q.transpose(-1, -2), -1) @ torch.softmax(s * q @ k.transpose(-1, -2), -1) @ v
    torch.testing.assert_close(layer(x), ref.transpose(1, 2).reshape(2, 16, DIM), **F64)


@pytest.mark.parametrize("options,T", [(dict(agent_num=6), 11), (dict(grid_size=(3, 4), num_prefix_tokens=2), 14)])
def test_constant_values_give_constant_output(options, T):
    """Both softmaxes are row-stochastic: v_j = c everywhere gives c (biases on, DWC off)."""
    layer = make(**options)
    nn.init.zeros_(layer.dwc.weight)
    nn.init.zeros_(layer.dwc.bias)
    identity_proj(layer)
    c = torch.randn(DIM, dtype=torch.float64)
    with torch.no_grad():
        layer.qkv.weight[2 * DIM :] = 0
        layer.qkv.bias[2 * DIM :] = c
    out = layer(inputs(T))
    torch.testing.assert_close(out, c.expand_as(out), **F64)


@pytest.mark.parametrize("grid", [None, (3, 4)])
def test_single_agent_gives_identical_tokens(grid):
    layer = make(agent_num=1, grid_size=grid)
    nn.init.zeros_(layer.dwc.weight)
    nn.init.zeros_(layer.dwc.bias)
    out = layer(inputs(12))
    torch.testing.assert_close(out, out[:, :1].expand_as(out), **F64)


def test_padded_tokens_leave_the_pool_and_the_aggregation():
    """One agent, no biases: V_A = softmax(s a K^T) V over the real keys, a = mean of the real queries."""
    layer = make(agent_num=1)
    zero_biases_and_conv(layer)
    identity_proj(layer)
    x = inputs(10)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, [0, 4, 5]] = False
    mask[1, 7:] = False
    out = layer(x, padding_mask=mask)
    q, k, v = layer.qkv(x).chunk(3, dim=-1)
    for b in range(2):
        real = mask[b]
        a = heads(q[b, real].mean(0, keepdim=True)[None], 1)  # (1, H, 1, D)
        ref = F.scaled_dot_product_attention(a, heads(k[b, real][None], 1), heads(v[b, real][None], 1))
        torch.testing.assert_close(out[b, real], ref.reshape(1, DIM).expand(int(real.sum()), DIM), **F64)


def test_padded_tokens_have_no_influence_on_a_grid_with_a_class_token():
    """The contract's padding test runs the 1-D default; this is the ViT layout (biases and DWC on)."""
    layer = make(agent_num=4, grid_size=(3, 4), num_prefix_tokens=1)
    x = inputs(13)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[0, [2, 7, 12]] = False
    mask[1, 5] = False
    noisy = torch.where(mask[..., None], x, 10 * torch.randn_like(x))
    out, out_noisy = layer(x, padding_mask=mask), layer(noisy, padding_mask=mask)
    torch.testing.assert_close(out[mask], out_noisy[mask], **F64)


def test_bias_tables_at_native_size_are_reproduced():
    layer = make(agent_num=4, grid_size=(7, 7))
    bias1, bias2 = layer.position_biases(49)
    H, M = HEADS, 4
    ref1 = layer.an_bias.reshape(H, M, 49) + (layer.ah_bias + layer.aw_bias).reshape(H, M, 49)
    ref2 = layer.na_bias.reshape(H, M, 49).transpose(1, 2) + (layer.ha_bias + layer.wa_bias).reshape(H, 49, M)
    torch.testing.assert_close(bias1, ref1, atol=0, rtol=0)
    torch.testing.assert_close(bias2, ref2, atol=0, rtol=0)
    layer_1d = make(agent_num=4)
    bias1, bias2 = layer_1d.position_biases(49)  # the 1-D tables have 7 * 7 = 49 entries
    torch.testing.assert_close(bias1, layer_1d.an_bias, atol=0, rtol=0)
    torch.testing.assert_close(bias2, layer_1d.na_bias.transpose(1, 2), atol=0, rtol=0)


def test_row_and_column_tables_follow_a_new_grid():
    """Built for 4x4, run on 5x3: the row/column tables are resized, constant tables stay constant."""
    layer = make(agent_num=4, grid_size=(4, 4), num_prefix_tokens=1)
    with torch.no_grad():
        for name in ("an_bias", "na_bias", "ha_bias", "wa_bias", "aw_bias"):
            getattr(layer, name).zero_()
        layer.ah_bias.copy_(torch.arange(4.0).view(1, 1, 1, 4, 1).expand_as(layer.ah_bias))
    layer.grid_size = (5, 3)
    bias1, _ = layer.position_biases(15)
    # linear resize (align_corners=False) of rows [0, 1, 2, 3] to 5 rows; columns constant
    rows = F.interpolate(torch.arange(4.0, dtype=torch.float64).view(1, 1, 4), size=5, mode="linear")
    torch.testing.assert_close(bias1[0, 0], rows.view(5, 1).expand(5, 3).reshape(15), **F64)
    assert layer(inputs(16)).shape == (2, 16, DIM)
    with pytest.raises(ValueError, match=r"built for num_prefix_tokens=1 \+ a 5x3 grid = 16 tokens; got 17"):
        layer(inputs(17))


def test_pool_shape_follows_the_grid():
    assert _pool_shape(49, (14, 14)) == (7, 7)
    assert _pool_shape(16, (4, 4)) == (4, 4)
    assert _pool_shape(8, (4, 8)) == (2, 4)
    assert _pool_shape(7, (3, 5)) == (1, 7)


@pytest.mark.parametrize("shape", [(2, 8, 11), (2, 8, 3, 5)], ids=["1d", "2d"])
def test_depthwise_conv_matches_torch_conv(shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen)
    weight = torch.randn(8, 1, *([3] * (len(shape) - 2)), generator=gen)
    bias = torch.randn(8, generator=gen)
    conv = F.conv1d if len(shape) == 3 else F.conv2d
    ref = conv(x, weight, bias, padding=1, groups=8)
    torch.testing.assert_close(_depthwise_conv(x, weight, bias), ref, atol=1e-5, rtol=1e-5)


def test_cross_is_agentsd_without_biases_or_conv():
    layer = make(agent_num=3, cross=True)
    assert not [n for n, _ in layer.named_parameters() if n.endswith("_bias") or n.startswith("dwc")]
    identity_proj(layer)
    x, context = inputs(8), inputs(5, seed=2)
    q = layer.q(x)
    k, v = layer.kv(context).chunk(2, dim=-1)
    agents = heads(F.adaptive_avg_pool1d(q.transpose(1, 2), 3).transpose(1, 2), 2)
    agent_v = F.scaled_dot_product_attention(agents, heads(k, 2), heads(v, 2))
    ref = F.scaled_dot_product_attention(heads(q, 2), agents, agent_v).transpose(1, 2).reshape(2, 8, DIM)
    torch.testing.assert_close(layer(x, context=context), ref, **F64)


@pytest.mark.parametrize("cross", [False, True])
def test_causal_raises_with_the_reason(cross):
    with pytest.raises(ValueError, match="has no causal form: the agent tokens are averages"):
        build_attention("agent", dim=DIM, num_heads=HEADS, causal=True, cross=cross)


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(agent_num=0), "agent_num must be a positive integer"),
        (dict(grid_size=(4, 0)), r"grid_size must be \(h, w\)"),
        (dict(num_prefix_tokens=-1), "num_prefix_tokens must be an integer >= 0"),
    ],
)
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        build_attention("agent", dim=DIM, num_heads=HEADS, **options)
