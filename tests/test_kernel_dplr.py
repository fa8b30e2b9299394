"""The DPLR delta rule op: the chunked torch backend against the token-by-token reference (FLA's test layout: output,
final state and every gradient, the initial state's included, odd sizes next to round ones)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnzoo.kernels.dplr import dplr_delta_rule

F64 = torch.float64


def rwkv7_inputs(B, T, H, K, V, dtype=F64, seed=0, log_decay_min=-0.6065306597126334):
    """RWKV-7's shapes of a and b: a = -kappa, b = kappa * alpha (kappa unit-norm per head, alpha in (0, 1)),
    g = log w in (log_decay_min, 0), plus an initial state."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    kappa = F.normalize(randn(B, T, H, K), dim=-1)
    alpha = torch.rand(B, T, H, K, generator=gen, dtype=dtype)
    g = log_decay_min * torch.rand(B, T, H, K, generator=gen, dtype=dtype)
    return dict(
        q=randn(B, T, H, K), k=randn(B, T, H, K) * 0.5, v=randn(B, T, H, V), a=-kappa, b=kappa * alpha, g=g
    ), randn(B, H, K, V)


def run(inputs, state, backend, **kw):
    return dplr_delta_rule(**inputs, initial_state=state, output_final_state=True, backend=backend, **kw)


def assert_close(name, ref, got, atol=1e-10, rtol=1e-10):
    torch.testing.assert_close(got, ref, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


SHAPES = [
    pytest.param(2, 64, 2, 16, 16, 16, id="B2-T64-H2-K16-V16-C16"),
    pytest.param(1, 63, 3, 12, 10, 16, id="B1-T63-H3-K12-V10-C16"),
    pytest.param(2, 37, 1, 8, 20, 8, id="B2-T37-H1-K8-V20-C8"),
    pytest.param(1, 50, 2, 8, 8, 64, id="B1-T50-H2-K8-V8-C64"),
]


@pytest.mark.parametrize("B,T,H,K,V,C", SHAPES)
def test_chunked_matches_reference_forward_and_gradients(B, T, H, K, V, C):
    inputs, state = rwkv7_inputs(B, T, H, K, V)
    leaves = {**inputs, "initial_state": state}
    for t in leaves.values():
        t.requires_grad_(True)
    gen = torch.Generator().manual_seed(5)
    d_o, d_state = torch.randn(B, T, H, V, generator=gen, dtype=F64), torch.randn(B, H, K, V, generator=gen, dtype=F64)
    results = {}
    for backend in ("reference", "torch"):
        o, final = run(inputs, state, backend, chunk_size=C)
        grads = torch.autograd.grad((o * d_o).sum() + (final * d_state).sum(), list(leaves.values()))
        results[backend] = (o, final, grads)
    (o_ref, s_ref, g_ref), (o_got, s_got, g_got) = results["reference"], results["torch"]
    assert_close("o", o_ref, o_got)
    assert_close("final_state", s_ref, s_got)
    for name, ref, got in zip(leaves, g_ref, g_got):
        assert_close(f"d{name}", ref, got, atol=1e-9, rtol=1e-9)


def test_general_low_rank_vectors_and_default_scale():
    """Arbitrary a, b (not RWKV-7's tied form) and FLA's default scale K^-1/2."""
    gen = torch.Generator().manual_seed(3)
    B, T, H, K, V = 2, 40, 2, 8, 6
    inputs = {n: torch.randn(B, T, H, K, generator=gen, dtype=F64) * 0.3 for n in ("q", "k", "a", "b")}
    inputs["v"] = torch.randn(B, T, H, V, generator=gen, dtype=F64)
    inputs["g"] = -torch.rand(B, T, H, K, generator=gen, dtype=F64)
    o_ref, s_ref = dplr_delta_rule(**inputs, output_final_state=True, backend="reference")
    o_got, s_got = dplr_delta_rule(**inputs, output_final_state=True, backend="torch", chunk_size=16)
    assert_close("o", o_ref, o_got)
    assert_close("final_state", s_ref, s_got)
    unscaled, _ = dplr_delta_rule(**inputs, scale=1.0, backend="reference")
    assert_close("scale", unscaled * K**-0.5, o_ref)


def test_reduces_to_the_delta_rule():
    """a = -k, b = beta k, written key beta k and g = 0 give S_t = S_{t-1} + beta_t k_t^T (v_t - k_t S_{t-1}): the
    delta rule (Yang et al. 2024), checked against its own recurrence."""
    gen = torch.Generator().manual_seed(4)
    B, T, H, K, V = 1, 30, 2, 8, 8
    q, v = torch.randn(B, T, H, K, generator=gen, dtype=F64), torch.randn(B, T, H, V, generator=gen, dtype=F64)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=F64), dim=-1)
    beta = torch.rand(B, T, H, 1, generator=gen, dtype=F64)
    o, _ = dplr_delta_rule(q, beta * k, v, -k, beta * k, torch.zeros_like(k), scale=1.0, backend="torch")
    state, expected = torch.zeros(B, H, K, V, dtype=F64), []
    for t in range(T):
        k_t, b_t = k[:, t], beta[:, t]
        state = state + (b_t * k_t)[..., None] * (v[:, t] - torch.einsum("bhk,bhkv->bhv", k_t, state))[..., None, :]
        expected.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    assert_close("o", torch.stack(expected, 1), o)


