"""torch.compile(fullgraph=True) for every registered attention and every pattern it declares, against eager.

Generated over ``list_attention()`` and each class's ``patterns``, so a newly registered layer is covered on import.
Fullgraph means no graph break: a ``.item()`` host sync, an ``out=`` write into a strided view or a data-dependent
Python branch anywhere in the layer or its kernels fails the test. The fast suite traces one pattern per layer with
dynamo's ``eager`` backend (tracing is where graph breaks show up); every pattern through AOT autograd
(``aot_eager``: the functionalized forward and backward graphs), decoding with a cache, inductor and a whole GPT are
``slow``.
"""

from __future__ import annotations

import pytest
import torch

from attnzoo.layers import PATTERNS, attention_class, build_attention, list_attention, pattern_flags
from attnzoo.models.gpt import GPT

DIM, HEADS, B, T, S = 32, 4, 2, 11, 7


def _fast_pattern(name: str) -> str:
    """The pattern a layer is traced with in the fast suite: causal_self where it has it (the recurrent kernels)."""
    patterns = attention_class(name).patterns
    return "causal_self" if "causal_self" in patterns else next(p for p in PATTERNS if p in patterns)


ALL_CASES = [
    pytest.param(n, p, id=f"{n}-{p}") for n in list_attention() for p in PATTERNS if p in attention_class(n).patterns
]
FAST_CASES = [pytest.param(n, _fast_pattern(n), id=f"{n}-{_fast_pattern(n)}") for n in list_attention()]
SLOW_CASES = [c for c in ALL_CASES if c.values[1] != _fast_pattern(c.values[0])]
CAUSAL_CASES = [c for c in ALL_CASES if c.values[1].startswith("causal")]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every case compiles from scratch: no cached graph or recompile limit carries over between layers."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _layer(name: str, pattern: str, dtype: torch.dtype = torch.float64):
    torch.manual_seed(0)
    return build_attention(name, dim=DIM, num_heads=HEADS, **pattern_flags(pattern)).to(dtype).eval()


def _inputs(pattern: str, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, DIM, generator=gen, dtype=dtype)
    context = None
    if pattern.endswith("cross"):
        context = torch.randn(B, T if pattern == "causal_cross" else S, DIM, generator=gen, dtype=dtype)
    mask = torch.ones(B, T if context is None else context.shape[1], dtype=torch.bool)
    mask[0, 1] = False  # a hole
    mask[1, -2:] = False  # right padding
    return x, context, mask


def _forward_and_grads(layer, x, context, mask):
    """Output and the gradients of a loss that weights every output entry differently, w.r.t. x and context."""
    x = x.clone().requires_grad_(True)
    context = None if context is None else context.clone().requires_grad_(True)
    out = layer(x, context=context, padding_mask=mask)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    leaves = [x] if context is None else [x, context]
    grads = torch.autograd.grad((out * weights).sum(), leaves)
    return out.detach(), grads


def _check_against_eager(name: str, pattern: str, backend: str, masked: bool, dtype=torch.float64, tol=1e-10):
    layer = _layer(name, pattern, dtype)
    x, context, mask = _inputs(pattern, dtype)
    mask = mask if masked else None
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    got, got_grads = _forward_and_grads(compiled, x, context, mask)
    ref, ref_grads = _forward_and_grads(layer, x, context, mask)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=tol, rtol=tol)


@pytest.mark.parametrize("name,pattern", FAST_CASES)
def test_fullgraph_trace_matches_eager(name, pattern):
    _check_against_eager(name, pattern, "eager", masked=True)


@pytest.mark.slow
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("name,pattern", ALL_CASES)
def test_fullgraph_aot_autograd_matches_eager(name, pattern, masked):
    _check_against_eager(name, pattern, "aot_eager", masked=masked)


@pytest.mark.slow
@pytest.mark.parametrize("name,pattern", SLOW_CASES)
def test_fullgraph_trace_other_patterns(name, pattern):
    _check_against_eager(name, pattern, "eager", masked=True)


@pytest.mark.slow
@pytest.mark.parametrize("name,pattern", CAUSAL_CASES)
def test_fullgraph_decode_matches_eager(name, pattern):
    """Prefill, single steps and a multi-token chunk through the compiled layer give eager's outputs, cache in place."""
    layer = _layer(name, pattern)
    x, context, mask = _inputs(pattern)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    caches = layer.new_cache(B), layer.new_cache(B)
    outs = [], []
    for a, b in ((0, 6), (6, 7), (7, 8), (8, T)):
        piece = dict(context=None if context is None else context[:, a:b], padding_mask=mask[:, a:b])
        for fn, cache, out in zip((compiled, layer), caches, outs, strict=True):
            with torch.no_grad():
                out.append(fn(x[:, a:b], cache=cache, **piece))
    torch.testing.assert_close(torch.cat(outs[0], 1), torch.cat(outs[1], 1), atol=1e-10, rtol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("name,pattern", FAST_CASES)
def test_inductor_matches_eager(name, pattern):
    """Generated code in float32 (inductor's reductions and fusions reorder sums: float32 tolerances)."""
    _check_against_eager(name, pattern, "inductor", masked=True, dtype=torch.float32, tol=1e-4)


@pytest.mark.slow
def test_gpt_default_config_compiles_fullgraph():
    torch.manual_seed(0)
    model = GPT(64).eval()
    idx = torch.randint(0, 64, (2, 16))
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx), model(idx), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_training_with_compile_true(cfg_train, tmp_path):
    """``compile=true`` trains and tests the default config through the compiled model."""
    import json
    import math

    from omegaconf import open_dict

    from attnzoo.training import run

    with open_dict(cfg_train):
        cfg_train.compile = True
        cfg_train.trainer.fast_dev_run = True
    run(cfg_train)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert math.isfinite(summary["test_metrics"]["test/loss"])
