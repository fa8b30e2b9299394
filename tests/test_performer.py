"""Performer's own properties (Choromanski et al. 2021); the contract is in test_contract.py."""

from __future__ import annotations

import math

import pytest
import torch

from attnzoo.layers import build_attention
from attnzoo.layers.performer import favor_attention, official_favor_options, orthogonal_random_features

F64 = dict(dtype=torch.float64)


def randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), **F64) * scale


def softmax_features(x, W, *, shift, feature_eps):
    """phi(x) = M^-1/2 (exp(W x~ - |x~|^2/2 - shift) + eps), written out independently of the layer."""
    xs = x * x.shape[-1] ** -0.25
    u = torch.einsum("bthd,md->bthm", xs, W)
    return W.shape[0] ** -0.5 * (torch.exp(u - xs.square().sum(-1, keepdim=True) / 2 - shift) + feature_eps)


def key_logit_max(k, W):
    ks = k * k.shape[-1] ** -0.25
    return (torch.einsum("bshd,md->bshm", ks, W) - ks.square().sum(-1, keepdim=True) / 2).amax(-1)  # (B, S, H)


@pytest.fixture
def one_thread():
    """Threaded LAPACK QR stalls for seconds on a loaded 2-core machine; one thread takes ~0.1 s for 64 blocks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_softmax_approximation(one_thread):
    """Spec §1 property 2: float64, eps = 0, D = 64, L = 256, q, k ~ N(0, 0.25^2); error ||Y^ - Y|| / ||V||."""
    mean_error = {}
    for M, bound in ((256, 0.01), (4096, 0.003)):
        errors = []
        for seed in range(3):
            q, k = randn(1, 256, 1, 64, seed=seed, scale=0.25), randn(1, 256, 1, 64, seed=seed + 10, scale=0.25)
            v = randn(1, 256, 1, 64, seed=seed + 20)
            W = orthogonal_random_features(M, 64, generator=torch.Generator().manual_seed(seed + 30))
            got, _ = favor_attention(q, k, v, W, causal=False, feature_eps=0.0, denom_eps=0.0)
            attn = torch.softmax(torch.einsum("bthd,bshd->bhts", q, k) / 8, dim=-1)
            ref = torch.einsum("bhts,bshv->bthv", attn, v)
            errors.append(((got - ref).norm() / v.norm()).item())
        assert max(errors) < bound, (M, errors)
        mean_error[M] = sum(errors) / len(errors)
    assert mean_error[4096] < mean_error[256]  # more features, smaller error


@pytest.mark.parametrize("scaling", [0, 1])
def test_orthogonal_blocks_and_row_norms(scaling):
    M, D = 2000, 16  # 125 full blocks; also a truncated last block below
    W = orthogonal_random_features(M, D, scaling=scaling, generator=torch.Generator().manual_seed(0))
    norms = W.norm(dim=1)
    blocks = (W / norms[:, None]).view(M // D, D, D)
    eye = torch.eye(D, **F64).expand_as(blocks)
    torch.testing.assert_close(blocks @ blocks.transpose(1, 2), eye, atol=1e-12, rtol=0)
    if scaling == 1:
        torch.testing.assert_close(norms, torch.full_like(norms, math.sqrt(D)))
    else:  # chi_D norms: E|g|^2 = D, and they vary
        assert abs(norms.square().mean().item() / D - 1) < 0.05 and norms.std() > 0.3
    assert orthogonal_random_features(40, D).shape == (40, D)


def test_sign_corrected_blocks_are_not_sign_biased(one_thread):
    """Uncorrected QR fixes the sign pattern of R, which biases Q (spec: Q[0, 0] < 0 in 100% of 2000 draws)."""
    W = orthogonal_random_features(8 * 400, 8, scaling=1, generator=torch.Generator().manual_seed(0))
    firsts = W[::8, 0]  # first entry of each of the 400 blocks
    assert 0.4 < (firsts > 0).double().mean() < 0.6


def test_redraw_every_interval_training_calls_never_in_eval():
    torch.manual_seed(0)
    layer = build_attention("performer", dim=16, num_heads=2, nb_features=8, feature_redraw_interval=3)
    x = torch.randn(1, 5, 16)
    layer.eval()
    W0 = layer.projection_matrix.clone()
    for _ in range(7):
        layer(x)
    assert torch.equal(layer.projection_matrix, W0) and int(layer.calls_since_redraw) == 0
    layer.train()
    changed = []
    for _ in range(10):
        before = layer.projection_matrix.clone()
        layer(x)
        changed.append(not torch.equal(layer.projection_matrix, before))
    assert changed == [False, False, False, True, False, False, True, False, False, True]
    never = build_attention("performer", dim=16, num_heads=2, nb_features=8, feature_redraw_interval=None).train()
    W0 = never.projection_matrix.clone()
    for _ in range(4):
        never(x)
    assert torch.equal(never.projection_matrix, W0)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_linear_form_equals_explicit_quadratic_form(causal):
    """Feature eps and denominator eps included: query i uses keys shifted by c_i (all real keys if non-causal)."""
    T, H, D, M, eps, delta = 40, 2, 8, 24, 1e-4, 1e-6
    q, k, v = randn(2, T, H, D, seed=0), randn(2, T, H, D, seed=1), randn(2, T, H, D, seed=2)
    W = orthogonal_random_features(M, D, generator=torch.Generator().manual_seed(3))
    got, _ = favor_attention(q, k, v, W, causal=causal, feature_eps=eps, denom_eps=delta)
    xs = q * D**-0.25
    q_shift = torch.einsum("bthd,md->bthm", xs, W).amax(-1, keepdim=True) - xs.square().sum(-1, keepdim=True) / 2
    phi_q = softmax_features(q, W, shift=q_shift, feature_eps=eps)  # (B, T, H, M)
    peak = key_logit_max(k, W)
    c = peak.cummax(1).values if causal else peak.amax(1, keepdim=True).expand_as(peak)  # (B, T, H)
    # phi(k_j) shifted by c_i: (B, I, J, H, M)
    phi_k = (
        T**0
        * M**-0.5
        * (
            torch.exp(
                torch.einsum("bshd,md->bshm", k * D**-0.25, W)[:, None]
                - (k * D**-0.25).square().sum(-1)[:, None, :, :, None] / 2
                - c[:, :, None, :, None]
            )
            + eps
        )
    )
    scores = torch.einsum("bihm,bijhm->bhij", phi_q, phi_k)
    if causal:
        scores = scores * torch.ones(T, T, dtype=torch.bool).tril()
    ref = torch.einsum("bhij,bjhv->bihv", scores, v) / (scores.sum(-1) + delta).transpose(1, 2)[..., None]
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)


def test_causal_chunked_equals_step_and_ignores_the_future():
    torch.manual_seed(0)
    layer = build_attention("performer", dim=16, num_heads=2, causal=True, nb_features=12).double().eval()
    x = torch.randn(2, 70, 16, **F64) * 2  # 70 > one 64-chunk of the kernel
    full = layer(x)
    cache = layer.new_cache(2)
    stepped = torch.cat([layer(x[:, t : t + 1], cache=cache) for t in range(70)], dim=1)
    torch.testing.assert_close(stepped, full, atol=1e-12, rtol=1e-10)
    future = x.clone()
    future[:, 30:] = torch.randn(2, 40, 16, **F64) * 5  # larger keys later: the running max grows
    torch.testing.assert_close(layer(future)[:, :30], full[:, :30], atol=1e-12, rtol=1e-10)
    assert layer.state_size(10) == layer.state_size(10_000) == 2 * (13 * 9 + 1)


def test_official_stabilizer_leaks_the_future_and_cannot_decode():
    """The documented pitfall: performer-pytorch's global key max makes y_i depend on later keys via feature_eps."""
    q, k, v = randn(1, 20, 2, 8, seed=0), randn(1, 20, 2, 8, seed=1), randn(1, 20, 2, 8, seed=2)
    W = orthogonal_random_features(16, 8, generator=torch.Generator().manual_seed(3))
    k2 = k.clone()
    k2[:, 15:] *= 3
    opts = official_favor_options(causal=True)
    a, _ = favor_attention(q, k, v, W, causal=True, **opts)
    b, _ = favor_attention(q, k2, v, W, causal=True, **opts)
    assert (a[:, :15] - b[:, :15]).abs().max() > 1e-9
    layer = build_attention("performer", dim=16, num_heads=2, causal=True, stabilizer="official")
    with pytest.raises(ValueError, match=r"stabilizer='official' .* cannot decode"):
        layer.new_cache(1)


