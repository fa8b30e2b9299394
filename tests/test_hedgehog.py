"""Hedgehog's own properties (Zhang et al. 2024); the contract is in test_contract.py."""

from __future__ import annotations

import pytest
import torch

from attnzoo.layers import build_attention
from attnzoo.layers.hedgehog import hedgehog_distillation_loss

DIM, HEADS, EPS = 24, 3, 1e-12


def randn(*shape, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)


def features(x, weight, bias, activation):
    """phi written from the paper: y = W_h x + b_h, then [e^y / sum e^y ; e^-y / sum e^-y] or [e^y ; e^-y]."""
    y = torch.einsum("bthd,hdf->bthf", x, weight)
    if bias is not None:
        y = y + bias
    if activation == "exp":
        return torch.cat([y.exp(), (-y).exp()], dim=-1)
    pos, neg = y.exp(), (-y).exp()
    return torch.cat([pos / pos.sum(-1, keepdim=True), neg / neg.sum(-1, keepdim=True)], dim=-1)


def quadratic_weights(layer, q, k, causal=None):
    """The T x S matrix phi(q_i) . phi(k_j) (masked: causal, or bottom-right aligned for causal cross), row-normalised.
    ``causal`` defaults to the layer's."""
    fq, fk = layer.feature_map_q, layer.feature_map_k
    scores = torch.einsum(
        "bthf,bshf->bhts",
        features(q, fq.weight, fq.bias, layer.activation),
        features(k, fk.weight, fk.bias, layer.activation),
    )
    T, S = q.shape[1], k.shape[1]
    if layer.causal if causal is None else causal:
        scores = scores * torch.ones(T, S, dtype=torch.bool).tril(S - T)  # query i sees j <= i + S - T
    return scores / (scores.sum(-1, keepdim=True) + EPS)


def rotate(x, positions, base=10000.0):
    """RoPE on (B, T, H, D) at the given positions, halves layout: [x1 cos - x2 sin, x2 cos + x1 sin]."""
    D = x.shape[-1]
    angles = positions[:, None] * base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (T, D/2)
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def reference_forward(layer, x, context=None):
    B, T, _ = x.shape
    source = x if context is None else context
    S = source.shape[1]
    q = layer.q_proj(x).view(B, T, HEADS, -1)
    k = layer.k_proj(source).view(B, S, HEADS, -1)
    v = layer.v_proj(source).view(B, S, HEADS, -1)
    if layer.rope is not None:  # rotate by position, written out: query i sits at i + S - T in causal cross
        q_pos = torch.arange(T, dtype=torch.float64) + (S - T if layer.causal and layer.cross else 0)
        q, k = rotate(q, q_pos), rotate(k, torch.arange(S, dtype=torch.float64))
    o = torch.einsum("bhts,bshv->bthv", quadratic_weights(layer, q, k), v)
    return layer.o_proj(o.reshape(B, T, DIM))


def perturbed_layer(*, seed=0, **options):
    """A float64 layer whose feature maps are moved off the identity (so the test sees W, not just the init)."""
    layer = build_attention("hedgehog", dim=DIM, num_heads=HEADS, **options).double()
    with torch.no_grad():
        for i, p in enumerate([layer.feature_map_q.weight, layer.feature_map_k.weight]):
            p.add_(randn(*p.shape, seed=seed + i, scale=0.3))
        for i, fm in enumerate([layer.feature_map_q, layer.feature_map_k]):
            if fm.bias is not None:
                fm.bias.copy_(randn(*fm.bias.shape, seed=seed + 10 + i, scale=0.5))
    return layer


CASES = [
    pytest.param(dict(causal=False, cross=False), 13, 13, id="noncausal_self"),
    pytest.param(dict(causal=True, cross=False), 70, 70, id="causal_self"),
    pytest.param(dict(causal=False, cross=True), 11, 19, id="noncausal_cross"),
    pytest.param(dict(causal=True, cross=True), 9, 14, id="causal_cross-S>T"),
]


