"""Golden: ``agent`` built from the official DeiT ``AgentAttention`` weights (GOLDEN.md, agent_attention.pt: 16 and 9
agents, class token, 4x4 grid) reproduces its output, float64 to 1e-10."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnzoo.layers.agent import AgentAttention

GOLDEN = Path(__file__).parent / "golden" / "agent_attention.pt"


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


@pytest.mark.parametrize("case", ["agent16", "agent9"])
def test_output_matches_official(golden, case):
    layer = AgentAttention.from_official(golden[case]["state_dict"], **golden[case]["init_kwargs"]).eval()
    assert layer.grid_size == (4, 4) and layer.num_prefix_tokens == 1
    got = layer(golden["x"])
    torch.testing.assert_close(got, golden[case]["out"], atol=1e-10, rtol=1e-10)
