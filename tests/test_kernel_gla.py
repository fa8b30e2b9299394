"""attnzoo.kernels.gla / simple_gla: every backend against the token-by-token reference (FLA's tests/ops/test_gla.py
style: output, final state and every gradient including the initial state's, a named relative-RMS assert_close, odd
sizes, T not a multiple of the chunk), plus GLA's own properties."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from attnzoo.kernels import gla, simple_gla
from attnzoo.kernels.gla import chunked


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: with two threads on a loaded two-core machine, OpenMP's waiting costs far more than
    the work (measured 30x slower for the token loop of the reference), so each test runs on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


OPS = {"gla": gla, "simple_gla": simple_gla}
NAMES = ("o", "state", "dq", "dk", "dv", "dg", "dstate")


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, ratio: float) -> None:
    """Relative RMS error of ``got`` against ``ref`` below ``ratio`` (FLA's check), with a named message."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (ref.double() - got.double()).pow(2).mean().sqrt() / ref.double().pow(2).mean().sqrt().clamp_min(1e-30)
    assert err <= ratio, f"{name}: relative RMS error {err:.3e} > {ratio:.1e}"


def make_inputs(op, B, T, H, K, V, *, dtype=torch.float64, seed=0, gate_scale=1.0, gate_normalizer=16.0):
    """Random q, k, v, a GLA-style gate logsigmoid(gate_scale * z) / normalizer, and an initial state."""
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, K, generator=gen, dtype=dtype), torch.randn(B, T, H, K, generator=gen, dtype=dtype)
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    g_shape = (B, T, H, K) if op == "gla" else (B, T, H)
    g = F.logsigmoid(gate_scale * torch.randn(g_shape, generator=gen, dtype=torch.float64)) / gate_normalizer
    state = torch.randn(B, H, K, V, generator=gen, dtype=dtype)
    return [q, k, v, g.to(dtype), state]


def run_with_grads(op, backend, q, k, v, g, state, *, chunk_size=16, scale=None):
    """Forward plus the gradients of a random linear function of the output and the final state."""
    inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v, g, state)]
    o, final = OPS[op](
        *inputs[:4],
        initial_state=inputs[4],
        output_final_state=True,
        chunk_size=chunk_size,
        backend=backend,
        scale=scale,
    )
    gen = torch.Generator().manual_seed(123)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    dfinal = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(final.dtype)
    grads = torch.autograd.grad((o * do).sum() + (final * dfinal).sum(), inputs)
    return dict(zip(NAMES, (o, final, *grads)))


# (B, T, H, K, V, chunk): round and awkward sizes; T=63 and T=500 are not multiples of the chunk, K=60 is odd-ish
SHAPES = [
    pytest.param(*s, id="B{}-T{}-H{}-K{}-V{}-C{}".format(*s))
    for s in [(2, 64, 2, 16, 16, 16), (1, 63, 3, 60, 12, 16), (2, 500, 1, 8, 20, 64), (1, 1, 2, 4, 4, 64)]
]


@pytest.mark.parametrize("B,T,H,K,V,chunk", SHAPES)
@pytest.mark.parametrize("op", list(OPS))
def test_torch_matches_reference_float64(op, B, T, H, K, V, chunk):
    inputs = make_inputs(op, B, T, H, K, V)
    ref = run_with_grads(op, "reference", *inputs)
    got = run_with_grads(op, "torch", *inputs, chunk_size=chunk)
    for name in NAMES:
        assert_close(name, ref[name], got[name], 1e-10)


@pytest.mark.parametrize("op", list(OPS))
def test_torch_matches_reference_float32(op):
    """float32 against the float64 oracle: ~1e-4 relative (spec §3 measured 2e-7 for outputs)."""
    inputs = make_inputs(op, 2, 250, 2, 32, 48)
    ref = run_with_grads(op, "reference", *inputs)
    got = run_with_grads(op, "torch", *[t.float() for t in inputs], chunk_size=64)
    for name in NAMES:
        assert got[name].dtype == torch.float32, name
        assert_close(name, ref[name], got[name], 1e-4)


@pytest.mark.parametrize("bound", [0.0, 0.5], ids=["hierarchy-only", "mixed-blocks"])
@pytest.mark.parametrize("op", list(OPS))
def test_exact_hierarchy_matches_reference(op, bound, monkeypatch):
    """Shrink the directly factored blocks (normally the whole chunk for these gates) so the exact sub-chunk
    hierarchy does all (bound 0) or part (bound 0.5) of the intra-chunk work."""
    monkeypatch.setattr(chunked, "FACTOR_BOUND", bound)
    inputs = make_inputs(op, 1, 100, 2, 12, 8)
    ref = run_with_grads(op, "reference", *inputs)
    got = run_with_grads(op, "torch", *inputs, chunk_size=64)
    for name in NAMES:
        assert_close(name, ref[name], got[name], 1e-10)


