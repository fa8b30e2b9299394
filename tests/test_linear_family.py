"""Property tests of the linear-attention family: linear (elu+1), based
(Taylor) and sliding_window (exact local softmax). The registry-wide contract lives in test_contract.py."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from attnzoo.layers import build_attention
from attnzoo.layers.based import taylor_feature_map, taylor_num_features
from attnzoo.layers.linear import elu_feature_map
from attnzoo.models import GPT

DIM, HEADS = 32, 4
F64 = dict(atol=1e-10, rtol=1e-10)  # two algebraically identical forms in float64


def layer(name, causal=True, cross=False, **options):
    torch.manual_seed(0)
    return build_attention(name, dim=DIM, num_heads=HEADS, causal=causal, cross=cross, **options).double().eval()


def randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def quadratic_linear_attention(q, k, v, causal, eps):
    """o_i = sum_j (phi(q_i) . phi(k_j)) v_j / (sum_j phi(q_i) . phi(k_j) + eps) as an explicit (T, S) matrix."""
    weights = torch.einsum("bthf,bshf->bhts", q, k)  # (B, H, T, S), already feature-mapped
    if causal:
        weights = weights.tril()
    num = torch.einsum("bhts,bshd->bthd", weights, v)
    return num / (weights.sum(-1).transpose(1, 2)[..., None] + eps)


def explicit_forward(mod, x, feature_map, causal):
    B, T, _ = x.shape
    H = mod.num_heads
    q = feature_map(mod.q_proj(x).view(B, T, H, -1))
    k = feature_map(mod.k_proj(x).view(B, T, H, -1))
    v = mod.v_proj(x).view(B, T, H, -1)
    return mod.o_proj(quadratic_linear_attention(q, k, v, causal, mod.eps).reshape(B, T, DIM))


def explicit_taylor_features(x, compact=True):
    """phi(x) = [1, x / d'^(1/4), vec(x x^T) / sqrt(2 d')] spelled out from the outer product (plain autograd); compact:
    the diagonal / sqrt(2 d') then the strict upper triangle row by row / sqrt(d')."""
    d = x.shape[-1]
    outer = x[..., :, None] * x[..., None, :]
    if compact:
        i, j = torch.triu_indices(d, d, offset=1)
        quadratic = torch.cat(
            [outer.diagonal(dim1=-2, dim2=-1) / math.sqrt(2 * d), outer[..., i, j] / math.sqrt(d)], -1
        )
    else:
        quadratic = outer.flatten(-2) / math.sqrt(2 * d)
    return torch.cat([torch.ones_like(x[..., :1]), x / d**0.25, quadratic], dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# kernels / feature maps


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "full"])
@pytest.mark.parametrize("feature_dim", [16, 5, 1])
def test_taylor_features_and_gradients_equal_the_explicit_map(compact, feature_dim):
    """The hand-written forward and backward against the outer-product form under autograd (f64, 1e-12)."""
    x = randn(2, 7, 3, feature_dim).requires_grad_()
    ours, explicit = taylor_feature_map(x, compact), explicit_taylor_features(x, compact)
    assert ours.shape[-1] == taylor_num_features(feature_dim, compact)
    torch.testing.assert_close(ours, explicit, atol=1e-12, rtol=1e-12)
    grad = randn(*ours.shape, seed=9)
    ours_dx, explicit_dx = (torch.autograd.grad(f, x, grad)[0] for f in (ours, explicit))
    torch.testing.assert_close(ours_dx, explicit_dx, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(
        lambda t: taylor_feature_map(t, compact), (randn(2, 3, feature_dim).requires_grad_(),)
    )


def test_taylor_features_of_bf16_are_float32_and_pass_gradients_back():
    x = randn(4, 16).to(torch.bfloat16).requires_grad_()
    features = taylor_feature_map(x)
    assert features.dtype == torch.float32
    features.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    x32 = x.detach().float().requires_grad_()
    explicit_taylor_features(x32).sum().backward()
    torch.testing.assert_close(x.grad.float(), x32.grad, atol=2e-2, rtol=1e-2)  # bf16 rounding of the result only


def test_taylor_kernel_identity():
    """phi(q) . phi(k) == 1 + s + s^2/2 with s = q . k / sqrt(d'), for the full and the compact map (f64, 1e-12)."""
    q, k = randn(50, 16, seed=2), randn(50, 16, seed=3)
    s = (q * k).sum(-1) / math.sqrt(16)
    expected = 1 + s + s**2 / 2
    for compact in (True, False):
        fq, fk = taylor_feature_map(q, compact), taylor_feature_map(k, compact)
        assert fq.shape[-1] == taylor_num_features(16, compact) == (153 if compact else 273)
        torch.testing.assert_close((fq * fk).sum(-1), expected, atol=1e-12, rtol=1e-12)
    assert expected.min() >= 0.5  # ((s + 1)^2 + 1) / 2: the denominator can never vanish


def test_elu_features_are_elu_plus_one_and_positive():
    x = randn(1000) * 30
    torch.testing.assert_close(elu_feature_map(x), F.elu(x) + 1, atol=1e-12, rtol=0)
    assert (elu_feature_map(x) > 0).all()  # no denominator of exactly zero from rounding of (exp(x) - 1) + 1


# ---------------------------------------------------------------------------------------------------------------
# linear and based: chunked == quadratic == step


@pytest.mark.parametrize("name,feature_map", [("linear", elu_feature_map), ("based", explicit_taylor_features)])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_chunked_equals_quadratic(name, feature_map, causal):
    mod = layer(name, causal=causal)
    x = randn(2, 150, DIM)  # longer than one 64-token chunk, not a multiple of it
    torch.testing.assert_close(mod(x), explicit_forward(mod, x, feature_map, causal), **F64)


@pytest.mark.parametrize("name", ["linear", "based"])
def test_token_by_token_equals_parallel(name):
    mod = layer(name)
    x = randn(2, 40, DIM)
    cache = mod.new_cache(2)
    stepped = torch.cat([mod(x[:, t : t + 1], cache=cache) for t in range(40)], dim=1)
    torch.testing.assert_close(stepped, mod(x), **F64)
    assert cache.state.numel() == 2 * mod.state_size(40) == 2 * mod.state_size(4000)  # constant size


@pytest.mark.parametrize("name", ["linear", "based"])
@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_self", "noncausal_cross"])
def test_constant_values_give_constant_output(name, pattern):
    """With every v_j equal, the normalised weights sum to one, so o_i = v at every position (exactly with eps = 0)."""
    mod = layer(name, causal=pattern.startswith("causal"), cross=pattern.endswith("cross"), eps=0.0)
    with torch.no_grad():
        mod.v_proj.weight.zero_()
        if mod.v_proj.bias is not None:
            mod.v_proj.bias.zero_()
        mod.v_proj.bias = torch.nn.Parameter(randn(DIM, seed=5))
        mod.o_proj = torch.nn.Identity()
    x = randn(2, 20, DIM)
    context = randn(2, 13, DIM, seed=4) if pattern.endswith("cross") else None
    out = mod(x, context=context)
    torch.testing.assert_close(out, mod.v_proj.bias.expand_as(out), atol=1e-8, rtol=1e-8)


def test_based_full_and_compact_maps_give_identical_outputs():
    full, compact = layer("based", compact_features=False), layer("based", compact_features=True)
    compact.load_state_dict(full.state_dict())
    x = randn(2, 40, DIM)
    torch.testing.assert_close(compact(x), full(x), **F64)
    assert compact.state_size(40) < full.state_size(40)


def test_based_feature_dim_sets_projection_and_state():
    mod = layer("based", feature_dim=8)
    assert mod.q_proj.out_features == HEADS * 8 and mod.v_proj.out_features == DIM
    assert mod.state_size(10) == HEADS * (1 + 8 + 36) * (DIM // HEADS + 1)
    with pytest.raises(ValueError, match="feature_dim must be a positive int; got 0"):
        layer("based", feature_dim=0)


# ---------------------------------------------------------------------------------------------------------------
# sliding window


def explicit_sliding_window(mod, x, window):
    B, T, _ = x.shape
    H, D = mod.num_heads, mod.head_dim
    q, k = mod.q_proj(x).view(B, T, H, D), mod.k_proj(x).view(B, T, H, D)
    if mod.rope is not None:
        q, k = mod.rope(q), mod.rope(k)
    v = mod.v_proj(x).view(B, T, H, D)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & (j > i - window)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    probs = scores.masked_fill(~allowed, -math.inf).softmax(-1)
    return mod.o_proj(torch.einsum("bhts,bshd->bthd", probs, v).reshape(B, T, DIM))


@pytest.mark.parametrize("rope", [True, False], ids=["rope", "norope"])
def test_sliding_window_equals_masked_softmax(rope):
    mod = layer("sliding_window", window=5, rope=rope)
    x = randn(2, 23, DIM)
    torch.testing.assert_close(mod(x), explicit_sliding_window(mod, x, 5), **F64)


def test_sliding_window_long_sequence_with_padding_is_banded_and_exact():
    """T > 2 x window takes the O(T x window) blocked path; padded keys and queries that see no real key included."""
    w, T = 4, 37
    mod = layer("sliding_window", window=w, rope=True)
    x = randn(2, T, DIM)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[0, 10:20] = False  # queries 13..19 of row 0 see only padded keys: zero attention output, no NaN
    mask[1, :3] = False
    B, H, D = 2, mod.num_heads, mod.head_dim
    q, k = mod.rope(mod.q_proj(x).view(B, T, H, D)), mod.rope(mod.k_proj(x).view(B, T, H, D))
    v = mod.v_proj(x).view(B, T, H, D)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = ((j <= i) & (j > i - w))[None, None] & mask[:, None, None, :]
    scores = torch.einsum("bthd,bshd->bhts", q, k).masked_fill(~allowed, -math.inf) / math.sqrt(D)
    probs = torch.nan_to_num(scores.softmax(-1))  # rows with no visible key: zeros
    ref = mod.o_proj(torch.einsum("bhts,bshd->bthd", probs, v).reshape(B, T, DIM))
    torch.testing.assert_close(mod(x, padding_mask=mask), ref, **F64)


def test_sliding_window_wider_than_sequence_is_causal_softmax():
    mod, ref = layer("sliding_window", window=64), layer("softmax", rope=True)
    ref.qkv.weight.data = torch.cat([mod.q_proj.weight, mod.k_proj.weight, mod.v_proj.weight])
    ref.proj.weight.data, ref.proj.bias.data = mod.o_proj.weight.data, torch.zeros(DIM, dtype=torch.float64)
    x = randn(2, 30, DIM)
    torch.testing.assert_close(mod(x), ref(x), **F64)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_sliding_window_cache_is_a_window_and_streams_exactly(cross):
    w, T = 4, 19
    mod = layer("sliding_window", window=w, cross=cross)
    x = randn(2, T, DIM)
    context = randn(2, T, DIM, seed=7) if cross else None
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[0, [3, 9, 10]] = False
    full = mod(x, context=context, padding_mask=mask)
    cache = mod.new_cache(2)
    cuts = [0, 7, 8, 9, 14, 15, 16, 17, 18, 19]  # a long prefill, single steps and multi-token chunks
    parts = []
    for a, b in itertools.pairwise(cuts):
        ctx = None if context is None else context[:, a:b]
        parts.append(mod(x[:, a:b], context=ctx, padding_mask=mask[:, a:b], cache=cache))
        assert cache.keys.shape[1] <= w  # constant-size state
    real = torch.ones(2, T, dtype=torch.bool) if cross else mask
    torch.testing.assert_close(torch.cat(parts, 1)[real], full[real], **F64)
    assert mod.state_size(10) == mod.state_size(10_000) == 2 * w * DIM


def test_sliding_window_has_no_noncausal_pattern():
    with pytest.raises(ValueError, match="has no pattern 'noncausal_self'"):
        build_attention("sliding_window", dim=DIM, num_heads=HEADS)


# ---------------------------------------------------------------------------------------------------------------
# the Based recipe: a per-layer hybrid


def test_based_hybrid_gpt_trains_and_generates():
    torch.manual_seed(0)
    model = GPT(50, dim=DIM, depth=2, num_heads=HEADS, attention=[{"name": "sliding_window", "window": 8}, "based"])
    idx = torch.randint(0, 50, (2, 16))
    logits = model(idx)
    F.cross_entropy(logits.reshape(-1, 50), idx.roll(-1, 1).reshape(-1)).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model = model.double()
    greedy = model.generate(idx[:, :6], max_new_tokens=8, temperature=0)  # decodes past the window of 8
    assert greedy.shape == (2, 14)
    # cached decoding (window buffer + Taylor state) picks the same tokens as re-running the whole sequence
    torch.testing.assert_close(greedy, model.generate(idx[:, :6], max_new_tokens=8, temperature=0, use_cache=False))