def test_relu_kernel_floor_keeps_outputs_defined():
    """ReLU features are >= feature_eps = 1e-3: with every ReLU dead, attention is uniform over the real keys."""
    torch.manual_seed(0)
    W = torch.ones(6, 4, **F64)  # u = sum of x~: negative inputs give all-dead ReLU features
    q, k, v = -randn(1, 9, 1, 4, seed=0).abs(), -randn(1, 9, 1, 4, seed=1).abs(), randn(1, 9, 1, 4, seed=2)
    for causal in (False, True):
        got, _ = favor_attention(q, k, v, W, causal=causal, kernel="relu", feature_eps=1e-3, denom_eps=0.0)
        ref = v.cumsum(1) / torch.arange(1, 10, **F64)[:, None, None] if causal else v.mean(1, keepdim=True)
        torch.testing.assert_close(got, ref.expand_as(got), atol=1e-12, rtol=1e-12)
    q, k = randn(1, 9, 1, 4, seed=3), randn(1, 9, 1, 4, seed=4)
    W = orthogonal_random_features(6, 4, generator=torch.Generator().manual_seed(5))
    got, _ = favor_attention(q, k, v, W, causal=False, kernel="relu", feature_eps=1e-3, denom_eps=0.0)
    phi = [torch.einsum("bthd,md->bthm", x * 4**-0.25, W).relu() + 1e-3 for x in (q, k)]
    scores = torch.einsum("bthm,bshm->bhts", *phi)
    ref = torch.einsum("bhts,bshv->bthv", scores / scores.sum(-1, keepdim=True), v)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)


