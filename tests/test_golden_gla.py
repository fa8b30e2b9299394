"""Golden vectors for the GLA ops: FLA 0.6.0's naive recurrences (``naive_recurrent_gla``,
``naive_recurrent_simple_gla``) on saved float32 inputs, replayed through ``attnzoo.kernels.gla`` / ``simple_gla``
with the saved initial state (tests/golden/GOLDEN.md, section gla.pt, says how they were made)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from attnzoo.kernels import gla, simple_gla


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: with two threads on a loaded two-core machine, OpenMP's waiting costs far more than
    the work (measured 30x slower for the token loop of the reference), so each test runs on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


GOLDEN = torch.load(Path(__file__).parent / "golden" / "gla.pt", weights_only=True)
HAS_TRITON = importlib.util.find_spec("triton") is not None and importlib.util.find_spec("attnzoo.kernels.gla.triton")
BACKENDS = [
    "reference",
    "torch",
    pytest.param("triton", id="triton-interpreter", marks=pytest.mark.skipif(not HAS_TRITON, reason="needs triton")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,case,gate", [(gla, "gla", "gk"), (simple_gla, "simple_gla", "g")], ids=["gla", "simple"])
def test_matches_fla_naive_recurrence(op, case, gate, backend):
    d, c = GOLDEN, GOLDEN[case]
    o, final = op(
        d["q"],
        d["k"],
        d["v"],
        c[gate],
        initial_state=c["initial_state"],
        output_final_state=True,
        backend=backend,
        chunk_size=16 if backend == "triton" else 64,
    )
    assert d["meta"]["scale"] == d["q"].shape[-1] ** -0.5  # the file used the default scale, as we do
    torch.testing.assert_close(o, c["o"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, c["final_state"], atol=1e-5, rtol=1e-5)
