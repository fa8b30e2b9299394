"""attnzoo.kernels.linear_attn: every backend against the quadratic reference (FLA style: output, final state and every
gradient including the initial state's, odd sizes, T not a multiple of the chunk), plus its documented semantics."""

from __future__ import annotations

import pytest
import torch

from attnzoo.kernels import linear_attn, triton_available

# (B, T, H, K, V, chunk): round and awkward sizes; T=63 and T=100 are not multiples of the chunk
SHAPES = [
    pytest.param(*s, id="B{}-T{}-H{}-K{}-V{}-C{}".format(*s))
    for s in [(2, 64, 2, 16, 16, 16), (1, 63, 3, 60, 12, 16), (2, 100, 1, 8, 20, 32), (1, 1, 2, 4, 4, 64)]
]


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, ratio: float) -> None:
    """Relative RMS error of ``got`` against ``ref`` below ``ratio`` (FLA's check), with a named message."""
    err = (ref - got).float().pow(2).mean().sqrt() / ref.float().pow(2).mean().sqrt().clamp_min(1e-30)
    assert err <= ratio, f"{name}: relative RMS error {err:.3e} > {ratio:.1e}"


def make_inputs(B, T, H, K, V, *, normalize, dtype=torch.float64, seed=0, S=None):
    gen = torch.Generator().manual_seed(seed)
    S = T if S is None else S
    # positive features as a caller's feature map would give, so the normalised denominator stays away from zero
    q = torch.rand(B, T, H, K, generator=gen, dtype=dtype)
    k = torch.rand(B, S, H, K, generator=gen, dtype=dtype)
    v = torch.randn(B, S, H, V, generator=gen, dtype=dtype)
    state = torch.rand(B, H, K, V + int(normalize), generator=gen, dtype=dtype)
    return [t.requires_grad_(True) for t in (q, k, v, state)]


def run_with_grads(backend, q, k, v, state, *, causal, normalize, chunk_size=16):
    o, final = linear_attn(
        q,
        k,
        v,
        causal=causal,
        normalize=normalize,
        initial_state=state,
        output_final_state=True,
        chunk_size=chunk_size,
        backend=backend,
    )
    gen = torch.Generator().manual_seed(123)
    do, dfinal = torch.randn(o.shape, generator=gen, dtype=o.dtype), torch.randn(final.shape, generator=gen)
    loss = (o * do).sum() + (final * dfinal.to(final.dtype)).sum()
    grads = torch.autograd.grad(loss, (q, k, v, state))
    return dict(zip(("o", "state", "dq", "dk", "dv", "dstate"), (o, final, *grads)))


@pytest.mark.parametrize("B,T,H,K,V,chunk", SHAPES)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "norm"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_torch_matches_reference(B, T, H, K, V, chunk, normalize, causal):
    inputs = make_inputs(B, T, H, K, V, normalize=normalize)
    ref = run_with_grads("reference", *inputs, causal=causal, normalize=normalize)
    got = run_with_grads("torch", *inputs, causal=causal, normalize=normalize, chunk_size=chunk)
    for name in ref:
        assert_close(name, ref[name], got[name], 1e-12)


@pytest.mark.parametrize("chunk", [1, 7, 16, 64, 128])
def test_chunk_size_invariance(chunk):
    inputs = make_inputs(1, 50, 2, 8, 8, normalize=True)
    ref = run_with_grads("torch", *inputs, causal=True, normalize=True, chunk_size=16)
    got = run_with_grads("torch", *inputs, causal=True, normalize=True, chunk_size=chunk)
    for name in ref:
        assert_close(name, ref[name], got[name], 1e-12)