def test_large_inputs_stay_finite_in_float32_and_bf16():
    torch.manual_seed(0)
    for causal in (False, True):
        layer = build_attention("performer", dim=32, num_heads=2, causal=causal, nb_features=32)
        x = torch.randn(2, 50, 32) * 30
        x[:, :5] *= 0.01  # early keys far below the later running max
        assert torch.isfinite(layer(x)).all()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(layer(x).float()).all()


def test_bad_options_raise_with_the_valid_values():
    with pytest.raises(ValueError, match="Did you mean 'relu'"):
        build_attention("performer", dim=16, num_heads=2, kernel="reLu")
    with pytest.raises(ValueError, match="ortho_scaling must be 0"):
        build_attention("performer", dim=16, num_heads=2, ortho_scaling=2)


@pytest.mark.parametrize(
    "options",
    [dict(kernel="relu"), dict(eps_placement="key_sum", ortho_scaling=1), dict(feature_eps=0.0, denom_eps=0.0)],
    ids=["relu", "key_sum", "no-eps"],
)
def test_other_options_keep_padding_and_streaming_exact(options):
    """The registry-wide contract runs the defaults only; the options that support decoding keep it exact too."""
    torch.manual_seed(0)
    layer = build_attention("performer", dim=16, num_heads=2, causal=True, nb_features=12, **options).double().eval()
    x = torch.randn(2, 12, 16, **F64)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, [1, 6]] = False
    mask[1, :2] = False
    full = layer(x, padding_mask=mask)
    noisy = torch.where(mask[..., None], x, 5 * torch.randn_like(x))
    torch.testing.assert_close(layer(noisy, padding_mask=mask)[mask], full[mask], atol=1e-12, rtol=1e-10)
    cache = layer.new_cache(2)
    parts = [layer(x[:, :5], padding_mask=mask[:, :5], cache=cache)]
    parts += [layer(x[:, t : t + 1], padding_mask=mask[:, t : t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, 1)[mask], full[mask], atol=1e-12, rtol=1e-10)
