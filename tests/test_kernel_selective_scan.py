"""selective_scan: the chunked torch form (and Triton under TRITON_INTERPRET=1) against the sequential reference.

Follows FLA's kernel tests: ``ref`` vs ``got`` for the output, the last state and every gradient (u, delta, A, B, C, D,
z, delta_bias, initial_state), odd sizes, fixed seeds. Plus the selective scan's own properties (Gu & Dao 2023).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnzoo.kernels import selective_scan, triton_available
from attnzoo.kernels.selective_scan.chunked import selective_scan_chunked

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(batch=2, E=12, N=8, L=63, G=None, dtype=torch.float64, seed=0, delta_scale=1.0):
    """Mamba-like inputs: delta = softplus(raw + bias) with typical init steps, A = -exp(A_log)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    bc_shape = (batch, N, L) if G is None else (batch, G, N, L)
    return dict(
        u=randn(batch, E, L),
        delta=randn(batch, E, L) * delta_scale,
        A=-torch.exp(randn(E, N) * 0.5 + 1.0),
        B=randn(*bc_shape),
        C=randn(*bc_shape),
        D=randn(E),
        z=randn(batch, E, L),
        delta_bias=randn(E) - 2.0,
        initial_state=randn(batch, E, N),
    )


def run(inputs, backend, grad=True, **kw):
    leaves = {k: v.clone().requires_grad_(grad) for k, v in inputs.items()}
    out, last = selective_scan(
        **{k: leaves[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")},
        delta_softplus=True,
        return_last_state=True,
        initial_state=leaves["initial_state"],
        backend=backend,
        **kw,
    )
    grads = {}
    if grad:
        gen = torch.Generator().manual_seed(123)
        # drawn in float64 so every dtype gets the same cotangents
        d_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
        d_last = torch.randn(last.shape, generator=gen, dtype=torch.float64).to(last.dtype)
        ((out * d_out).sum() + (last * d_last).sum()).backward()
        grads = {k: v.grad for k, v in leaves.items()}
    return out, last, grads


def assert_close(name, ref, got, tol):
    """Relative error in the FLA style: max-abs error over the reference's max-abs, plus a floor."""
    err = (ref - got).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= tol * max(scale, 1.0), f"{name}: max abs err {err:.3g} vs scale {scale:.3g} (tol {tol})"


def assert_all_close(ref, got, tol):
    """Output, last state and every input's gradient of two ``run`` results."""
    assert_close("out", ref[0], got[0], tol)
    assert_close("last_state", ref[1], got[1], tol)
    for name in NAMES:
        assert_close(f"d{name}", ref[2][name], got[2][name], tol)


@pytest.fixture(params=["stepwise", "doubling"])
def unsafe_form(request, monkeypatch):
    """How (chunk, channel) rows that fail the factored bound are computed: segments with any such row take the
    stepwise form (STEPWISE_SHARE 0), or the rows are gathered for the doubling scan (STEPWISE_SHARE 1). float64
    runs get float32's factor limit, so that they fail the rows a float32 run would (and compare at 1e-10)."""
    import sys

    chunked = sys.modules["attnzoo.kernels.selective_scan.chunked"]
    monkeypatch.setattr(chunked, "STEPWISE_SHARE", 0.0 if request.param == "stepwise" else 1.0)
    limit32 = chunked.FACTOR_LIMIT[torch.float32]
    monkeypatch.setattr(chunked, "FACTOR_LIMIT", {torch.float64: limit32, torch.float32: limit32})
    return request.param


CASES = [
    pytest.param(dict(L=63), id="B2-E12-N8-L63"),
    pytest.param(dict(L=130, E=16, N=16), id="B2-E16-N16-L130"),
    pytest.param(dict(L=40, G=3), id="grouped-G3-L40"),
    pytest.param(dict(L=1, batch=1), id="L1"),
]


@pytest.mark.parametrize("shape", CASES)
def test_chunked_matches_reference_float64(shape):
    inputs = make_inputs(**shape)
    ref = run(inputs, "reference")
    got = run(inputs, "torch", chunk_size=32)
    assert_all_close(ref, got, 1e-10)


def test_chunked_matches_reference_float32():
    inputs = make_inputs(L=100, E=16, N=16, dtype=torch.float32)
    ref64 = run({k: v.double() for k, v in inputs.items()}, "reference")
    got = run(inputs, "torch")
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert_close("out", ref64[0], got[0].double(), 1e-4)
    assert_close("last_state", ref64[1], got[1].double(), 1e-4)
    for name in NAMES:
        assert_close(f"d{name}", ref64[2][name], got[2][name].double(), 1e-4)


@pytest.mark.parametrize("delta_scale", [1.0, 30.0], ids=["typical", "huge-steps"])
def test_unsafe_rows_match_reference(delta_scale, unsafe_form):
    """factor_limit=0 fails every row (stepwise form, or the doubling scan for each row); huge steps fail rows by
    themselves."""
    inputs = make_inputs(L=45, delta_scale=delta_scale)
    delta = F.softplus(inputs["delta"] + inputs["delta_bias"][:, None])
    args = (inputs["u"], delta, inputs["A"], inputs["B"][:, None], inputs["C"][:, None], inputs["initial_state"])
    ref = selective_scan(*args[:5], return_last_state=True, initial_state=args[5], backend="reference")
    for limit in (0.0, None):
        y, last = selective_scan_chunked(*args, 32, limit)
        assert_close("y", ref[0], y, 1e-10)
        assert_close("last_state", ref[1], last, 1e-10)


def test_every_row_unsafe_gradients_match_reference(monkeypatch, unsafe_form):
    """A factor limit of 0 fails every row: the stepwise form (or the doubling scan) everywhere, gradients included."""
    import sys

    chunked = sys.modules["attnzoo.kernels.selective_scan.chunked"]
    monkeypatch.setattr(chunked, "FACTOR_LIMIT", {torch.float64: 0.0, torch.float32: 0.0})
    inputs = make_inputs(L=45, E=6)
    ref = run(inputs, "reference")
    got = run(inputs, "torch", chunk_size=8)
    assert_all_close(ref, got, 1e-10)


def test_mixed_safe_and_unsafe_channels_gradients(unsafe_form):
    """Half the channels take huge steps (stepwise form or doubling scan), half small: values and gradients match."""
    inputs = make_inputs(L=50, E=8)
    inputs["delta"][:, ::2] += 8.0
    ref = run(inputs, "reference")
    got = run(inputs, "torch", chunk_size=16)
    assert_close("out", ref[0], got[0], 1e-10)
    for name in NAMES:
        assert_close(f"d{name}", ref[2][name], got[2][name], 1e-10)


@pytest.mark.parametrize("segment_steps", [8, 24], ids=["segments-of-8", "segments-of-24"])
def test_segments_match_reference_with_gradients(monkeypatch, segment_steps, unsafe_form):
    """The forward and the hand-written backward carry state and adjoint across segments (cache-sized blocks of the
    sequence): every gradient matches the reference with the sequence split into many segments, huge steps included."""
    import sys

    chunked = sys.modules["attnzoo.kernels.selective_scan.chunked"]
    inputs = make_inputs(L=61, E=6, N=4)
    inputs["delta"][:, ::3] += 8.0  # some (chunk, channel) rows fail the factored bound
    monkeypatch.setattr(chunked, "SEGMENT_ELEMENTS", 2 * 6 * 4 * segment_steps)  # batch x E x N x steps
    ref = run(inputs, "reference")
    got = run(inputs, "torch", chunk_size=8)
    assert_all_close(ref, got, 1e-10)


def test_backward_keeps_no_per_state_activations():
    """Saved for backward: the inputs and one state per segment, not the (batch, L, E, N) states."""
    x = make_inputs(batch=1, E=64, N=16, L=512, dtype=torch.float32)
    leaves = {k: v.clone().requires_grad_() for k, v in x.items() if k in ("u", "delta", "A", "B", "C")}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = selective_scan(**leaves, delta_softplus=True, backend="torch")
    states = 64 * 16 * 512
    assert sum(saved) < states / 4, f"{sum(saved)} numbers saved for backward; the states alone are {states}"
    out.sum().backward()
    assert all(torch.isfinite(v.grad).all() for v in leaves.values())


def test_chunk_size_invariance():
    inputs = make_inputs(L=100)
    outs = [run(inputs, "torch", grad=False, chunk_size=c)[:2] for c in (7, 16, 64, 100, 256)]
    for out, last in outs[1:]:
        torch.testing.assert_close(out, outs[0][0], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(last, outs[0][1], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_initial_state_continues_the_scan(backend):
    """run(u[..., :t]) then run(u[..., t:], initial_state=last) == run(u): what cached decoding relies on."""
    x = make_inputs(L=70)
    seq = ("u", "delta", "z")

    def part(t):
        kw = {k: (x[k][..., t] if k in seq else x[k]) for k in ("u", "delta", "z", "D", "delta_bias")}
        return kw | {"A": x["A"], "B": x["B"][..., t], "C": x["C"][..., t]}

    full, last = selective_scan(**part(slice(None)), delta_softplus=True, return_last_state=True, backend=backend)
    first, mid = selective_scan(**part(slice(0, 33)), delta_softplus=True, return_last_state=True, backend=backend)
    second, end = selective_scan(
        **part(slice(33, None)), delta_softplus=True, return_last_state=True, initial_state=mid, backend=backend
    )
    torch.testing.assert_close(torch.cat([first, second], -1), full, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(end, last, atol=1e-10, rtol=1e-10)


def test_equals_gla_recurrence():
    """Spec §6: per channel e the scan is GLA with q = C_t, k = B_t, v = delta_t[e] u_t[e], log decay delta_t A[e]."""
    x = make_inputs(L=30, E=6, N=5)
    u, A, B, C = x["u"], x["A"], x["B"], x["C"]
    delta = F.softplus(x["delta"])
    got = selective_scan(u, delta, A, B, C, backend="torch")
    # tiny GLA recurrence, (batch, heads=E, K=N, V=1) state, scale 1: S_t = diag(exp g_t) S_{t-1} + k_t^T v_t
    batch, E, L = u.shape
    state = torch.zeros(batch, E, A.shape[1], 1, dtype=u.dtype)
    outs = []
    for t in range(L):
        q = C[:, None, :, t].expand(batch, E, -1)  # (batch, E, N), shared across channels
        k = B[:, None, :, t].expand(batch, E, -1)
        v = (delta[..., t] * u[..., t])[..., None]  # (batch, E, 1)
        g = delta[..., t, None] * A  # (batch, E, N) log decay
        state = torch.exp(g)[..., None] * state + k[..., None] * v[:, :, None, :]
        outs.append((q[:, :, None, :] @ state)[:, :, 0, 0])
    torch.testing.assert_close(got, torch.stack(outs, -1), atol=1e-10, rtol=1e-10)


def test_causality():
    """Changing inputs after position 25 leaves earlier outputs unchanged (to rounding: the chunk's pivot sees the
    whole chunk, so the last bits of earlier positions in the same chunk may move)."""
    x = make_inputs(L=40)
    kw = dict(delta_softplus=True, backend="torch", chunk_size=16)
    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    out = selective_scan(*args, **kw)
    changed = [a.clone() for a in args]
    for i in (0, 1, 4, 6):  # u, delta, C, z after position 25
        changed[i][..., 25:] += 5.0
    changed[3][..., 25:] += 5.0  # B
    out2 = selective_scan(*changed, **kw)
    torch.testing.assert_close(out[..., :25], out2[..., :25], atol=1e-12, rtol=1e-12)
    assert not torch.allclose(out[..., 25:], out2[..., 25:])


def test_extreme_steps_are_finite_and_exact():
    """delta -> 0 (state kept) and delta huge (state reset every step) stay finite and match the reference."""
    x = make_inputs(L=50, E=4)
    delta = torch.cat([torch.full((2, 2, 50), 1e-8), torch.full((2, 2, 50), 1e4)], dim=1).double()
    args = (x["u"], delta, x["A"], x["B"], x["C"])
    ref = selective_scan(*args, return_last_state=True, initial_state=x["initial_state"], backend="reference")
    got = selective_scan(*args, return_last_state=True, initial_state=x["initial_state"], backend="torch")
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    assert_close("out", ref[0], got[0], 1e-10)
    assert_close("last_state", ref[1], got[1], 1e-10)


def test_autocast_bf16_state_is_float32():
    x = make_inputs(L=20, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, last = selective_scan(x["u"].bfloat16(), x["delta"], x["A"], x["B"], x["C"], return_last_state=True)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32 and torch.isfinite(out.float()).all()


@pytest.mark.slow
def test_long_sequence_bf16_autocast_finite():
    x = make_inputs(batch=1, E=32, N=16, L=16384, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, last = selective_scan(
            x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True, True
        )
    assert torch.isfinite(out.float()).all() and torch.isfinite(last).all()


def test_bad_inputs_raise():
    x = make_inputs(L=10)
    u, delta, A, B, C = x["u"], x["delta"], x["A"], x["B"], x["C"]
    with pytest.raises(ValueError, match=r"delta must have u's shape"):
        selective_scan(u, delta[..., :-1], A, B, C)
    with pytest.raises(ValueError, match=r"A must have shape \(E, N\) = \(12, N\)"):
        selective_scan(u, delta, A[:-1], B, C)
    with pytest.raises(ValueError, match=r"B must have shape \(batch, N, L\)"):
        selective_scan(u, delta, A, B[:, :-1], C)
    with pytest.raises(ValueError, match=r"grouped \(batch, G, N, L\) with G dividing E"):
        selective_scan(u, delta, A, B, C.unsqueeze(1).expand(2, 5, 8, 10))
    with pytest.raises(ValueError, match="complex A is not supported"):
        selective_scan(u, delta, A.to(torch.complex128), B, C)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        selective_scan(u, delta, A, B, C, initial_state=torch.zeros(2, 12, 3))
    with pytest.raises(ValueError, match="unknown backend 'trition'"):
        selective_scan(u, delta, A, B, C, backend="trition")


def test_time_invariant_B_C_match_expanded():
    x = make_inputs(L=20, E=6, N=4)
    Bti = torch.randn(6, 4, dtype=torch.float64)
    got = selective_scan(x["u"], x["delta"].sigmoid(), x["A"], Bti, x["C"], backend="torch")
    grouped = Bti[None, :, :, None].expand(2, 6, 4, 20)
    ref = selective_scan(x["u"], x["delta"].sigmoid(), x["A"], grouped, x["C"], backend="reference")
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)


# the interpreter is slow: tiny default cases (N not a power of two, L not a multiple of the chunk, several chunks),
# larger ones slow-marked
TRITON_CASES = [
    pytest.param(dict(batch=1, L=11, E=4, N=3), torch.float64, id="B1-E4-N3-L11-f64"),
    pytest.param(dict(batch=2, L=9, E=4, N=4, G=2), torch.float32, id="grouped-G2-L9-f32"),
    pytest.param(dict(L=37, E=12, N=5), torch.float32, id="B2-E12-N5-L37-f32", marks=pytest.mark.slow),
    pytest.param(dict(L=40, E=12, N=8, G=3), torch.float64, id="grouped-G3-L40-f64", marks=pytest.mark.slow),
]


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("shape,dtype", TRITON_CASES)
def test_triton_matches_reference(shape, dtype):
    """Forward and backward Triton kernels (TRITON_INTERPRET=1 on CPU) against the float64 reference."""
    inputs = make_inputs(**shape, dtype=dtype)
    ref = run({k: v.double() for k, v in inputs.items()}, "reference")
    got = run(inputs, "triton", chunk_size=4)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert_close("out", ref[0], got[0].double(), tol)
    assert_close("last_state", ref[1], got[1].double(), tol)
    for name in NAMES:
        assert_close(f"d{name}", ref[2][name], got[2][name].double(), tol)


def test_large_steps_shrink_the_chunk_instead_of_gathering_rows():
    """Trained Mamba steps (delta ~ 0.5, |A| up to 16) fail the factored bound in chunks of 32 and 16 but not of 8:
    the chunk is halved to 8 (no gathered rows, same numbers); initialisation-sized steps keep the chunk of 32."""
    from attnzoo.kernels.selective_scan.chunked import _safe_chunk

    A = -torch.arange(1, 17, dtype=torch.float64).repeat(6, 1)  # (E, N): A_log = ln(1..16)
    trained = torch.full((2, 6, 64), 0.5, dtype=torch.float64)
    assert _safe_chunk(trained, A, 32, 60.0) == 8  # spans 32 x 0.5 x 16 / 2 = 128, then 64, then 32
    assert _safe_chunk(trained * 0.2, A, 32, 60.0) == 32  # 32 x 0.1 x 16 / 2 = 25.6: safe as it is
    assert _safe_chunk(trained, A, 32, 0.0) == 32  # factor_limit 0 (every row gathered) is left alone
    inputs = make_inputs(E=6, N=16, L=64)
    inputs["A"] = A
    delta = torch.full_like(inputs["u"], 0.5)
    args = (inputs["u"], delta, A, inputs["B"][:, None], inputs["C"][:, None], inputs["initial_state"])
    ref = selective_scan(*args[:5], return_last_state=True, initial_state=args[5], backend="reference")
    y, last = selective_scan_chunked(*args, 32)
    assert_close("y", ref[0], y, 1e-10)
    assert_close("last_state", ref[1], last, 1e-10)


@pytest.mark.parametrize("length", [1, 2, 5, 8, 13, 32])
def test_doubling_scan_matches_the_sequential_recurrence(length):
    """The rows' fallback: h_t = exp(A (D_t - D_{t-1})) h_{t-1} + x_t from h = 0, for any chunk length, and finite in
    float32 with steps whose decays underflow (exp(-16 x 40))."""
    from attnzoo.kernels.selective_scan.chunked import _doubling_scan

    gen = torch.Generator().manual_seed(length)
    rows, N = 7, 5
    steps = torch.rand(rows, length, generator=gen, dtype=torch.float64) * 3
    steps[::2] *= 40  # huge steps on some rows
    D = steps.cumsum(1)
    x = torch.randn(rows, length, N, generator=gen, dtype=torch.float64)
    A = -torch.rand(rows, N, generator=gen, dtype=torch.float64) * 16
    D, x, A = (v.float().double() for v in (D, x, A))  # float32-exact inputs: only the scan's rounding differs

    def recurrence(D: torch.Tensor) -> torch.Tensor:
        h, states = torch.zeros(rows, N, dtype=torch.float64), []
        for t in range(length):
            decay = torch.exp(A * (D[:, t] - D[:, t - 1])[:, None]) if t else torch.ones_like(A)
            h = decay * h + x[:, t]
            states.append(h)
        return torch.stack(states, 1)

    assert_close("h", recurrence(D), _doubling_scan(D, x, A), 1e-12)
    got32 = _doubling_scan(D.float(), x.float(), A.float())
    assert torch.isfinite(got32).all()
    assert_close("h float32", recurrence(D), got32.double(), 1e-5)


def test_chunk_shrinks_until_one_chunk_fits_a_segment():
    """Large batch x E x N: the chunk is halved (not below CACHE_CHUNK_MIN) until a chunk of states fits
    SEGMENT_ELEMENTS; small ones keep the requested chunk."""
    from attnzoo.kernels.selective_scan.chunked import CACHE_CHUNK_MIN, SEGMENT_ELEMENTS, _cache_chunk

    assert _cache_chunk(32, 2048) == 32  # batch 1, E = 128, N = 16
    assert _cache_chunk(32, SEGMENT_ELEMENTS // 8) == 8  # batch 64, E = 128, N = 16
    assert _cache_chunk(32, SEGMENT_ELEMENTS // 16) == 16
    assert _cache_chunk(32, SEGMENT_ELEMENTS * 4) == CACHE_CHUNK_MIN
    assert _cache_chunk(4, SEGMENT_ELEMENTS * 4) == 4  # never raised


def test_huge_steps_in_float32_stay_finite_with_gradients(unsafe_form):
    """Steps whose decays underflow float32 (exp(A delta) < 1e-38) fail the factored bound and meet the floored exp:
    outputs and every gradient are finite and match the float64 reference."""
    inputs = make_inputs(L=40, E=6, N=8)
    inputs["delta"][:, ::2] += 30.0
    ref = run(inputs, "reference")
    got = run({k: v.float() for k, v in inputs.items()}, "torch", chunk_size=16)
    assert torch.isfinite(got[0]).all()
    assert_close("out", ref[0], got[0].double(), 1e-4)
    for name in NAMES:
        assert torch.isfinite(got[2][name]).all(), name
        # the doubling scan's rows take dA and d delta from m_t = g_t (h_t - x_t): when a huge step leaves h_t ~ x_t,
        # the difference cancels to float32's eps of x_t (measured 1.8e-4 of dA's scale); the stepwise form forms
        # g_t a_t h_{t-1} directly, as the sequential reference does
        cancels = unsafe_form == "doubling" and name in ("A", "delta", "delta_bias")
        tol = 1e-3 if cancels else 1e-4
        assert_close(f"d{name}", ref[2][name], got[2][name].double(), tol)


def test_factored_and_stepwise_segments_in_one_scan(monkeypatch):
    """Small steps in the first half of the sequence, huge ones in the second: the first segments take the factored
    form, the last the stepwise form (default STEPWISE_SHARE), and state and adjoint cross between them."""
    import sys

    chunked = sys.modules["attnzoo.kernels.selective_scan.chunked"]
    monkeypatch.setattr(chunked, "FACTOR_LIMIT", {torch.float64: 60.0, torch.float32: 60.0})
    monkeypatch.setattr(chunked, "SEGMENT_ELEMENTS", 2 * 6 * 4 * 8)  # segments of 8 steps
    forms = []
    factors = chunked._Layout._factors
    monkeypatch.setattr(
        chunked._Layout,
        "_factors",
        lambda self, dlt: forms.append(factors(self, dlt)["W"] is None) or factors(self, dlt),
    )
    inputs = make_inputs(L=48, E=6, N=4)
    inputs["delta"][:, :, 24:] += 12.0
    ref = run(inputs, "reference")
    got = run(inputs, "torch", chunk_size=8)
    assert_all_close(ref, got, 1e-10)
    assert forms[:6] == [False] * 3 + [True] * 3  # the forward's six segments


def test_steps_too_large_for_any_chunk_keep_the_chunk():
    """When even the shortest chunk leaves more than STEPWISE_SHARE of the rows failing the bound, shortening would
    not spare the stepwise form (whose cost does not fall with the chunk), so the requested chunk is kept."""
    from attnzoo.kernels.selective_scan.chunked import SAFE_CHUNK_MIN, _safe_chunk

    A = -torch.arange(1, 17, dtype=torch.float64).repeat(6, 1)
    huge = torch.full((2, 6, 64), 5.0, dtype=torch.float64)  # span 5 x SAFE_CHUNK_MIN x 16 / 2 = 160 at the minimum
    assert SAFE_CHUNK_MIN == 4
    assert _safe_chunk(huge, A, 8, 60.0) == 8
    some = torch.full((2, 6, 64), 0.5, dtype=torch.float64)
    some[:, 0, :8] = 5.0  # one channel in 6, 8 steps in 64: 1/6 x 1/8 = 2% of the 4-step rows fail
    assert _safe_chunk(some, A, 32, 60.0) == 4
