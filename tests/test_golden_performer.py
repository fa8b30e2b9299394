"""Golden test: attnzoo's Performer reproduces performer-pytorch 1.1.4 (tests/golden/performer.pt, GOLDEN.md).

Both the ops level (``FastAttention`` on given q, k, v, through ``favor_attention`` with ``official_favor_options``)
and the module level (``SelfAttention`` through ``Performer.from_official``), causal and non-causal, in float64.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnzoo.layers.performer import Performer, favor_attention, official_favor_options

GOLDEN = torch.load(Path(__file__).parent / "golden" / "performer.pt", weights_only=True)
TOL = dict(atol=1e-10, rtol=1e-10)  # GOLDEN.md: float64 files


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_fast_attention_matches_official(causal):
    d = GOLDEN["fast"]
    q, k, v = (d[n].transpose(1, 2) for n in ("q", "k", "v"))  # official (B, H, T, D) -> ours (B, T, H, D)
    got, _ = favor_attention(
        q, k, v, d["state_dict"]["projection_matrix"], causal=causal, **official_favor_options(causal)
    )
    ref = d["out_causal" if causal else "out_noncausal"]
    torch.testing.assert_close(got.transpose(1, 2), ref, **TOL)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_self_attention_matches_official(causal):
    d = GOLDEN["self_attention"]
    layer = Performer.from_official(d["state_dict"], causal=causal, **d["init_kwargs"]).eval()
    got = layer(d["x"])
    torch.testing.assert_close(got, d["out_causal" if causal else "out_noncausal"], **TOL)


def test_zoo_defaults_differ_from_official_only_slightly():
    """The default (exactly causal) numerics are a different, documented choice: close to the official, not equal."""
    d = GOLDEN["self_attention"]
    official = Performer.from_official(d["state_dict"], causal=True, **d["init_kwargs"]).eval()
    ours = Performer(64, 4, causal=True, nb_features=64).double().eval()
    ours.load_state_dict(official.state_dict())
    diff = (ours(d["x"]) - d["out_causal"]).abs().max().item()
    assert 1e-12 < diff < 0.05


def test_from_official_rejects_what_the_contract_cannot_express():
    d = GOLDEN["self_attention"]
    kwargs = {**d["init_kwargs"], "dim_head": 64}  # performer-pytorch's default, != dim // heads
    with pytest.raises(ValueError, match="dim_head \\* heads must equal dim"):
        Performer.from_official(d["state_dict"], **kwargs)
    with pytest.raises(ValueError, match="local_heads=1"):
        Performer.from_official(d["state_dict"], **{**d["init_kwargs"], "local_heads": 1})
