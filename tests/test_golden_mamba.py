"""Golden test: attnzoo's mamba reproduces fla.layers.Mamba (fla-core 0.6.0, mamba_ssm parameter names) from its own
state_dict: full forward, prefill-then-step outputs, and the conv/ssm cache states. tests/golden/GOLDEN.md, mamba.pt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnzoo.layers import build_attention

GOLDEN = Path(__file__).parent / "golden" / "mamba.pt"
TOL = dict(atol=1e-5, rtol=1e-5)  # float32 file (GOLDEN.md)


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


def build(golden):
    kw = golden["init_kwargs"]
    dim = kw["hidden_size"]
    layer = build_attention(
        "mamba",
        dim=dim,
        num_heads=1,
        causal=True,
        d_state=kw["state_size"],
        d_conv=kw["conv_kernel"],
        expand=kw["intermediate_size"] / dim,
        dt_rank=kw["dt_rank"],
        conv_bias=kw["use_conv_bias"],
        bias=kw["use_bias"],
    )
    layer.load_state_dict(golden["state_dict"], strict=True)  # official names load as they are
    return layer.eval()


def test_full_forward(golden):
    layer = build(golden)
    with torch.no_grad():
        out = layer(golden["x"])
    torch.testing.assert_close(out, golden["out"], **TOL)


def test_prefill_then_step_and_states(golden):
    layer = build(golden)
    x, n = golden["x"], golden["prefill_len"]
    cache = layer.new_cache(x.shape[0])
    with torch.no_grad():
        parts = [layer(x[:, :n], cache=cache)]
        torch.testing.assert_close(cache.conv_state, golden["conv_state_after_prefill"], **TOL)
        torch.testing.assert_close(cache.ssm_state, golden["ssm_state_after_prefill"], **TOL)
        parts += [layer(x[:, t : t + 1], cache=cache) for t in range(n, x.shape[1])]
    torch.testing.assert_close(torch.cat(parts, dim=1), golden["out_prefill_then_step"], **TOL)
    torch.testing.assert_close(cache.conv_state, golden["conv_state_final"], **TOL)
    torch.testing.assert_close(cache.ssm_state, golden["ssm_state_final"], **TOL)
