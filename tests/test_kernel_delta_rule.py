"""attnzoo.kernels.delta_rule: every backend against the token-by-token reference (output, final state and every
gradient including beta's, g's and the initial state's, a named relative-RMS assert_close, odd sizes, T not a multiple
of the chunk), gated (Gated DeltaNet) and ungated (DeltaNet), plus FLA's own naive references through golden files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attnzoo.kernels import delta_rule

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: OpenMP's waiting on a loaded two-core machine costs more than the work, so one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


NAMES = ("o", "state", "dq", "dk", "dv", "dbeta", "dg", "dstate")
GATED = pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, ratio: float) -> None:
    """Relative RMS error of ``got`` against ``ref`` below ``ratio`` (FLA's check), with a named message."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (ref.double() - got.double()).pow(2).mean().sqrt() / ref.double().pow(2).mean().sqrt().clamp_min(1e-30)
    assert err <= ratio, f"{name}: relative RMS error {err:.3e} > {ratio:.1e}"


def make_inputs(B, T, H, K, V, *, gated=True, dtype=torch.float64, seed=0, gate_normalizer=1.0):
    """L2-normalised q, k (as the layers pass them), v, beta in (0, 1), a logsigmoid gate (None ungated), a state."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64)) / gate_normalizer
    state = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    return [q.to(dtype), k.to(dtype), v.to(dtype), beta.to(dtype), g.to(dtype) if gated else None, state.to(dtype)]


def run_with_grads(backend, q, k, v, beta, g, state, *, chunk_size=16, scale=None):
    """Forward plus the gradients of a random linear function of the output and the final state."""
    inputs = [None if t is None else t.detach().clone().requires_grad_(True) for t in (q, k, v, beta, g, state)]
    o, final = delta_rule(
        *inputs[:5],
        initial_state=inputs[5],
        output_final_state=True,
        chunk_size=chunk_size,
        backend=backend,
        scale=scale,
    )
    gen = torch.Generator().manual_seed(123)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    dfinal = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(final.dtype)
    used = [t for t in inputs if t is not None]
    grads = list(torch.autograd.grad((o * do).sum() + (final * dfinal).sum(), used))
    if g is None:
        grads.insert(4, torch.zeros(()))  # no gate, no dg: compare a placeholder
    return dict(zip(NAMES, (o, final, *grads)))


# (B, T, H, K, V, chunk): round and awkward sizes; T=63 and T=300 are not multiples of the chunk, K=24 not a power of 2
SHAPES = [
    pytest.param(*s, id="B{}-T{}-H{}-K{}-V{}-C{}".format(*s))
    for s in [(2, 64, 2, 16, 16, 16), (1, 63, 3, 24, 12, 16), (2, 300, 1, 8, 20, 64), (1, 1, 2, 4, 4, 64)]
]


@pytest.mark.parametrize("B,T,H,K,V,chunk", SHAPES)
@GATED
def test_torch_matches_reference_float64(gated, B, T, H, K, V, chunk):
    inputs = make_inputs(B, T, H, K, V, gated=gated)
    ref = run_with_grads("reference", *inputs)
    got = run_with_grads("torch", *inputs, chunk_size=chunk)
    for name in NAMES:
        assert_close(name, ref[name], got[name], 1e-10)


@GATED
def test_torch_matches_reference_float32(gated):
    """float32 against the float64 oracle: ~1e-5 relative expected, asserted at 1e-4."""
    inputs = make_inputs(2, 250, 2, 32, 48, gated=gated)
    ref = run_with_grads("reference", *inputs)
    got = run_with_grads("torch", *[None if t is None else t.float() for t in inputs], chunk_size=64)
    for name in NAMES:
        assert got[name].dtype == torch.float32 or name == "dg", name
        assert_close(name, ref[name], got[name], 1e-4)


@GATED
def test_gradcheck_tiny(gated):
    """torch.autograd.gradcheck of the hand-written backward (finite differences in float64), two chunks of 4."""
    q, k, v, beta, g, state = make_inputs(1, 7, 2, 3, 2, gated=gated)
    inputs = [t.requires_grad_(True) for t in (q, k, v, beta, state)] + ([g.requires_grad_(True)] if gated else [])

    def fn(q, k, v, beta, state, g=None):
        return delta_rule(q, k, v, beta, g, initial_state=state, output_final_state=True, chunk_size=4)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8)


@GATED
def test_chunk_size_invariance(gated):
    inputs = make_inputs(1, 100, 2, 8, 8, gated=gated)
    ref = run_with_grads("torch", *inputs, chunk_size=16)
    for chunk in (1, 4, 32, 64, 128):  # 128 > T: one chunk covering the whole sequence
        got = run_with_grads("torch", *inputs, chunk_size=chunk)
        for name in NAMES:
            assert_close(f"{name} (chunk {chunk})", ref[name], got[name], 1e-12)


def test_default_chunk_is_the_backends_own():
    """chunk_size=None runs the torch backend at its measured-fastest chunk, 32, bit for bit."""
    inputs = make_inputs(1, 100, 2, 8, 8, gated=True)
    default = run_with_grads("torch", *inputs, chunk_size=None)
    explicit = run_with_grads("torch", *inputs, chunk_size=32)
    assert all(torch.equal(default[name], explicit[name]) for name in NAMES)


@pytest.mark.parametrize("size", [1, 2, 8, 16, 32, 64, 128, 256])
def test_unit_lower_inverse_by_blocks(size):
    """The UT transform's recursive 2 x 2 block inverse equals a triangular solve, and never reads the upper
    triangle (filled with garbage here); entries of L in [-1, 1] as with L2-normalised keys and beta in (0, 1)."""
    from attnzoo.kernels.delta_rule.chunked import _unit_lower_inverse

    gen = torch.Generator().manual_seed(size)
    A = torch.rand(3, size, size, generator=gen, dtype=torch.float64) * 2 - 1
    lower = A.tril(-1) + torch.eye(size, dtype=torch.float64)
    garbage = lower + torch.randn(3, size, size, generator=gen, dtype=torch.float64).triu(1) * 1e3
    got = _unit_lower_inverse(garbage)
    want = torch.linalg.solve_triangular(lower, torch.eye(size, dtype=torch.float64).expand_as(lower), upper=False)
    assert torch.equal(got.triu(1), torch.zeros_like(got.triu(1)))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


@pytest.mark.parametrize("backend", ["reference", "torch"])
@GATED
def test_initial_state_continues_the_sequence(gated, backend):
    """run(x[:t]) -> state -> run(x[t:]) equals run(x), also when the second part is fed a few steps at a time."""
    q, k, v, beta, g, _ = make_inputs(2, 37, 2, 6, 5, gated=gated)
    kw = dict(output_final_state=True, backend=backend, chunk_size=8)

    def part(lo, hi):
        return [q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], beta[:, lo:hi], None if g is None else g[:, lo:hi]]

    full, full_state = delta_rule(*part(0, 37), **kw)
    o1, state = delta_rule(*part(0, 20), **kw)
    parts = [o1]
    for t in range(20, 37, 6):  # 6, 6, 5 positions
        o, state = delta_rule(*part(t, t + 6), initial_state=state, **kw)
        parts.append(o)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, full_state, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_padded_positions_neither_write_nor_decay(backend):
    """k = 0 and g = 0 at a position (any v, beta): the state passes through it unchanged, so inserting such
    positions changes neither the real positions' outputs nor the final state."""
    q, k, v, beta, g, state = make_inputs(2, 30, 2, 6, 5)
    o, final = delta_rule(q, k, v, beta, g, initial_state=state, output_final_state=True, backend=backend)
    pad = [10, 11, 12, 25]  # positions of the padded sequence that are padding
    real = [t for t in range(34) if t not in pad]
    padded = []
    for x, fill in ((q, 1.0), (k, 0.0), (v, 3.0), (beta, 0.7), (g, 0.0)):
        y = torch.full((2, 34, *x.shape[2:]), fill, dtype=x.dtype)
        y[:, real] = x
        padded.append(y)
    o_pad, final_pad = delta_rule(*padded, initial_state=state, output_final_state=True, backend=backend)
    torch.testing.assert_close(o_pad[:, real], o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final_pad, final, rtol=1e-12, atol=1e-12)


def test_zero_gate_is_the_ungated_rule():
    inputs = make_inputs(1, 50, 2, 8, 6)
    inputs[4] = torch.zeros_like(inputs[4])
    gated = run_with_grads("torch", *inputs)
    plain = run_with_grads("torch", *inputs[:4], None, inputs[5])
    for name in NAMES:
        if name != "dg":
            assert_close(name, plain[name], gated[name], 1e-12)


def test_single_key_is_written_exactly():
    """With beta = 1 one step stores v exactly along a unit key: k S = v afterwards (the delta rule's defining
    property), whatever the state held before."""
    q, k, v, beta, _, state = make_inputs(1, 1, 1, 8, 4)
    _, final = delta_rule(q, k, v, torch.ones_like(beta), initial_state=state, output_final_state=True)
    torch.testing.assert_close(torch.einsum("bk,bkv->bv", k[:, 0, 0], final[:, 0]), v[:, 0, 0])


@GATED
def test_causality(gated):
    q, k, v, beta, g, _ = make_inputs(1, 50, 2, 8, 6, gated=gated)
    o, _ = delta_rule(q, k, v, beta, g, chunk_size=16)
    later = [x.clone() for x in (k, v, beta)] + [None if g is None else g.clone()]
    later[0][:, 30:], later[1][:, 30:], later[2][:, 30:] = 0.3, -3.0, 0.9
    if g is not None:
        later[3][:, 30:] = -7.0
    o2, _ = delta_rule(q, *later, chunk_size=16)
    torch.testing.assert_close(o[:, :30], o2[:, :30], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(o[:, 30:], o2[:, 30:])


@pytest.mark.parametrize("gate", ["near_zero", "very_negative", "mixed", "below_exp_range"])
def test_extreme_gates(gate):
    """g ~ -1e-6, g = -20 per step (exp(-b) over a chunk would overflow), a mix, and g = -100 (exp(100) overflows
    float32): chunked float32 stays finite and equals the float64 oracle, gradients included."""
    q, k, v, beta, g, state = make_inputs(1, 200, 2, 16, 8)
    gen = torch.Generator().manual_seed(5)
    if gate == "near_zero":
        g = -1e-6 * torch.rand(g.shape, generator=gen, dtype=g.dtype)
    elif gate == "very_negative":
        g = torch.full_like(g, -20.0)
    elif gate == "below_exp_range":
        g = torch.full_like(g, -100.0)
    else:
        g = torch.where(torch.rand(g.shape, generator=gen, dtype=g.dtype) < 0.5, -30.0, -1e-4).to(g.dtype)
    ref = run_with_grads("reference", q, k, v, beta, g, state)
    got = run_with_grads("torch", *[t.float() for t in (q, k, v, beta, g, state)], chunk_size=64)
    for name in NAMES:
        assert_close(name, ref[name], got[name], 1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@GATED
def test_half_precision_inputs_keep_float32_state(gated, dtype):
    q, k, v, beta, g, state = make_inputs(1, 100, 2, 16, 8, gated=gated, dtype=torch.float32)
    ref, ref_state = delta_rule(q, k, v, beta, g, initial_state=state, output_final_state=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = [x.to(dtype) for x in (q, k, v, beta)]
        o, final = delta_rule(*half, g, initial_state=state, output_final_state=True)
    assert o.dtype == dtype and final.dtype == torch.float32
    assert_close("o", ref, o, 2e-2)
    assert_close("state", ref_state, final, 2e-2)


@GATED
def test_long_sequence_bfloat16_is_finite(gated):
    """T = 16384 with bf16 inputs: finite outputs, state and gradients (under a second: K = V = 16)."""
    inputs = make_inputs(1, 16384, 2, 16, 16, gated=gated, dtype=torch.float32)
    half = [x.bfloat16() if i < 4 else x for i, x in enumerate(inputs)]
    out = run_with_grads("torch", *half, chunk_size=64)
    for name in NAMES:
        assert torch.isfinite(out[name]).all(), name


@pytest.mark.parametrize("name", ["delta_rule", "gated_delta_rule"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_golden_fla_naive(name, backend):
    """FLA's own naive recurrences (tests/golden/GOLDEN.md): outputs, final state and every gradient, float32."""
    d = torch.load(GOLDEN / f"{name}.pt", weights_only=True)
    x = {key: t.double().requires_grad_(True) for key, t in d["inputs"].items()}
    o, final = delta_rule(
        x["q"],
        x["k"],
        x["v"],
        x["beta"],
        x.get("g"),
        scale=d["scale"],
        initial_state=x["initial_state"],
        output_final_state=True,
        chunk_size=d["chunk_size"],
        backend=backend,
    )
    torch.testing.assert_close(o.float(), d["o"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.float(), d["final_state"], rtol=1e-5, atol=1e-5)
    loss = (o * d["do"].double()).sum() + (final * d["dfinal_state"].double()).sum()
    grads = torch.autograd.grad(loss, list(x.values()))
    for key, grad in zip(x, grads):
        torch.testing.assert_close(grad.float(), d["grads"][key], rtol=1e-4, atol=1e-4, msg=f"d{key}")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (runs under TRITON_INTERPRET=1)")
@pytest.mark.parametrize(
    "B,T,H,K,V",
    [pytest.param(1, 40, 2, 20, 12, id="odd-T40-K20-V12"), pytest.param(1, 5, 1, 8, 80, id="short-T5-V80-two-tiles")],
)
@GATED
def test_triton_matches_reference(gated, B, T, H, K, V):
    """The Triton state passes under the interpreter: T not a multiple of the chunk (front padding), K and V not
    multiples of the tiles, V spanning two value tiles, T shorter than the smallest chunk; output, final state and
    every gradient (beta's, g's, the initial state's) against the recurrence in float64."""
    inputs = make_inputs(B, T, H, K, V, gated=gated)
    ref = run_with_grads("reference", *inputs)
    got = run_with_grads("triton", *inputs, chunk_size=16)
    for name in NAMES:
        assert_close(name, ref[name], got[name], 1e-10)


def test_triton_refuses_keys_wider_than_one_tile():
    pytest.importorskip("triton")
    q, k, v, beta, g, _ = make_inputs(1, 4, 1, 260, 4)
    with pytest.raises(ValueError, match=r"K <= 256; got K=260\. Use backend='torch'"):
        delta_rule(q, k, v, beta, g, backend="triton")


def test_auto_is_torch_on_the_cpu():
    q, k, v, beta, g, _ = make_inputs(1, 8, 2, 4, 4)
    torch.testing.assert_close(delta_rule(q, k, v, beta, g)[0], delta_rule(q, k, v, beta, g, backend="torch")[0])


def test_errors_name_the_argument_and_the_fix():
    q, k, v, beta, g, _ = make_inputs(1, 8, 2, 4, 4)
    with pytest.raises(ValueError, match=r"k must have shape \(B, T, H, K\) = \(1, 8, 2, 4\) like q; got"):
        delta_rule(q, k[..., :3], v, beta)
    with pytest.raises(ValueError, match=r"v must have shape \(B, T, H, V\)"):
        delta_rule(q, k, v[:, :5], beta)
    with pytest.raises(ValueError, match=r"beta must have shape \(B, T, H\) = \(1, 8, 2\); .*per-channel beta"):
        delta_rule(q, k, v, beta[..., None].expand(1, 8, 2, 4))
    with pytest.raises(ValueError, match=r"g must have shape \(B, T, H\)"):
        delta_rule(q, k, v, beta, g[:, :4])
    with pytest.raises(TypeError, match="beta must be a floating-point tensor"):
        delta_rule(q, k, v, (beta > 0.5).long())
    with pytest.raises(ValueError, match=r"initial_state must have shape \(B, H, K, V\) = \(1, 2, 4, 4\)"):
        delta_rule(q, k, v, beta, initial_state=torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match="power of two"):
        delta_rule(q, k, v, beta, chunk_size=48)
    with pytest.raises(ValueError, match="Did you mean 'torch'"):
        delta_rule(q, k, v, beta, backend="torhc")
