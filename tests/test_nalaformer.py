"""NaLaFormer's norm-aware linear attention (Meng et al. 2025): its own properties; the contract is in
test_contract.py."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from attnzoo.layers import build_attention
from attnzoo.layers.nalaformer import norm_aware_attention, norm_aware_key_features, norm_aware_query_features

B, H, D, EPS = 2, 3, 8, 1e-6


def randn(*shape, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)


def similarity(q, k):
    """phi_q(q_i) . phi_k(k_j) written per coordinate: sum_d [q_d k_d > 0] (|q_d| / |q|)^p |k_d|^3,
    p = 3 (0.5 + tanh |q|), as (B, H, T, S). A zero query has no direction: its norm is floored (at 1e-12, like the
    layer), which gives it zero similarity to every key."""
    norm = q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    power = 3 * (0.5 + torch.tanh(norm))  # (B, T, H, 1)
    direction = (q.abs() / norm) ** power  # (B, T, H, D)
    same_sign = (q[:, :, None] * k[:, None]) > 0  # (B, T, S, H, D)
    terms = direction[:, :, None] * k.abs()[:, None] ** 3 * same_sign
    return terms.sum(-1).permute(0, 3, 1, 2)


def quadratic_nala(q, k, v, *, causal, mask=None, eps=EPS):
    """w_ij = (s_ij / n_i) / (sum_j s_ij / n_i + eps) over the real keys j (j <= i if causal), n_i their count."""
    T, S = q.shape[1], k.shape[1]
    allowed = torch.ones(B, 1, T, S, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(T, S, dtype=torch.bool).tril()
    scores = similarity(q, k) * allowed
    n = allowed.sum(-1, keepdim=True).clamp(min=1).double()
    weights = (scores / n) / ((scores / n).sum(-1, keepdim=True) + eps)
    return torch.einsum("bhts,bshv->bthv", weights, v), weights


@pytest.mark.parametrize("causal,T,S", [(False, 37, 23), (False, 16, 16), (True, 70, 70), (True, 1, 1)], ids=str)
def test_linear_form_equals_quadratic_form(causal, T, S):
    q, k, v = randn(B, T, H, D, seed=0), randn(B, S, H, D, seed=1), randn(B, S, H, D, seed=2)
    got, _, count = norm_aware_attention(q, k, v, causal=causal)
    ref, _ = quadratic_nala(q, k, v, causal=causal)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)
    assert count.tolist() == [S, S]


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_padded_keys_are_removed_and_not_counted(causal):
    T = 17
    q, k, v = randn(B, T, H, D, seed=3), randn(B, T, H, D, seed=4), randn(B, T, H, D, seed=5)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, [0, 1, 6]] = False
    mask[1, -4:] = False
    got, _, count = norm_aware_attention(q, k, v, causal=causal, padding_mask=mask)
    ref, _ = quadratic_nala(q, k, v, causal=causal, mask=mask)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)
    assert count.tolist() == [T - 3, T - 4]


def test_equals_the_official_mean_normalised_form():
    """Non-causal official arrangement: x = phi_q (phi_k^T N^-1/2)(v N^-1/2) / (phi_q . mean_j phi_k + 1e-6)."""
    N = 29
    q, k, v = randn(B, N, H, D, seed=6), randn(B, N, H, D, seed=7), randn(B, N, H, D, seed=8)
    phi_q, phi_k = norm_aware_query_features(q), norm_aware_key_features(k)
    kv = torch.einsum("bshf,bshv->bhfv", phi_k * N**-0.5, v * N**-0.5)
    z = 1 / (torch.einsum("bthf,bhf->bth", phi_q, phi_k.mean(1)) + 1e-6)
    official = torch.einsum("bthf,bhfv->bthv", phi_q, kv) * z[..., None]
    got, _, _ = norm_aware_attention(q, k, v, causal=False)
    torch.testing.assert_close(got, official, atol=1e-12, rtol=1e-10)


def test_features_are_non_negative_and_keep_matching_signs():
    q, k = randn(4, 5, H, D, seed=9, scale=3.0), randn(4, 5, H, D, seed=10, scale=3.0)
    phi_q, phi_k = norm_aware_query_features(q), norm_aware_key_features(k)
    assert phi_q.shape == (4, 5, H, 2 * D) and bool((phi_q >= 0).all()) and bool((phi_q <= 1).all())
    assert bool((phi_k >= 0).all())
    # a key with every sign flipped against the query has zero similarity; the same key with matching signs does not
    opposite = -q.sign() * k.abs()
    assert float((norm_aware_key_features(opposite) * phi_q).sum(-1).abs().max()) == 0.0
    assert bool(((norm_aware_key_features(-opposite) * phi_q).sum(-1) > 0).all())
    # both negative coordinates count (a ReLU-only map would give 0 here)
    negative = -q.abs()
    assert bool(((norm_aware_query_features(negative) * norm_aware_key_features(-k.abs())).sum(-1) > 0).all())


def test_larger_query_norm_gives_a_spikier_distribution():
    """The norm-aware power: along a fixed direction, a longer query has lower attention entropy (softmax-like);
    plain linear attention ignores the query norm entirely."""
    direction = F.normalize(randn(B, 24, H, D, seed=11), dim=-1)
    k, v = randn(B, 24, H, D, seed=12), randn(B, 24, H, D, seed=13)
    entropies = []
    for norm in (0.1, 0.5, 1.0, 3.0):
        _, weights = quadratic_nala(norm * direction, k, v, causal=False)
        entropies.append(float(-(weights * weights.clamp_min(1e-300).log()).sum(-1).mean()))
    assert all(a > b for a, b in itertools.pairwise(entropies)), entropies


def test_gradients_equal_the_quadratic_form_and_stay_finite_at_zeros():
    q, k, v = randn(B, 12, H, D, seed=14), randn(B, 12, H, D, seed=15), randn(B, 12, H, D, seed=16)
    q[0, 3] = 0.0  # a zero query: no direction; must give a finite output and finite gradients
    q[1, :, :, :2] = 0.0  # exact zeros in some coordinates: 0 ** p with a learned power
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    probe = randn(B, 12, H, D, seed=17)
    got = torch.autograd.grad((norm_aware_attention(q, k, v, causal=True)[0] * probe).sum(), [q, k, v])
    ref = torch.autograd.grad((quadratic_nala(q, k, v, causal=True)[0] * probe).sum(), [q, k, v])
    for name, g, r in zip("qkv", got, ref):
        assert bool(torch.isfinite(g).all()), name
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-8, msg=lambda m, name=name: f"d{name}: {m}")


def shifted_sum_lepe(layer, v, mask=None):
    """LePE as an explicit sum over the k (or k x k) filter taps, zero outside the sequence/grid, on the tokens after
    the prefix: (B, T - P, C). Causal: taps t - k + 1 .. t; otherwise centred."""
    P, kk = layer.num_prefix_tokens, layer.lepe_kernel
    if mask is not None:
        v = v * mask[:, :, None]
    v = v[:, P:]
    weight, bias = layer.lepe.weight, layer.lepe.bias
    out = bias.expand_as(v).clone()
    if layer.grid_size is not None:
        h, w = layer.grid_size
        image = v.unflatten(1, (h, w))  # (B, h, w, C)
        padded = F.pad(image, (0, 0, kk // 2, kk // 2, kk // 2, kk // 2))
        acc = bias.expand_as(image).clone()
        for dy in range(kk):
            for dx in range(kk):
                acc = acc + weight[:, 0, dy, dx] * padded[:, dy : dy + h, dx : dx + w]
        return acc.flatten(1, 2)
    L = v.shape[1]
    left = kk - 1 if layer.causal else kk // 2
    padded = F.pad(v, (0, 0, left, kk - 1 - left))
    for tap in range(kk):
        out = out + weight[:, 0, tap] * padded[:, tap : tap + L]
    return out


def layer_reference(layer, x, context=None, mask=None):
    """The whole module from its parameters: fused projection, NaLa, + LePE(v), LayerNorm(o) * SiLU(g), out_proj."""
    source = x if context is None else context
    C, T, S = layer.dim, x.shape[1], source.shape[1]
    W, b = layer.qkvg.weight, layer.qkvg.bias
    q = F.linear(x, W[:C], b[:C]).view(B, T, H, -1)
    k = F.linear(source, W[C : 2 * C], b[C : 2 * C]).view(B, S, H, -1)
    v = F.linear(source, W[2 * C : 3 * C], b[2 * C : 3 * C]).view(B, S, H, -1)
    o, _ = quadratic_nala(q, k, v, causal=layer.causal, mask=mask)
    o = o.reshape(B, T, C)
    if layer.lepe is not None:
        P = layer.num_prefix_tokens
        o = torch.cat([o[:, :P], o[:, P:] + shifted_sum_lepe(layer, v.reshape(B, S, C), mask)], dim=1)
    if layer.gate:
        o = F.layer_norm(o, (C,), layer.ln.weight, layer.ln.bias) * F.silu(F.linear(x, W[3 * C :], b[3 * C :]))
    return layer.out_proj(o)


@pytest.mark.parametrize("gate", [True, False], ids=["gate", "nogate"])
@pytest.mark.parametrize(
    "flags,T,S",
    [
        (dict(causal=False, cross=False), 13, 13),
        (dict(causal=False, cross=False, lepe_kernel=0), 13, 13),
        (dict(causal=False, cross=False, grid_size=(3, 4), num_prefix_tokens=1), 13, 13),
        (dict(causal=False, cross=False, grid_size=(4, 5), lepe_kernel=3), 20, 20),
        (dict(causal=True, cross=False), 20, 20),
        (dict(causal=True, cross=False, lepe_kernel=2), 20, 20),
        (dict(causal=False, cross=True), 11, 19),
    ],
    ids=["noncausal_1d", "noncausal_nolepe", "grid_prefix", "grid_k3", "causal", "causal_k2", "noncausal_cross"],
)
def test_layer_equals_its_equations(flags, T, S, gate):
    layer = build_attention("nalaformer", dim=H * D, num_heads=H, gate=gate, **flags).double()
    with torch.no_grad():  # a non-trivial LayerNorm affine
        if gate:
            layer.ln.weight.copy_(1 + randn(H * D, seed=18, scale=0.3))
            layer.ln.bias.copy_(randn(H * D, seed=19, scale=0.3))
    x = randn(B, T, H * D, seed=20)
    context = randn(B, S, H * D, seed=21) if flags["cross"] else None
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, [2, 5]] = False
    got = layer(x, context=context, padding_mask=mask)
    torch.testing.assert_close(got, layer_reference(layer, x, context, mask), atol=1e-12, rtol=1e-10)
    assert layer.qkvg.out_features == (4 if gate else 3) * H * D
    expected_lepe = {True: 5, False: 0}[not flags["cross"]] if "lepe_kernel" not in flags else flags["lepe_kernel"]
    assert layer.lepe_kernel == expected_lepe
    conv_state = H * D * (expected_lepe - 1) if expected_lepe else 0
    assert layer.state_size(100) == H * 2 * D * (D + 1) + conv_state


def test_grid_lepe_is_the_official_conv2d_module():
    layer = build_attention("nalaformer", dim=H * D, num_heads=H, grid_size=(3, 4))
    assert isinstance(layer.lepe, torch.nn.Conv2d) and layer.lepe.weight.shape == (H * D, 1, 5, 5)
    with pytest.raises(ValueError, match="built for num_prefix_tokens=0 \\+ a 3x4 grid = 12 tokens; got 13"):
        layer(torch.randn(1, 13, H * D))


def test_bad_options_name_the_problem():
    with pytest.raises(ValueError, match="nalaformer: eps must be >= 0"):
        build_attention("nalaformer", dim=24, num_heads=3, eps=-1.0)
    with pytest.raises(ValueError, match="has no pattern 'causal_cross'"):
        build_attention("nalaformer", dim=24, num_heads=3, causal=True, cross=True)
    with pytest.raises(ValueError, match="build the cross layer with lepe_kernel=0"):
        build_attention("nalaformer", dim=24, num_heads=3, cross=True, lepe_kernel=5)
    with pytest.raises(ValueError, match="non-causal lepe_kernel must be odd"):
        build_attention("nalaformer", dim=24, num_heads=3, lepe_kernel=4)
    with pytest.raises(ValueError, match="grid_size is for the non-causal 2-D layout"):
        build_attention("nalaformer", dim=24, num_heads=3, causal=True, grid_size=(2, 2))