@pytest.mark.parametrize("activation", ["softmax", "exp"])
@pytest.mark.parametrize("flags,T,S", CASES)
def test_layer_equals_quadratic_form(flags, T, S, activation):
    layer = perturbed_layer(activation=activation, feature_bias=True, feature_dim=5, **flags)
    x = randn(2, T, DIM, seed=3)
    context = randn(2, S, DIM, seed=4) if flags["cross"] else None
    got = layer(x, context=context)
    torch.testing.assert_close(got, reference_forward(layer, x, context), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("flags,T,S", CASES)
def test_rope_equals_the_rotated_quadratic_form(flags, T, S):
    """rope=True: q and k rotated (query i at i + S - T in causal cross) before the maps, as LoLCATs does."""
    layer = perturbed_layer(rope=True, **flags)
    x = randn(2, T, DIM, seed=3)
    context = randn(2, S, DIM, seed=4) if flags["cross"] else None
    got = layer(x, context=context)
    torch.testing.assert_close(got, reference_forward(layer, x, context), atol=1e-12, rtol=1e-10)
    plain = perturbed_layer(**flags)
    assert (got - plain(x, context=context)).abs().max() > 1e-3  # the rotation is not a no-op


@pytest.mark.parametrize("cross", [False, True])
def test_rope_decoding_equals_the_full_forward(cross):
    """Prefill then single steps with rope=True: the cache offset puts each rotation where the full forward does."""
    layer = perturbed_layer(rope=True, causal=True, cross=cross).eval()
    x = randn(1, 12, DIM, seed=5)
    context = randn(1, 12, DIM, seed=6) if cross else None
    full = layer(x, context=context)
    cache = layer.new_cache(1)
    parts = [layer(x[:, :7], context=None if context is None else context[:, :7], cache=cache)]
    for t in range(7, 12):
        parts.append(layer(x[:, t : t + 1], context=None if context is None else context[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-12, rtol=1e-10)


def test_gradients_equal_the_quadratic_form():
    layer = perturbed_layer(causal=True, feature_bias=True)
    x = randn(2, 17, DIM, seed=5).requires_grad_()
    probe = randn(2, 17, DIM, seed=6)
    names = [n for n, _ in layer.named_parameters()]
    got = torch.autograd.grad((layer(x) * probe).sum(), [x, *layer.parameters()])
    ref = torch.autograd.grad((reference_forward(layer, x) * probe).sum(), [x, *layer.parameters()])
    for name, g, r in zip(["x", *names], got, ref):
        torch.testing.assert_close(g, r, atol=1e-11, rtol=1e-9, msg=lambda m, name=name: f"d{name}: {m}")


def test_identity_initialisation_and_square_default():
    layer = build_attention("hedgehog", dim=DIM, num_heads=HEADS)
    D = DIM // HEADS
    assert layer.feature_dim == D
    for fm in (layer.feature_map_q, layer.feature_map_k):
        torch.testing.assert_close(fm.weight, torch.eye(D).expand(HEADS, D, D))
    assert layer.feature_map_q is not layer.feature_map_k  # untied by default (LoLCATs)
    tied = build_attention("hedgehog", dim=DIM, num_heads=HEADS, tie_qk=True)
    assert tied.feature_map_q is tied.feature_map_k
    assert layer.state_size(1000) == HEADS * 2 * D * (D + 1)


def test_softmax_features_are_two_distributions():
    layer = perturbed_layer(feature_dim=6)
    x = randn(2, 9, HEADS, DIM // HEADS, seed=7, scale=20.0)  # large inputs: saturated softmax, still finite
    phi = layer.feature_map_k(x)
    assert phi.shape == (2, 9, HEADS, 12) and bool((phi > 0).all())
    torch.testing.assert_close(phi[..., :6].sum(-1), torch.ones(2, 9, HEADS, dtype=torch.float64))
    torch.testing.assert_close(phi[..., 6:].sum(-1), torch.ones(2, 9, HEADS, dtype=torch.float64))


def test_exp_query_shift_cancels_and_keys_stay_finite():
    layer = build_attention("hedgehog", dim=DIM, num_heads=HEADS, activation="exp").double()
    q = randn(1, 5, HEADS, DIM // HEADS, seed=8, scale=200.0)  # exp(200) overflows float32; the shift avoids it
    with torch.no_grad():
        phi_q = layer.feature_map_q(q.float(), is_query=True)
        assert bool(torch.isfinite(phi_q).all()) and float(phi_q.max()) == 1.0
        assert bool(torch.isfinite(layer.feature_map_k(q.float())).all())
        # the shifted query features are the raw ones times one positive factor per token (no eps clamp at this size)
        q = q / 200
        ratio = features(q, layer.feature_map_q.weight, None, "exp") / layer.feature_map_q(q, is_query=True)
    torch.testing.assert_close(ratio / ratio[..., :1], torch.ones_like(ratio), rtol=1e-12, atol=0)


@pytest.mark.parametrize("activation", ["softmax", "exp"])
def test_identity_map_gets_spikier_with_larger_norms(activation):
    """The paper's 'low-entropy spikiness': at identity init, scaling q and k up lowers the entropy of the weights,
    as it does for softmax attention (a plain elu+1 map lacks this)."""
    layer = build_attention("hedgehog", dim=DIM, num_heads=HEADS, activation=activation).double()
    q, k = randn(2, 32, HEADS, 8, seed=9), randn(2, 32, HEADS, 8, seed=10)
    entropies = []
    for alpha in (0.25, 1.0, 4.0):
        with torch.no_grad():
            weights = quadratic_weights(layer, alpha * q, alpha * k)
        entropies.append(float(-(weights * weights.log()).sum(-1).mean()))
    assert entropies[0] > entropies[1] > entropies[2], entropies
    assert entropies[0] > 0.95 * torch.log(torch.tensor(32.0)).item()  # small norms: close to uniform


def test_distillation_loss_is_the_cross_entropy():
    layer = perturbed_layer(feature_bias=True)
    q, k = randn(2, 12, HEADS, 8, seed=11), randn(2, 12, HEADS, 8, seed=12)
    for causal in (False, True):
        got = hedgehog_distillation_loss(q, k, layer.feature_map_q, layer.feature_map_k, causal=causal)
        logits = torch.einsum("bthd,bshd->bhts", q, k) / 8**0.5
        mask = torch.ones(12, 12, dtype=torch.bool).tril() if causal else torch.ones(12, 12, dtype=torch.bool)
        teacher = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)
        student = quadratic_weights(layer, q, k, causal)
        ce = -(teacher * torch.where(mask, student, torch.ones_like(student)).log()).sum(-1).mean()
        entropy = -(teacher * torch.where(mask, teacher, torch.ones_like(teacher)).log()).sum(-1).mean()
        torch.testing.assert_close(got, ce, atol=1e-10, rtol=1e-10)
        assert float(got.detach()) > float(entropy.detach())  # Gibbs: the cross-entropy exceeds the teacher's entropy


def test_distillation_trains_the_feature_map_towards_softmax():
    torch.manual_seed(0)
    layer = build_attention("hedgehog", dim=DIM, num_heads=HEADS)
    q, k = 2 * torch.randn(4, 16, HEADS, 8), 2 * torch.randn(4, 16, HEADS, 8)
    maps = list(layer.feature_map_q.parameters()) + list(layer.feature_map_k.parameters())
    optimizer = torch.optim.Adam(maps, lr=5e-2)
    losses = []
    for _ in range(30):
        loss = hedgehog_distillation_loss(q, k, layer.feature_map_q, layer.feature_map_k, causal=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, (losses[0], losses[-1])


def test_bad_options_name_the_problem():
    with pytest.raises(ValueError, match="activation must be one of softmax, exp; got 'softmx'"):
        build_attention("hedgehog", dim=DIM, num_heads=HEADS, activation="softmx")
    with pytest.raises(ValueError, match="feature_dim must be a positive int"):
        build_attention("hedgehog", dim=DIM, num_heads=HEADS, feature_dim=0)
    with pytest.raises(ValueError, match="causal=True needs as many keys as queries"):
        layer = build_attention("hedgehog", dim=DIM, num_heads=HEADS)
        hedgehog_distillation_loss(torch.randn(1, 4, 3, 8), torch.randn(1, 5, 3, 8), layer.feature_map_q, causal=True)