@pytest.mark.parametrize("T", [5, 8, 16, 21], ids=lambda t: f"T{t}")  # 1, 1, 2 and 3 chunks of 8
@pytest.mark.parametrize("with_initial", [False, True], ids=["zero-start", "start"])
@pytest.mark.parametrize("loss_on", ["output", "state", "both"])
@pytest.mark.parametrize("path", ["bounded", "blocked"])
@pytest.mark.parametrize("op", list(OPS))
def test_skipped_state_products_change_nothing(op, path, loss_on, with_initial, T, monkeypatch):
    """The chunked path leaves out the state GEMMs of a zero start, an unrequested final state and an unused final
    state's gradient: every combination against the reference, values and gradients (also dg), on both backward
    paths (whole-chunk factoring, and the blocked one that very negative gates take)."""
    if path == "blocked":  # no block is factored directly: the exact hierarchy and the general backward
        monkeypatch.setattr(chunked, "FACTOR_BOUND", 0.0)
        monkeypatch.setattr(chunked, "_blocked_grads", _counted(chunked._blocked_grads, calls := []))
    q, k, v, g, state = make_inputs(op, 2, T, 2, 6, 5, seed=T)
    want_state = loss_on != "output"
    results = {}
    for backend in ("reference", "torch"):
        inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v, g, state)]
        initial = inputs[4] if with_initial else None
        o, final = OPS[op](
            *inputs[:4], initial_state=initial, output_final_state=want_state, chunk_size=8, backend=backend
        )
        assert (final is None) == (not want_state)
        gen = torch.Generator().manual_seed(7)
        loss = 0
        if loss_on != "state":
            loss = loss + (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
        if want_state:
            loss = loss + (final * torch.randn(final.shape, generator=gen, dtype=final.dtype)).sum()
        used = inputs if with_initial else inputs[:4]
        grads = torch.autograd.grad(loss, used, allow_unused=True)  # the state alone does not depend on q
        grads = [torch.zeros_like(x) if d is None else d for d, x in zip(grads, used)]
        results[backend] = (o, *(() if final is None else (final,)), *grads)
    for i, (ref, got) in enumerate(zip(*results.values())):
        assert_close(f"result {i}", ref, got, 1e-10)
    if path == "blocked":
        assert calls, "the blocked backward was not taken"


def _counted(fn, calls: list):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("op", list(OPS))
def test_chunk_size_invariance(op):
    inputs = make_inputs(op, 1, 100, 2, 8, 8)
    ref = run_with_grads(op, "torch", *inputs, chunk_size=16)
    for chunk in (1, 32, 64, 128):  # 128 > T: one chunk covering the whole sequence
        got = run_with_grads(op, "torch", *inputs, chunk_size=chunk)
        for name in NAMES:
            assert_close(f"{name} (chunk {chunk})", ref[name], got[name], 1e-12)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("op", list(OPS))
def test_initial_state_continues_the_sequence(op, backend):
    """run(x[:t]) -> state -> run(x[t:]) equals run(x), also when the second part is fed one step at a time."""
    q, k, v, g, _ = make_inputs(op, 2, 37, 2, 6, 5)
    kw = dict(output_final_state=True, backend=backend, chunk_size=8)
    full, full_state = OPS[op](q, k, v, g, **kw)
    o1, state = OPS[op](q[:, :20], k[:, :20], v[:, :20], g[:, :20], **kw)
    parts = [o1]
    for t in range(20, 37, 6):  # 6, 6, 5 positions
        o, state = OPS[op](
            q[:, t : t + 6], k[:, t : t + 6], v[:, t : t + 6], g[:, t : t + 6], initial_state=state, **kw
        )
        parts.append(o)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, full_state, rtol=1e-12, atol=1e-12)


def test_broadcast_gate_equals_simple_gla():
    q, k, v, g, state = make_inputs("simple_gla", 2, 70, 2, 8, 12)
    for backend in ("reference", "torch"):
        ref = run_with_grads("simple_gla", backend, q, k, v, g, state)
        got = run_with_grads("gla", backend, q, k, v, g[..., None].expand_as(q).contiguous(), state)
        for name in NAMES:
            gg = got[name] if name != "dg" else got[name].sum(-1)  # the scalar gate's gradient sums over K
            assert_close(f"{name} ({backend})", ref[name], gg, 1e-12)


