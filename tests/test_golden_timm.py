"""Golden: the zoo ``softmax`` layer with timm's weights reproduces timm 1.0.31's ``Attention`` (GOLDEN.md,
timm_attention.pt): same parameter names, so the official state_dict loads with ``strict=True``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnzoo.layers import build_attention

GOLDEN = Path(__file__).parent / "golden" / "timm_attention.pt"


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


@pytest.mark.parametrize("causal", [False, True], ids=["out", "out_causal"])
def test_softmax_matches_timm_attention(golden, causal):
    kw = golden["init_kwargs"]
    layer = build_attention(
        "softmax", dim=kw["dim"], num_heads=kw["num_heads"], causal=causal, qkv_bias=kw["qkv_bias"]
    ).double()
    layer.load_state_dict(golden["state_dict"], strict=True)
    layer.eval()
    got = layer(golden["x"])
    ref = golden["out_causal" if causal else "out"]
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
