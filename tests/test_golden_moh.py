"""Golden: ``moh`` built from the official MoH-DiT ``MoHAttention`` weights (GOLDEN.md, moh.pt) reproduces its output
(eval), its load-balance loss (train mode) and its top-k routed heads, float64 to 1e-10."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnzoo.layers.moh import MoHAttention

GOLDEN = Path(__file__).parent / "golden" / "moh.pt"


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


@pytest.fixture()
def layer(golden):
    return MoHAttention.from_official(golden["state_dict"], **golden["init_kwargs"])


def test_output_matches_official(golden, layer):
    got = layer.eval()(golden["x"])
    torch.testing.assert_close(got, golden["out"], atol=1e-10, rtol=1e-10)


def test_load_balance_loss_matches_official(golden, layer):
    layer.train()
    out = layer(golden["x"])  # dropout is 0, so the training output is the eval output
    torch.testing.assert_close(out, golden["out"], atol=1e-10, rtol=1e-10)
    ref = golden["load_balance_loss"]
    torch.testing.assert_close(layer.aux_loss, layer.lb_coeff * ref, atol=1e-12, rtol=1e-10)


def test_selected_heads_match_official(golden, layer):
    routing = layer.route(golden["x"])
    assert torch.equal(routing.indices, golden["routed_topk_indices"])
