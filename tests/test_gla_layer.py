"""Properties of the ``gla`` layer (Yang et al. 2023) beyond the registry-wide contract tests.

The layer's scan runs through ``attnzoo.kernels.gla``; the oracle here is an independent token-by-token recurrence
written from the paper's equations, driven by the layer's own projections.
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


def make(causal: bool = True, seed: int = 0, std: float = 0.3, **options):
    """A float64 layer with weights large enough that every term matters (FLA's N(0, 0.02) init makes outputs tiny)."""
    torch.manual_seed(seed)
    layer = build_attention("gla", dim=DIM, num_heads=HEADS, causal=causal, **options).to(F64).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, std)
    return layer


def randn(*shape, seed: int = 1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def features(layer, x):
    """q, k, v (B, T, H, K|V) and log_decay (B, T, H, K) as the layer forms them, before the scan."""
    B, T, _ = x.shape
    q, k, v = layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)
    if layer.use_short_conv:
        q, k, v = layer.q_conv1d(q)[0], layer.k_conv1d(k)[0], layer.v_conv1d(v)[0]
    groups = layer.kv_groups
    q = q.view(B, T, HEADS, -1)
    k = k.view(B, T, HEADS // groups, -1).repeat_interleave(groups, 2)
    v = v.view(B, T, HEADS // groups, -1).repeat_interleave(groups, 2)
    log_decay = layer.log_decay(x).repeat_interleave(groups, 2)
    return q, k, v, log_decay


def recurrence(q, k, v, log_decay, scale):
    """S_t = diag(exp(log_decay_t)) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t, one step at a time (the oracle)."""
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1])
    out = []
    for t in range(T):
        S = log_decay[:, t, :, :, None].exp() * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(out, dim=1)  # (B, T, H, V)


def finish(layer, o, x):
    """Per-head norm, swish output gate and o_proj, as the layer ends."""
    B, T, _ = x.shape
    g = layer.g_proj(x).view(B, T, HEADS, -1)
    return layer.o_proj((layer.g_norm(o) * F.silu(g)).reshape(B, T, -1))


@pytest.mark.parametrize("options", [{}, {"use_short_conv": True, "num_kv_heads": 2}], ids=["plain", "conv-gqa"])
def test_causal_layer_equals_token_by_token_recurrence(options):
    layer = make(**options)
    x = randn(2, 70, DIM)
    q, k, v, log_decay = features(layer, x)
    ref = finish(layer, recurrence(q, k, v, log_decay, layer.head_k_dim**-0.5), x)
    torch.testing.assert_close(layer(x), ref, atol=1e-10, rtol=1e-10)


def test_bidirectional_layer_equals_forward_plus_reversed_recurrence():
    layer = make(causal=False, use_short_conv=True)
    x = randn(2, 40, DIM)
    q, k, v, log_decay = features(layer, x)
    scale = layer.head_k_dim**-0.5
    o = recurrence(q, k, v, log_decay, scale)
    # backward scan: the same projections, the convolutions run over the reversed sequence
    xr = x.flip(1)
    qb, kb, vb = (
        conv(proj(xr))[0]
        for conv, proj in (
            (layer.q_conv1d, layer.q_proj),
            (layer.k_conv1d, layer.k_proj),
            (layer.v_conv1d, layer.v_proj),
        )
    )
    B, T = x.shape[:2]
    shape = (B, T, HEADS, -1)
    o = o + recurrence(qb.view(shape), kb.view(shape), vb.view(shape), log_decay.flip(1), scale).flip(1)
    torch.testing.assert_close(layer(x), finish(layer, o, x), atol=1e-10, rtol=1e-10)


def test_gate_range_closed_form():
    """alpha_t = sigmoid(z_t)^(1/16) in (0, 1), z_t the low-rank gate logits (spec §3 property 5)."""
    torch.manual_seed(0)
    layer = build_attention("gla", dim=DIM, num_heads=HEADS, causal=True)
    x = torch.randn(2, 9, DIM) * 5
    alpha = layer.log_decay(x).exp()
    z = layer.gk_proj(x).view_as(alpha)
    torch.testing.assert_close(alpha, torch.sigmoid(z) ** (1 / 16), atol=1e-6, rtol=1e-6)
    assert layer.log_decay(x).dtype == torch.float32
    assert ((alpha > 0) & (alpha < 1)).all()
    clamped = build_attention("gla", dim=DIM, num_heads=HEADS, causal=True, clamp_min=-0.01)
    with torch.no_grad():
        clamped.gk_proj[1].bias.fill_(-50.0)  # logsigmoid(-50) / 16 ~ -3.1: clamped
    assert (clamped.log_decay(x) >= -0.01).all() and (clamped.log_decay(x) == -0.01).any()