def test_split_sequence_with_initial_state_equals_whole():
    inputs, state = rwkv7_inputs(2, 70, 2, 8, 8, seed=1)
    whole, final = run(inputs, state, "torch")
    first, mid = run({n: t[:, :33] for n, t in inputs.items()}, state, "torch")
    second, end = run({n: t[:, 33:] for n, t in inputs.items()}, mid, "torch")
    assert_close("o", whole, torch.cat([first, second], 1))
    assert_close("final_state", final, end)


def test_strong_decay_stays_finite_in_float32():
    """Log decays of -30 per step accumulate to -1920 over a 64-chunk: the pairwise form never forms e^{-G}."""
    inputs, state = rwkv7_inputs(1, 128, 2, 16, 16, dtype=torch.float32, seed=2)
    inputs["g"] = torch.full_like(inputs["g"], -30.0)
    inputs["g"][:, ::7] = 0.0  # some steps keep the state, so it is not simply erased
    ref, ref_state = run({n: t.double() for n, t in inputs.items()}, state.double(), "reference")
    got, got_state = run(inputs, state, "torch", chunk_size=64)
    assert torch.isfinite(got).all() and torch.isfinite(got_state).all()
    assert_close("o", ref.float(), got, atol=1e-4, rtol=1e-4)
    assert_close("final_state", ref_state.float(), got_state, atol=1e-4, rtol=1e-4)


def test_float32_long_sequence_matches_float64_reference():
    inputs, state = rwkv7_inputs(1, 200, 2, 16, 16, dtype=torch.float32, seed=6)
    ref, ref_state = run({n: t.double() for n, t in inputs.items()}, state.double(), "reference")
    got, got_state = run(inputs, state, "torch")
    assert got.dtype == torch.float32 and got_state.dtype == torch.float32
    assert_close("o", ref, got.double(), atol=1e-5 * ref.abs().max().item(), rtol=1e-4)
    assert_close("final_state", ref_state, got_state.double(), atol=1e-5 * ref_state.abs().max().item(), rtol=1e-4)


def test_padded_positions_change_nothing():
    """Zero k, v, a, b and g at a position: the state passes it unchanged (what the layers do for padding)."""
    inputs, state = rwkv7_inputs(1, 40, 2, 8, 8, seed=7)
    holes = torch.zeros(40, dtype=torch.bool)
    holes[[3, 17, 18, 39]] = True
    padded = {n: (t if n == "q" else t.masked_fill(holes[None, :, None, None], 0.0)) for n, t in inputs.items()}
    o, final = run(padded, state, "torch")
    o_kept, final_kept = run({n: t[:, ~holes] for n, t in inputs.items()}, state, "torch")
    assert_close("o", o_kept, o[:, ~holes])
    assert_close("final_state", final_kept, final)


def test_bad_inputs_raise():
    inputs, _ = rwkv7_inputs(1, 8, 2, 4, 4)
    with pytest.raises(ValueError, match=r"b must have shape \(B, T, H, K\) = \(1, 8, 2, 4\) like q; got \(1, 8, 2\)"):
        dplr_delta_rule(**{**inputs, "b": inputs["b"][..., 0]})
    with pytest.raises(ValueError, match="initial_state must have shape"):
        dplr_delta_rule(**inputs, initial_state=torch.zeros(1, 2, 4, 5, dtype=F64))
    with pytest.raises(ValueError, match="chunk_size must be a positive power of two"):
        dplr_delta_rule(**inputs, chunk_size=12)
    with pytest.raises(ValueError, match="no triton backend yet"):
        dplr_delta_rule(**inputs, backend="triton")
    with pytest.raises(TypeError, match="g must be a floating-point tensor"):
        dplr_delta_rule(**{**inputs, "g": inputs["g"].long()})