@pytest.mark.parametrize(
    "backend,normalize",
    [("reference", False), ("torch", False), ("torch", True), ("triton", True)],
    ids=["reference-raw", "torch-raw", "torch-norm", "triton-norm"],
)
def test_initial_state_continues_the_sequence(backend, normalize):
    if backend == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    q, k, v, _ = make_inputs(2, 37, 2, 6, 5, normalize=normalize)
    full, full_state = linear_attn(
        q, k, v, causal=True, normalize=normalize, output_final_state=True, backend=backend, chunk_size=8
    )
    t = 20
    first, state = linear_attn(
        q[:, :t], k[:, :t], v[:, :t], causal=True, normalize=normalize, output_final_state=True, backend=backend
    )
    second, state = linear_attn(
        q[:, t:],
        k[:, t:],
        v[:, t:],
        causal=True,
        normalize=normalize,
        initial_state=state,
        output_final_state=True,
        backend=backend,
        chunk_size=8,
    )
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(state, full_state, atol=1e-12, rtol=1e-12)


def test_matches_explicit_recurrence():
    """The documented semantics, spelled out as a per-token loop: S_t = S_{t-1} + k_t^T v_t, o_t = q_t S_t / q_t z_t."""
    q, k, v, _ = make_inputs(1, 9, 2, 3, 4, normalize=True)
    eps = 1e-6
    S, z, outs = torch.zeros(1, 2, 3, 4, dtype=q.dtype), torch.zeros(1, 2, 3, dtype=q.dtype), []
    for t in range(9):
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        z = z + k[:, t]
        num = torch.einsum("bhk,bhkv->bhv", q[:, t], S)
        outs.append(num / (torch.einsum("bhk,bhk->bh", q[:, t], z)[..., None] + eps))
    got, state = linear_attn(q, k, v, causal=True, eps=eps, output_final_state=True, chunk_size=4)
    torch.testing.assert_close(got, torch.stack(outs, 1), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(state, torch.cat([S, z[..., None]], -1), atol=1e-12, rtol=1e-12)


def test_noncausal_cross_lengths():
    q, k, v, _ = make_inputs(2, 5, 2, 4, 3, normalize=False, S=11)
    ref, _ = linear_attn(q, k, v, causal=False, backend="reference")
    got, _ = linear_attn(q, k, v, causal=False, backend="torch")
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_half_precision_accumulates_in_float32(backend):
    q, k, v, _ = make_inputs(1, 200, 2, 16, 8, normalize=True, dtype=torch.float32)
    ref, _ = linear_attn(q, k, v, causal=True, output_final_state=True, backend=backend)
    o, state = linear_attn(
        q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True, output_final_state=True, backend=backend
    )
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert torch.isfinite(o.float()).all()
    assert_close("o", ref, o.float(), 2e-2)  # bf16 inputs; accumulation error would grow with T if it were bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o_auto, state_auto = linear_attn(q, k, v, causal=True, output_final_state=True, backend=backend)
    assert o_auto.dtype == torch.float32 and state_auto.dtype == torch.float32
    assert_close("o (autocast)", ref, o_auto, 1e-5)


def test_bad_inputs_raise_with_expected_shapes():
    q, k, v, _ = make_inputs(2, 8, 2, 4, 3, normalize=False)
    with pytest.raises(ValueError, match=r"k must have shape \(B, S, H, K\) = \(2, S, 2, 4\)"):
        linear_attn(q, k[..., :3], v, causal=False)
    with pytest.raises(ValueError, match=r"causal=True .* S=5"):
        linear_attn(q, k[:, :5], v[:, :5], causal=True)
    with pytest.raises(ValueError, match=r"initial_state must have shape .*\(2, 2, 4, 4\)"):
        linear_attn(q, k, v, causal=True, initial_state=torch.zeros(2, 2, 4, 3))
    with pytest.raises(ValueError, match="unknown backend 'toch'"):
        linear_attn(q, k, v, causal=True, backend="toch")


# Triton under TRITON_INTERPRET=1 (tests/conftest.py) is slow: a few tiny, awkward shapes
TRITON_CASES = [
    pytest.param(1, 33, 2, 20, 5, 16, True, True, torch.float64, id="B1-T33-H2-K20-V5-causal-norm-f64"),
    pytest.param(2, 40, 1, 8, 12, 16, True, False, torch.float32, id="B2-T40-H1-K8-V12-causal-raw-f32"),
    pytest.param(1, 24, 2, 6, 7, 16, False, True, torch.float64, id="B1-T24-H2-K6-V7-noncausal-norm-f64"),
]


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("B,T,H,K,V,chunk,causal,normalize,dtype", TRITON_CASES)
def test_triton_matches_reference(B, T, H, K, V, chunk, causal, normalize, dtype):
    inputs = make_inputs(B, T, H, K, V, normalize=normalize, dtype=dtype)
    ref = run_with_grads("reference", *inputs, causal=causal, normalize=normalize)
    got = run_with_grads("triton", *inputs, causal=causal, normalize=normalize, chunk_size=chunk)
    ratio = 1e-12 if dtype == torch.float64 else 1e-5
    for name in ref:
        assert_close(name, ref[name], got[name], ratio)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_noncausal_cross_lengths():
    q, k, v, _ = make_inputs(1, 5, 2, 4, 3, normalize=False, S=19)
    ref = torch.autograd.grad(linear_attn(q, k, v, causal=False, backend="reference")[0].sum(), (q, k, v))
    got = torch.autograd.grad(linear_attn(q, k, v, causal=False, backend="triton")[0].sum(), (q, k, v))
    for name, a, b in zip(("dq", "dk", "dv"), ref, got):
        assert_close(name, a, b, 1e-12)


@pytest.mark.parametrize("chunks", [0, 1, 5, 16, 17, 50])  # none, one block, a partial block, exact blocks, padding
@pytest.mark.parametrize("with_initial", [False, True], ids=["zero-start", "start"])
def test_blocked_running_sums_equal_cumulative_sums(chunks, with_initial):
    from attnzoo.kernels.linear_attn.chunked import _running_sums

    gen = torch.Generator().manual_seed(chunks)
    parts = torch.randn(chunks, 3, 4, generator=gen, dtype=torch.float64)
    start = torch.randn(3, 4, generator=gen, dtype=torch.float64) if with_initial else torch.zeros(3, 4).double()
    prefix = torch.cat([start[None], start + parts.cumsum(0)])  # start + sum over m < n, n = 0 .. N
    sums = _running_sums(parts, start if with_initial else None, reverse=False)
    torch.testing.assert_close(sums, prefix, atol=1e-12, rtol=0)
    suffix = torch.cat([start + parts.flip(0).cumsum(0).flip(0), start[None]])  # start + sum over m >= n
    sums = _running_sums(parts, start if with_initial else None, reverse=True)
    torch.testing.assert_close(sums, suffix, atol=1e-12, rtol=0)


@pytest.mark.parametrize("T", [5, 8, 16, 21], ids=lambda t: f"T{t}")  # 1, 1, 2 and 3 chunks of 8
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "norm"])
@pytest.mark.parametrize("with_initial", [False, True], ids=["zero-start", "start"])
@pytest.mark.parametrize("loss_on", ["output", "state", "both"])
def test_skipped_state_products_change_nothing(T, normalize, with_initial, loss_on):
    """The chunked path leaves out the state GEMMs of a zero start, an unrequested final state and an unused final
    state's gradient: every combination against the reference, values and gradients."""
    q, k, v, state = make_inputs(2, T, 2, 6, 5, normalize=normalize, seed=T)
    initial = state if with_initial else None
    want_state = loss_on != "output"
    gen = torch.Generator().manual_seed(7)
    results = {}
    for backend in ("reference", "torch"):
        o, final = linear_attn(
            q, k, v, causal=True, normalize=normalize, initial_state=initial, output_final_state=want_state,
            chunk_size=8, backend=backend,
        )  # fmt: skip
        assert (final is None) == (not want_state)
        loss = 0
        if loss_on != "state":
            loss = loss + (o * torch.randn(o.shape, generator=gen.manual_seed(1), dtype=o.dtype)).sum()
        if want_state:
            loss = loss + (final * torch.randn(final.shape, generator=gen.manual_seed(2), dtype=final.dtype)).sum()
        inputs = (q, k, v, state) if with_initial else (q, k, v)
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)  # the state alone does not depend on q
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
        results[backend] = (o, *(() if final is None else (final,)), *grads)
    for i, (ref, got) in enumerate(zip(*results.values())):
        assert_close(f"result {i}", ref, got, 1e-12)