def test_unit_decay_is_unnormalised_linear_attention():
    """alpha == 1 (gate logits -> +inf) gives o_t = sum_{s<=t} (q_t . k_s) K^-1/2 v_s (spec §3 property 3)."""
    layer = make()
    with torch.no_grad():
        layer.gk_proj[1].weight.zero_()
        layer.gk_proj[1].bias.fill_(1e4)  # logsigmoid(1e4) underflows to exactly 0 in float64
    x = randn(2, 30, DIM)
    q, k, v, log_decay = features(layer, x)
    assert (log_decay == 0).all()
    scores = torch.einsum("bthk,bshk->bhts", q, k) * layer.head_k_dim**-0.5
    scores = scores.masked_fill(~torch.ones(30, 30, dtype=torch.bool).tril(), 0.0)
    o = torch.einsum("bhts,bshv->bthv", scores, v)
    torch.testing.assert_close(layer(x), finish(layer, o, x), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_chunk_size_invariance(causal):
    x = randn(2, 70, DIM)
    outs = [make(causal=causal, use_short_conv=True, chunk_size=c)(x) for c in (16, 128)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-10, rtol=1e-10)


def test_long_prefill_then_steps_with_conv_and_padding():
    """Prefill across chunk boundaries, single steps, then a multi-token piece == one full forward."""
    layer = make(use_short_conv=True, num_kv_heads=2, chunk_size=16)
    T = 90
    x = randn(2, T, DIM)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[0, [3, 70, 71, 85]] = False
    mask[1, :5] = False
    full = layer(x, padding_mask=mask)
    cache = layer.new_cache(2)
    bounds = [0, 70, 71, 72, T]
    parts = [layer(x[:, a:b], padding_mask=mask[:, a:b], cache=cache) for a, b in itertools.pairwise(bounds)]
    assert cache.length == T and cache.state.shape == (2, HEADS, layer.head_k_dim, layer.head_v_dim)
    torch.testing.assert_close(torch.cat(parts, 1)[mask], full[mask], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("use_short_conv", [False, True], ids=["plain", "conv"])
def test_bidirectional_output_depends_on_both_sides(use_short_conv):
    layer = make(causal=False, use_short_conv=use_short_conv)
    causal = make(causal=True, use_short_conv=use_short_conv)
    x = randn(1, 20, DIM)
    i = 10
    for j in (2, 17):  # one position left of i, one right of i
        x2 = x.clone()
        x2[:, j] += 1.0
        assert (layer(x2)[:, i] - layer(x)[:, i]).abs().max() > 1e-6, f"output {i} ignores position {j}"
    x2 = x.clone()
    x2[:, 17] += 1.0
    torch.testing.assert_close(causal(x2)[:, i], causal(x)[:, i], atol=0, rtol=0)  # the causal layer does


def test_gqa_equals_full_heads_with_repeated_projections():
    gqa = make(num_kv_heads=2)
    full = make(seed=5)
    with torch.no_grad():
        for name in ("q_proj", "g_proj", "o_proj", "gk_proj.0"):
            full.get_submodule(name).weight.copy_(gqa.get_submodule(name).weight)
        for name in ("k_proj", "v_proj", "gk_proj.1"):
            w = gqa.get_submodule(name).weight  # (H_kv * D, in): each kv head serves 2 consecutive query heads
            full.get_submodule(name).weight.copy_(w.view(2, -1, w.shape[-1]).repeat_interleave(2, 0).flatten(0, 1))
        b = gqa.gk_proj[1].bias
        full.gk_proj[1].bias.copy_(b.view(2, -1).repeat_interleave(2, 0).flatten())
    x = randn(2, 12, DIM)
    torch.testing.assert_close(gqa(x), full(x), atol=1e-10, rtol=1e-10)


def test_extreme_gates_are_finite_under_bf16():
    for bias in (-1e4, 1e4):  # forget everything at once / never forget
        layer = build_attention("gla", dim=DIM, num_heads=HEADS, causal=True)
        with torch.no_grad():
            layer.gk_proj[1].bias.fill_(bias)
        x = torch.randn(1, 256, DIM, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        out.float().square().mean().backward()
        assert torch.isfinite(out.float()).all() and torch.isfinite(x.grad).all()


def test_fla_parameter_names_defaults_and_init():
    layer = build_attention("gla", dim=64, num_heads=4, causal=True, use_short_conv=True)
    names = {n for n, _ in layer.named_parameters()}
    assert names == {
        "q_proj.weight", "k_proj.weight", "v_proj.weight", "g_proj.weight", "gk_proj.0.weight", "gk_proj.1.weight",
        "gk_proj.1.bias", "o_proj.weight", "g_norm.weight", "q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight",
    }  # fmt: skip
    assert layer.q_proj.weight.shape == (32, 64) and layer.v_proj.weight.shape == (64, 64)  # expand_k .5, expand_v 1
    assert layer.gk_proj[0].weight.shape == (16, 64)
    torch.testing.assert_close(layer.q_proj.weight.std(), torch.tensor(0.02), atol=3e-3, rtol=0)
    assert (layer.gk_proj[1].bias == 0).all()
    ln = build_attention("gla", dim=64, num_heads=4, causal=True, norm_type="layernorm")
    assert isinstance(ln.g_norm, torch.nn.LayerNorm)


def test_bad_options_raise_with_the_fix():
    with pytest.raises(ValueError, match="num_kv_heads must divide num_heads=4; got 3"):
        build_attention("gla", dim=DIM, num_heads=HEADS, causal=True, num_kv_heads=3)
    with pytest.raises(ValueError, match="expand_k"):
        build_attention("gla", dim=DIM, num_heads=HEADS, causal=True, expand_k=0.3)
    with pytest.raises(ValueError, match=r"unknown norm_type 'rms'\. Did you mean 'rmsnorm'"):
        build_attention("gla", dim=DIM, num_heads=HEADS, causal=True, norm_type="rms")
    with pytest.raises(ValueError, match="cache was made for batch_size=3"):
        layer = build_attention("gla", dim=DIM, num_heads=HEADS, causal=True)
        layer(torch.randn(2, 4, DIM), cache=layer.new_cache(3))


def test_gpt_trains_and_generates():
    torch.manual_seed(0)
    model = GPT(16, dim=32, depth=1, num_heads=4, attention={"name": "gla", "use_short_conv": True})
    data = torch.arange(16).repeat(4, 2)[:, :17]  # (4, 17) a counting sequence
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(5):
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    prompt = data[:2, :5]
    cached = model.generate(prompt, 3, temperature=0)
    torch.testing.assert_close(cached, model.generate(prompt, 3, temperature=0, use_cache=False))
    assert cached.shape == (2, 8)


@pytest.mark.parametrize("options", [{}, {"norm_type": "layernorm", "elementwise_affine": False}], ids=["rms", "ln"])
def test_half_precision_model_runs_with_float32_norm(options):
    """A model cast to bf16 (no autocast) still normalises in float32 and returns bf16."""
    layer = build_attention("gla", dim=DIM, num_heads=HEADS, causal=False, **options).to(torch.bfloat16)
    x = torch.randn(2, 20, DIM)
    out = layer(x.to(torch.bfloat16))
    ref = build_attention("gla", dim=DIM, num_heads=HEADS, causal=False, **options)
    ref.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref(x.to(torch.bfloat16).float()), atol=2e-3, rtol=5e-2)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_triton_backend_matches_torch(causal):
    """backend= reaches the kernel: Triton (the CPU interpreter here, conftest sets TRITON_INTERPRET=1) == torch."""
    torch.manual_seed(0)
    ref = build_attention("gla", dim=DIM, num_heads=2, causal=causal, backend="torch", **{})
    got = build_attention("gla", dim=DIM, num_heads=2, causal=causal, backend="triton", **{})
    got.load_state_dict(ref.state_dict())
    x = torch.randn(1, 20, DIM)
    torch.testing.assert_close(got(x), ref(x), atol=1e-5 * ref(x).abs().max().item(), rtol=1e-4)
