"""Properties of the ``mamba2`` layer (Mamba-2 / SSD, Dao & Gu 2024) beyond the registry-wide contract tests.

The oracle is the per-step SSM recurrence written here from mamba_ssm's equations (its own convolution through
``F.conv1d(padding=d_conv-1)``, its own gated RMSNorm), driven by the layer's parameters; the layer runs the chunked
``simple_gla`` kernel.
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
    torch.manual_seed(seed)
    options = {"d_state": 16, **options}
    return build_attention("mamba2", dim=DIM, num_heads=HEADS, causal=causal, **options).to(F64).eval()


def randn(*shape, seed: int = 1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def ssm_direction(layer, xbc, dt, reverse: bool):
    """y (B, T, H, P) of one scan direction, one step at a time: H_t = exp(dt A) H + dt B^T x, y = C H + D x."""
    Bsz, T, _ = xbc.shape
    E, N, G, H, P = layer.d_inner, layer.d_state, layer.ngroups, layer.nheads, layer.headdim
    if reverse:
        xbc, dt = xbc.flip(1), dt.flip(1)
    # causal depthwise conv as a sum of shifted copies (mamba_ssm: zero left padding, tap W-1 on the current token)
    weight, width = layer.conv1d.weight[:, 0], layer.conv1d.weight.shape[-1]
    padded = F.pad(xbc, (0, 0, width - 1, 0))  # (B, W - 1 + T, C)
    conv = sum(padded[:, w : w + T] * weight[:, w] for w in range(width)) + layer.conv1d.bias
    xbc = F.silu(conv)
    x, Bm, Cm = xbc.split([E, G * N, G * N], dim=-1)
    x = x.view(Bsz, T, H, P)
    Bm = Bm.view(Bsz, T, G, N).repeat_interleave(H // G, 2)
    Cm = Cm.view(Bsz, T, G, N).repeat_interleave(H // G, 2)
    A = -torch.exp(layer.A_log)
    D = layer.D.view(H, P) if layer.D.numel() == E else layer.D[:, None]
    state = x.new_zeros(Bsz, H, P, N)  # mamba_ssm's (P, N) layout
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + (dt[:, t, :, None, None] * x[:, t, :, :, None]) * Bm[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Cm[:, t]) + D * x[:, t])
    y = torch.stack(ys, 1)
    return y.flip(1) if reverse else y


def reference(layer, u, bidirectional: bool = False):
    E, N, G, H = layer.d_inner, layer.d_state, layer.ngroups, layer.nheads
    z, xbc, dt = layer.in_proj(u).split([E, E + 2 * G * N, H], dim=-1)
    dt = F.softplus(dt + layer.dt_bias)
    y = ssm_direction(layer, xbc, dt, reverse=False)
    if bidirectional:
        y = y + ssm_direction(layer, xbc, dt, reverse=True)
    y = y.flatten(2) * F.silu(z)  # gated RMSNorm, norm after the gate, over groups of E / G channels
    grouped = y.unflatten(-1, (G, -1))
    y = (grouped * torch.rsqrt(grouped.square().mean(-1, keepdim=True) + 1e-5)).flatten(-2) * layer.norm.weight
    return layer.out_proj(y)


@pytest.mark.parametrize(
    "options", [{}, {"ngroups": 2, "D_has_hdim": True}, {"headdim": 8}], ids=["default", "groups-Dhdim", "headdim8"]
)
def test_causal_layer_equals_per_step_recurrence(options):
    layer = make(chunk_size=16, **options)
    with torch.no_grad():
        layer.D.normal_()  # a non-trivial skip
        layer.norm.weight.normal_()
    u = randn(2, 40, DIM)
    torch.testing.assert_close(layer(u), reference(layer, u), atol=1e-10, rtol=1e-10)


def test_bidirectional_layer_equals_forward_plus_reversed_recurrence():
    layer = make(causal=False, chunk_size=16, ngroups=2)
    u = randn(2, 30, DIM)
    torch.testing.assert_close(layer(u), reference(layer, u, bidirectional=True), atol=1e-10, rtol=1e-10)


def test_bidirectional_output_depends_on_both_sides():
    layer = make(causal=False)
    u = randn(1, 20, DIM)
    for j in (2, 17):
        u2 = u.clone()
        u2[:, j] += 1.0
        assert (layer(u2)[:, 10] - layer(u)[:, 10]).abs().max() > 1e-6, f"output 10 ignores position {j}"


def test_init_follows_mamba_ssm():
    layer = build_attention("mamba2", dim=64, num_heads=2, causal=True, dt_min=0.001, dt_max=0.1)
    dt = F.softplus(layer.dt_bias)
    assert ((dt >= 0.001 - 1e-7) & (dt <= 0.1 + 1e-7)).all()
    A = -torch.exp(layer.A_log)
    assert layer.A_log.dtype == torch.float32 and ((A <= -1) & (A >= -16)).all()
    assert (layer.D == 1).all() and layer.D.shape == (2,)
    assert all(p._no_weight_decay for p in (layer.dt_bias, layer.A_log, layer.D))
    # default widths: d_state 128, expand 2, d_conv 4; in_proj -> [z, x, B, C, dt]
    assert layer.in_proj.weight.shape == (2 * 128 + 2 * 128 + 2, 64)
    assert layer.conv1d.weight.shape == (128 + 2 * 128, 1, 4) and layer.conv1d.bias is not None
    assert layer.state_size(1) == 2 * 128 * 64 + 3 * (128 + 2 * 128)


def test_heads_from_num_heads_or_headdim():
    assert (make().nheads, make().headdim) == (HEADS, 2 * DIM // HEADS)
    assert (make(headdim=8).nheads, make(headdim=8).headdim) == (8, 8)
    with pytest.raises(ValueError, match="headdim must divide expand \\* dim = 64; got 24"):
        make(headdim=24)
    with pytest.raises(ValueError, match="ngroups must divide the 4 heads; got 3"):
        make(ngroups=3)


def test_chunk_size_invariance_and_long_prefill_then_steps():
    T = 90
    u = randn(2, T, DIM)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[0, [3, 70, 71]] = False
    mask[1, :4] = False
    layer = make(chunk_size=16)
    full = layer(u, padding_mask=mask)
    torch.testing.assert_close(make(chunk_size=256)(u, padding_mask=mask), full, atol=1e-10, rtol=1e-10)
    cache = layer.new_cache(2)
    bounds = [0, 70, 71, 72, T]
    parts = [layer(u[:, a:b], padding_mask=mask[:, a:b], cache=cache) for a, b in itertools.pairwise(bounds)]
    assert cache.length == T and cache.conv_state.shape == (2, layer.conv1d.in_channels, 3)
    torch.testing.assert_close(torch.cat(parts, 1)[mask], full[mask], atol=1e-10, rtol=1e-10)


def test_extreme_dt_is_finite_under_bf16():
    for bias in (-30.0, 30.0):  # dt ~ 0 (no update) / dt ~ 30 (decay exp(-480): forget at once)
        layer = build_attention("mamba2", dim=DIM, num_heads=HEADS, causal=True, d_state=16)
        with torch.no_grad():
            layer.dt_bias.fill_(bias)
        u = torch.randn(1, 256, DIM, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(u)
        out.float().square().mean().backward()
        assert torch.isfinite(out.float()).all() and torch.isfinite(u.grad).all()


def test_gpt_trains_and_generates():
    torch.manual_seed(0)
    model = GPT(16, dim=32, depth=1, num_heads=4, attention={"name": "mamba2", "d_state": 16})
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
    ref = build_attention("mamba2", dim=DIM, num_heads=2, causal=causal, backend="torch", **{"d_state": 16})
    got = build_attention("mamba2", dim=DIM, num_heads=2, causal=causal, backend="triton", **{"d_state": 16})
    got.load_state_dict(ref.state_dict())
    x = torch.randn(1, 20, DIM)
    torch.testing.assert_close(got(x), ref(x), atol=1e-5 * ref(x).abs().max().item(), rtol=1e-4)
