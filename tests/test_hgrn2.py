"""Properties of the ``hgrn2`` layer beyond the registry-wide contract tests.

The oracle is a token-by-token float64 recurrence of the whole layer written from the paper's equations,
h_t = diag(f_t) h_{t-1} + (1 - f_t)^T i_t and o_t = q_t h_t, and the raw weights; the layer runs the chunked ``gla``
kernel.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from attnzoo.layers import build_attention
from attnzoo.models import GPT

DIM, HEADS = 32, 4
F64 = torch.float64


def make(causal: bool = True, seed: int = 0, **options):
    """A float64 layer with weights large enough that every term matters (FLA's N(0, 0.02) makes outputs tiny)."""
    torch.manual_seed(seed)
    layer = build_attention("hgrn2", dim=DIM, num_heads=HEADS, causal=causal, **options).to(F64).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return layer


def randn(*shape, seed: int = 1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def causal_conv(x, weight):
    """Depthwise causal convolution, window W, weight (C, 1, W), the last tap on the current token; x (B, T, C)."""
    W = weight.shape[-1]
    padded = F.pad(x, (0, 0, W - 1, 0))
    return sum(padded[:, w : w + x.shape[1]] * weight[:, 0, w] for w in range(W))


def projections(layer, x, reverse=False):
    """q, f, i (B, T, C) from the raw weights, through the (mirrored, for the backward scan) convolutions."""
    q, f, i = x @ layer.q_proj.weight.T, x @ layer.f_proj.weight.T, x @ layer.i_proj.weight.T
    if layer.use_short_conv:
        convs = (layer.q_conv1d, layer.f_conv1d, layer.i_conv1d)
        if reverse:
            q, f, i = (causal_conv(t.flip(1), c.weight).flip(1) for t, c in zip((q, f, i), convs))
        else:
            q, f, i = (causal_conv(t, c.weight) for t, c in zip((q, f, i), convs))
    return q, f, i


def recurrence(q, f, i, bound, heads, order):
    """o_t = K^-1/2 swish(q_t) h_t, h_t = diag(f_t) h_{t-1} + (1 - f_t)^T i_t, f_t = b + (1 - b) sigmoid(.)."""
    B, T, _ = q.shape
    q, i = F.silu(q).view(B, T, heads, -1), i.view(B, T, heads, -1)
    forget = (bound + (1 - bound) * torch.sigmoid(f)).view(B, T, heads, -1)
    h = q.new_zeros(B, heads, q.shape[-1], i.shape[-1])
    out = torch.zeros(B, T, heads, i.shape[-1], dtype=q.dtype)
    for t in order:
        h = forget[:, t, :, :, None] * h + (1 - forget[:, t, :, :, None]) * i[:, t, :, None, :]
        out[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t], h) * q.shape[-1] ** -0.5
    return out.reshape(B, T, -1)


def finish(layer, o):
    """out = o_proj(RMSNorm(o)) with one RMSNorm over the whole width."""
    normed = o / (o.square().mean(-1, keepdim=True) + layer.g_norm.eps).sqrt() * layer.g_norm.weight
    return normed @ layer.o_proj.weight.T


def oracle(layer, x, bound=0.0):
    T = x.shape[1]
    o = recurrence(*projections(layer, x), bound, HEADS, range(T))
    if not layer.causal:
        o = o + recurrence(*projections(layer, x, reverse=True), bound, HEADS, reversed(range(T)))
    return finish(layer, o)


CASES = {
    "plain": {},
    "conv-expand": {"use_short_conv": True, "expand_ratio": 12},
    "bound": {"lower_bound": 0.6, "chunk_size": 16},
}


@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
def test_causal_layer_equals_token_by_token_recurrence(options):
    layer = make(**options)
    x = randn(2, 70, DIM)
    ref = oracle(layer, x, options.get("lower_bound", 0.0))
    torch.testing.assert_close(layer(x), ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
def test_bidirectional_layer_equals_forward_plus_reversed_recurrence(options):
    layer = make(causal=False, **options)
    x = randn(2, 40, DIM)
    ref = oracle(layer, x, options.get("lower_bound", 0.0))
    torch.testing.assert_close(layer(x), ref, atol=1e-10, rtol=1e-10)


def test_bidirectional_output_depends_on_both_sides():
    layer = make(causal=False)
    x = randn(1, 20, DIM)
    for j in (2, 17):
        x2 = x.clone()
        x2[:, j] += 1.0
        assert (layer(x2)[:, 10] - layer(x)[:, 10]).abs().max() > 1e-6, f"output 10 ignores position {j}"


def test_per_channel_lower_bound_argument_equals_recurrence_and_overrides_the_option():
    layer = make(lower_bound=0.9)
    x = randn(2, 30, DIM)
    bound = torch.linspace(0.0, 0.95, HEADS * layer.head_f_dim, dtype=F64)
    torch.testing.assert_close(layer(x, lower_bound=bound), oracle(layer, x, bound), atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match=r"lower_bound must be a tensor of shape \(H \* K,\) = \(32,\)"):
        layer(x, lower_bound=torch.zeros(5, dtype=F64))


def test_fla_model_lower_bounds_train_through_the_layers():
    """FLA's HGRN2Model bound: softmax over layers of a learned (L, D) table, cumulative sum minus the first row.
    Layer 0 gets exactly 0 (the clamped log keeps its gradient finite); the bounds increase with depth."""
    torch.manual_seed(0)
    layers = [build_attention("hgrn2", dim=DIM, num_heads=HEADS, causal=True).double() for _ in range(3)]
    table = torch.randn(3, DIM, dtype=F64, requires_grad=True)
    bounds = table.softmax(0).cumsum(0) - table.softmax(0)[0]
    assert (bounds[0] == 0).all() and (bounds[1:] > bounds[:-1]).all()
    h = randn(2, 12, DIM)
    for layer, bound in zip(layers, bounds):
        h = h + layer(h, lower_bound=bound)
    h.square().sum().backward()
    assert torch.isfinite(table.grad).all() and table.grad.abs().sum() > 0


def test_forget_gate_and_tied_input_gate():
    """log f >= log b, k = 1 - f exactly (the tied input gate), float32 gates for a float32 layer."""
    torch.manual_seed(0)
    layer = build_attention("hgrn2", dim=DIM, num_heads=HEADS, causal=True)
    x = torch.randn(2, 9, DIM) * 30
    bound = layer._bound(torch.tensor(0.25), x)
    _, k, _, log_f = layer._features(layer.q_proj(x), layer.f_proj(x), layer.i_proj(x), bound, None)
    assert log_f.dtype == torch.float32 and (log_f >= torch.tensor(0.25).log() - 1e-6).all() and (log_f < 0).all()
    torch.testing.assert_close(k, 1 - log_f.exp(), atol=1e-6, rtol=0)
    expected = 0.25 + 0.75 * torch.sigmoid(layer.f_proj(x).double())
    torch.testing.assert_close(log_f.exp().double(), expected.view_as(log_f), atol=1e-6, rtol=1e-6)


def test_chunk_size_invariance_and_long_prefill_then_steps_with_conv_and_padding():
    T = 90
    x = randn(2, T, DIM)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[0, [3, 70, 71]] = False
    mask[1, :2] = False
    layer = make(use_short_conv=True, lower_bound=0.3, chunk_size=16)
    full = layer(x, padding_mask=mask)
    other = make(use_short_conv=True, lower_bound=0.3, chunk_size=128)
    torch.testing.assert_close(other(x, padding_mask=mask), full, atol=1e-10, rtol=1e-10)
    cache = layer.new_cache(2)
    bounds = [0, 70, 71, 72, T]
    parts = [layer(x[:, a:b], padding_mask=mask[:, a:b], cache=cache) for a, b in itertools.pairwise(bounds)]
    assert cache.length == T
    torch.testing.assert_close(torch.cat(parts, 1)[mask], full[mask], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_padding_has_no_influence_and_equals_removal(causal):
    layer = make(causal=causal, use_short_conv=True)
    x = randn(2, 15, DIM)
    mask = torch.ones(2, 15, dtype=torch.bool)
    mask[0, [4, 5, 11]] = False
    x2 = torch.where(mask[..., None], x, randn(2, 15, DIM, seed=7) * 5)
    out1, out2 = layer(x, padding_mask=mask), layer(x2, padding_mask=mask)
    torch.testing.assert_close(out1[mask], out2[mask], atol=1e-10, rtol=1e-10)
    # without convolutions (whose window counts the zeroed slots) a padded position is as if removed
    plain = make(causal=causal)
    kept = x[0, mask[0]][None]
    torch.testing.assert_close(plain(x, padding_mask=mask)[0, mask[0]], plain(kept)[0], atol=1e-10, rtol=1e-10)


def test_fla_defaults_names_and_state_size():
    layer = build_attention("hgrn2", dim=64, num_heads=4, causal=True)
    assert {n for n, _ in layer.named_parameters()} == {
        "q_proj.weight", "f_proj.weight", "i_proj.weight", "g_norm.weight", "o_proj.weight"
    }  # fmt: skip
    assert layer.g_norm.normalized_shape == (64,) and layer.g_norm.eps == 1e-5  # one RMSNorm over all heads
    assert layer.state_size(10) == 4 * 16 * 16
    wide = build_attention("hgrn2", dim=64, num_heads=4, causal=True, expand_ratio=32, use_short_conv=True)
    assert wide.q_proj.weight.shape == wide.f_proj.weight.shape == (128, 64) and wide.i_proj.weight.shape == (64, 64)
    assert wide.state_size(10) == 4 * 32 * 16 + 3 * (128 + 128 + 64)
    assert wide.q_conv1d.activation == "identity"
    assert abs(layer.q_proj.weight.std().item() - 0.02) < 0.004  # FLA's N(0, 0.02) init


def test_bad_options_raise():
    with pytest.raises(ValueError, match=r"lower_bound .* must be in \[0, 1\); got 1.0"):
        build_attention("hgrn2", dim=DIM, num_heads=HEADS, causal=True, lower_bound=1.0)
    with pytest.raises(ValueError, match="expand_ratio is the forget-gate width per head"):
        build_attention("hgrn2", dim=DIM, num_heads=HEADS, causal=True, expand_ratio=0)


def test_gpt_trains_and_generates():
    torch.manual_seed(0)
    model = GPT(16, dim=32, depth=1, num_heads=4, attention="hgrn2")
    data = torch.arange(16).repeat(4, 2)[:, :17]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    prompt = data[:2, :5]
    cached = model.generate(prompt, 3, temperature=0)
    torch.testing.assert_close(cached, model.generate(prompt, 3, temperature=0, use_cache=False))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_triton_backend_matches_torch(causal):
    """backend= reaches the kernel: Triton (the CPU interpreter here, conftest sets TRITON_INTERPRET=1) == torch."""
    torch.manual_seed(0)
    ref = build_attention("hgrn2", dim=DIM, num_heads=2, causal=causal, backend="torch")
    got = build_attention("hgrn2", dim=DIM, num_heads=2, causal=causal, backend="triton")
    got.load_state_dict(ref.state_dict())
    x = torch.randn(1, 20, DIM)
    torch.testing.assert_close(got(x), ref(x), atol=1e-5 * ref(x).abs().max().item(), rtol=1e-4)