@pytest.mark.parametrize("op", list(OPS))
def test_unit_gate_is_causal_linear_attention(op):
    """g = 0 (alpha = 1) reduces to un-normalised causal linear attention o_t = sum_{s<=t} (q_t . k_s) scale v_s."""
    q, k, v, g, _ = make_inputs(op, 1, 40, 2, 8, 6)
    o, _ = OPS[op](q, k, v, torch.zeros_like(g), chunk_size=16)
    scores = torch.einsum("bthk,bshk->bhts", q, k).tril() * 8**-0.5
    torch.testing.assert_close(o, torch.einsum("bhts,bshv->bthv", scores, v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", list(OPS))
def test_causality(op):
    q, k, v, g, _ = make_inputs(op, 1, 50, 2, 8, 6)
    o, _ = OPS[op](q, k, v, g, chunk_size=16)
    k2, v2, g2 = k.clone(), v.clone(), g.clone()
    k2[:, 30:], v2[:, 30:], g2[:, 30:] = 5.0, -3.0, -7.0
    o2, _ = OPS[op](q, k2, v2, g2, chunk_size=16)
    # not bitwise: the directly factored block size is chosen from all gates, so rounding may differ
    torch.testing.assert_close(o[:, :30], o2[:, :30], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(o[:, 30:], o2[:, 30:])


@pytest.mark.parametrize("gate", ["near_zero", "very_negative", "mixed", "below_exp_range"])
@pytest.mark.parametrize("op", list(OPS))
def test_extreme_gates(op, gate):
    """g ~ -1e-6 (alpha -> 1), g = -20 per step (alpha ~ 2e-9: exp(-b) over a chunk of 64 would be exp(1280) = inf),
    and a mix: chunked float32 stays finite and equals the float64 oracle, gradients included."""
    q, k, v, g, state = make_inputs(op, 1, 200, 2, 16, 8)
    gen = torch.Generator().manual_seed(5)
    if gate == "near_zero":
        g = -1e-6 * torch.rand(g.shape, generator=gen, dtype=g.dtype)
    elif gate == "very_negative":
        g = torch.full_like(g, -20.0)
    elif gate == "below_exp_range":  # exp(100) overflows float32: the 1 x 1 diagonal blocks must not factor it
        g = torch.full_like(g, -100.0)
    else:
        g = torch.where(torch.rand(g.shape, generator=gen, dtype=g.dtype) < 0.5, -30.0, -1e-4).to(g.dtype)
    ref = run_with_grads(op, "reference", q, k, v, g, state)
    got = run_with_grads(op, "torch", *[t.float() for t in (q, k, v, g, state)], chunk_size=64)
    for name in NAMES:
        assert_close(name, ref[name], got[name], 1e-4)


@pytest.mark.parametrize("op", list(OPS))
def test_single_step_with_a_gate_below_the_exp_range(op):
    q, k, v, g, state = make_inputs(op, 2, 1, 2, 16, 8)
    g = torch.full_like(g, -1e4)
    ref = run_with_grads(op, "reference", q, k, v, g, state)
    got = run_with_grads(op, "torch", *[t.float() for t in (q, k, v, g, state)], chunk_size=64)
    for name in NAMES:
        assert_close(name, ref[name], got[name], 1e-5)


@pytest.mark.parametrize("op", list(OPS))
def test_half_precision_inputs_keep_float32_state(op):
    q, k, v, g, state = make_inputs(op, 1, 100, 2, 16, 8, dtype=torch.float32)
    ref, ref_state = OPS[op](q, k, v, g, initial_state=state, output_final_state=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, final = OPS[op](q.bfloat16(), k.bfloat16(), v.bfloat16(), g, initial_state=state, output_final_state=True)
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert_close("o", ref, o, 2e-2)
    assert_close("state", ref_state, final, 2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("op", list(OPS))
def test_long_sequence_bfloat16_is_finite(op):
    """T = 16384 with bf16 inputs and a wide range of gates: finite outputs, state and gradients."""
    q, k, v, g, state = make_inputs(op, 1, 16384, 2, 16, 16, dtype=torch.float32, gate_scale=4.0, gate_normalizer=1.0)
    out = run_with_grads(op, "torch", q.bfloat16(), k.bfloat16(), v.bfloat16(), g, state, chunk_size=64)
    for name in NAMES:
        assert torch.isfinite(out[name]).all(), name


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (runs under TRITON_INTERPRET=1)")
@pytest.mark.parametrize("op", list(OPS))
def test_triton_matches_reference(op):
    """Forward and backward Triton kernels under the interpreter: tiny shapes, T=24 not a multiple of the chunk,
    K=20 and V=12 not multiples of the feature tiles; output, final state and every gradient."""
    inputs = make_inputs(op, 1, 24, 2, 20, 12)
    ref = run_with_grads(op, "reference", *inputs)
    got = run_with_grads(op, "triton", *inputs, chunk_size=16)
    for name in NAMES:
        assert_close(name, ref[name], got[name], 1e-10)


def test_errors_name_the_argument_and_the_fix():
    q, k, v, g, _ = make_inputs("gla", 1, 8, 2, 4, 4)
    with pytest.raises(ValueError, match=r"k must have shape \(B, T, H, K\) = \(1, 8, 2, 4\) like q; got"):
        gla(q, k[..., :3], v, g)
    with pytest.raises(ValueError, match="use simple_gla"):
        gla(q, k, v, g[..., 0])
    with pytest.raises(ValueError, match=r"g must have shape \(B, T, H\)"):
        simple_gla(q, k, v, g)
    with pytest.raises(ValueError, match=r"initial_state must have shape \(B, H, K, V\) = \(1, 2, 4, 4\)"):
        gla(q, k, v, g, initial_state=torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match="power of two"):
        gla(q, k, v, g, chunk_size=48)
    with pytest.raises(ValueError, match="Did you mean 'torch'"):
        gla(q, k, v, g, backend="torhc")
