"""mamba layer: the paper's properties (Gu & Dao 2023) beyond the registry-wide contract tests."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnzoo.layers import build_attention
from attnzoo.models.gpt import GPT

DIM = 32


def make(causal=True, dtype=torch.float64, seed=0, **options):
    torch.manual_seed(seed)
    return build_attention("mamba", dim=DIM, num_heads=4, causal=causal, **options).to(dtype).eval()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_init_properties(causal):
    layer = build_attention("mamba", dim=DIM, num_heads=4, causal=causal, d_state=8, dt_min=0.002, dt_max=0.05)
    suffixes = ["", "_b"] if not causal else [""]
    for sfx in suffixes:
        dt_proj = getattr(layer, f"dt_proj{sfx}")
        A_log = getattr(layer, "A_log" if not sfx else "A_b_log")
        D = getattr(layer, f"D{sfx}")
        dt = F.softplus(dt_proj.bias.detach().double())
        assert dt.min() >= max(0.002, 1e-4) * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
        assert dt.max() / dt.min() > 3  # a log-uniform spread, not a constant
        expected_A = -torch.arange(1, 9, dtype=torch.float32).repeat(layer.d_inner, 1)
        torch.testing.assert_close(-torch.exp(A_log.detach()), expected_A)
        assert A_log.dtype == torch.float32 and D.dtype == torch.float32
        assert torch.equal(D.detach(), torch.ones(layer.d_inner))
        assert A_log._no_weight_decay and D._no_weight_decay and dt_proj.bias._no_reinit
        bound = layer.dt_rank**-0.5
        assert dt_proj.weight.abs().max() <= bound and dt_proj.weight.abs().max() > 0.5 * bound
    assert layer.dt_rank == math.ceil(DIM / 16) and layer.d_inner == 2 * DIM


def test_dt_init_constant_and_floor():
    layer = build_attention(
        "mamba",
        dim=DIM,
        num_heads=1,
        causal=True,
        dt_init="constant",
        dt_scale=2.0,
        dt_min=1e-6,
        dt_max=2e-6,
        dt_init_floor=1e-3,
    )
    assert torch.allclose(layer.dt_proj.weight, torch.full_like(layer.dt_proj.weight, 2.0 * layer.dt_rank**-0.5))
    torch.testing.assert_close(F.softplus(layer.dt_proj.bias), torch.full((2 * DIM,), 1e-3))  # all floored


def test_bad_options_raise():
    with pytest.raises(ValueError, match="dt_init must be one of"):
        build_attention("mamba", dim=DIM, num_heads=4, causal=True, dt_init="randn")
    with pytest.raises(ValueError, match="dt_rank must be 'auto' or a positive int"):
        build_attention("mamba", dim=DIM, num_heads=4, causal=True, dt_rank="full")


def test_rescale_out_proj():
    layer = make(dtype=torch.float32)
    layer.rescale_out_proj(num_layers=8, residuals_per_layer=2)
    bound = 1 / math.sqrt(layer.d_inner) / math.sqrt(16)  # kaiming_uniform(a=sqrt(5)) bound, then / sqrt(2 * 8)
    w = layer.out_proj.weight.abs().max().item()
    assert 0.9 * bound < w <= bound


def test_step_by_step_states_equal_full_forward():
    """Prefill 0 tokens then T single steps == one cached call over T: outputs and final conv/ssm states."""
    layer = make()
    x = torch.randn(2, 9, DIM, dtype=torch.float64)
    full_cache, step_cache = layer.new_cache(2), layer.new_cache(2)
    full = layer(x, cache=full_cache)
    steps = torch.cat([layer(x[:, t : t + 1], cache=step_cache) for t in range(9)], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(step_cache.conv_state, full_cache.conv_state, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(step_cache.ssm_state, full_cache.ssm_state, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(full, layer(x), atol=1e-10, rtol=1e-10)
    # the conv state holds the last d_conv pre-conv inputs, oldest first
    xs = layer.in_proj(x)[..., : layer.d_inner].transpose(1, 2)
    torch.testing.assert_close(full_cache.conv_state, xs[..., -layer.d_conv :])


def test_short_prefill_left_pads_conv_state_with_zeros():
    layer = make()
    cache = layer.new_cache(1)
    x = torch.randn(1, 2, DIM, dtype=torch.float64)
    layer(x, cache=cache)
    assert torch.equal(cache.conv_state[..., :2], torch.zeros_like(cache.conv_state[..., :2]))


def test_bidirectional_sees_both_sides():
    layer = make(causal=False)
    x = torch.randn(1, 12, DIM, dtype=torch.float64)
    out = layer(x)
    last_changed, first_changed = x.clone(), x.clone()
    last_changed[:, -1] += 1.0
    first_changed[:, 0] += 1.0
    assert (layer(last_changed)[:, 0] - out[:, 0]).abs().max() > 1e-6  # position 0 sees the future
    assert (layer(first_changed)[:, -1] - out[:, -1]).abs().max() > 1e-6  # and the last position the past


def test_bidirectional_is_average_of_two_scans():
    """With the backward-direction parameters equal to the forward ones, reversing the input reverses the output."""
    layer = make(causal=False)
    for name in ("conv1d", "x_proj", "dt_proj"):
        getattr(layer, f"{name}_b").load_state_dict(getattr(layer, name).state_dict())
    layer.A_b_log.data.copy_(layer.A_log.data)
    layer.D_b.data.copy_(layer.D.data)
    x = torch.randn(2, 10, DIM, dtype=torch.float64)
    torch.testing.assert_close(layer(x.flip(1)), layer(x).flip(1), atol=1e-10, rtol=1e-10)


def test_gpt_mamba_trains_and_generates():
    torch.manual_seed(0)
    model = GPT(vocab_size=16, dim=32, depth=1, num_heads=1, attention="mamba", mlp_ratio=0)
    data = torch.arange(16).repeat(2, 2)[:, :25]  # a periodic sequence: learnable in a few steps
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 16), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    prompt = data[:1, :8]
    cached = model.generate(prompt, 6, temperature=0)
    uncached = model.generate(prompt, 6, temperature=0, use_cache=False)
    assert cached.shape == (1, 14) and torch.equal(cached, uncached)
