"""Registry-wide contract tests: every registered attention x every pattern it has, with no per-layer lists.

A layer that registers itself is tested here on import. Cases are generated only for the patterns a layer declares
(``cls.patterns``); that building any other pattern raises the registry's clear error is tested in test_registry.py
(one case per unsupported pair). What each test checks is the contract in attnzoo/layers/registry.py.
"""

from __future__ import annotations

import pytest
import torch

from attnzoo.layers import PATTERNS, attention_class, build_attention, list_attention, pattern_flags
from attnzoo.layers.kv_cache import KVCache

DIM, HEADS = 32, 4
CASES = [
    pytest.param(n, p, id=f"{n}-{p}") for n in list_attention() for p in PATTERNS if p in attention_class(n).patterns
]
CAUSAL_CASES = [c for c in CASES if c.values[1].startswith("causal")]


def make(name: str, pattern: str, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    return build_attention(name, dim=DIM, num_heads=HEADS, **pattern_flags(pattern)).to(dtype).eval()


def inputs(pattern: str, B: int = 2, T: int = 11, S: int = 11, dtype=torch.float64, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, DIM, generator=gen, dtype=dtype)
    context = None
    if pattern.endswith("cross"):
        S = T if pattern == "causal_cross" else S
        context = torch.randn(B, S, DIM, generator=gen, dtype=dtype)
    return x, context


def run(layer, x, context, **kw):
    return layer(x, context=context, **kw)


@pytest.mark.parametrize("name,pattern", CASES)
def test_shape_and_backward(name, pattern):
    layer = make(name, pattern, dtype=torch.float32).train()
    x, context = inputs(pattern, S=7, dtype=torch.float32)
    x.requires_grad_(True)
    out = run(layer, x, context)
    assert out.shape == x.shape
    loss = out.square().mean() + (layer.aux_loss if layer.aux_loss is not None else 0.0)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    grads = [p.grad for p in layer.parameters() if p.requires_grad and p.grad is not None]
    assert grads, f"{name}: no parameter received a gradient"
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name,pattern", CAUSAL_CASES)
def test_causality(name, pattern):
    """Output at i equals the output on the prefix x[:, :i+1] (changing the future changes nothing before it)."""
    layer = make(name, pattern)
    x, context = inputs(pattern, T=12)
    full = run(layer, x, context)
    for t in (0, 4, 9):
        prefix = run(layer, x[:, : t + 1], None if context is None else context[:, : t + 1])
        torch.testing.assert_close(prefix, full[:, : t + 1], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name,pattern", CAUSAL_CASES)
@pytest.mark.parametrize("with_padding", [False, True], ids=["dense", "padded"])
def test_prefill_then_step_equals_full(name, pattern, with_padding):
    layer = make(name, pattern)
    T, split = 10, 6
    x, context = inputs(pattern, T=T)
    mask = None
    if with_padding:
        mask = torch.ones(2, T, dtype=torch.bool)
        mask[0, [2, 7]] = False
        mask[1, 0] = False
    full = run(layer, x, context, padding_mask=mask)

    def piece(a, b):
        return dict(
            context=None if context is None else context[:, a:b],
            padding_mask=None if mask is None else mask[:, a:b],
        )

    cache = layer.new_cache(2)
    parts = [layer(x[:, :split], cache=cache, **piece(0, split))]
    parts += [layer(x[:, t : t + 1], cache=cache, **piece(t, t + 1)) for t in range(split, T - 2)]
    parts += [layer(x[:, T - 2 :], cache=cache, **piece(T - 2, T))]  # a multi-token chunk after steps
    stepped = torch.cat(parts, dim=1)
    real = torch.ones_like(full[..., 0], dtype=torch.bool) if mask is None or pattern.endswith("cross") else mask
    torch.testing.assert_close(stepped[real], full[real], atol=1e-9, rtol=1e-9)


def _tensors(obj, seen: set[int]) -> list[torch.Tensor]:
    """Every tensor reachable from a cache object (attributes, dicts, lists, tuples), each once."""
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v, seen)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v, seen)]
    if hasattr(obj, "__dict__"):
        return [t for v in vars(obj).values() for t in _tensors(v, seen)]
    return []


def values_held(cache, batch_size: int) -> float:
    """Floating-point values the cache holds per sequence.

    Bool/int tensors (padding masks, counters) are bookkeeping, not state. :class:`KVCache` preallocates its time axis
    (dim 1 of its (B, capacity, ...) buffers, doubled when full), so only its first ``length`` positions count.
    """
    total = 0
    for t in _tensors(cache, set()):
        if not t.is_floating_point():
            continue
        if isinstance(cache, KVCache):
            t = t[:, : cache.length]
        total += t.numel()
    return total / batch_size


@pytest.mark.parametrize("name,pattern", CAUSAL_CASES)
def test_state_size_counts_the_values_in_the_cache(name, pattern):
    """``state_size(T)`` equals the values the cache actually holds after T positions: checked after 1 and 9
    single-token decode steps, and at T = 70 after one further 61-token chunk (past sliding_window's default window
    of 64 and the KV cache's first 16-position allocation; prefill-then-step equals stepping, tested above)."""
    layer = make(name, pattern)
    B, T = 2, 70
    x, context = inputs(pattern, B=B, T=T)
    cache = layer.new_cache(B)
    for start, end in [(0, 1), *((t, t + 1) for t in range(1, 9)), (9, T)]:
        layer(x[:, start:end], context=None if context is None else context[:, start:end], cache=cache)
        if end in (1, 9, T):
            held = values_held(cache, B)
            assert held == layer.state_size(end), (
                f"{name} {pattern}: state_size({end}) = {layer.state_size(end)}, but the cache holds {held} "
                f"values per sequence ({type(cache).__name__})"
            )


@pytest.mark.parametrize("name,pattern", CASES)
def test_padded_keys_have_no_influence(name, pattern):
    """Replacing what sits at padded key positions changes no output at a real position."""
    layer = make(name, pattern)
    T, S = 11, 9
    x, context = inputs(pattern, T=T, S=S)
    kv_len = S if pattern == "noncausal_cross" else T
    mask = torch.ones(2, kv_len, dtype=torch.bool)
    mask[0, [1, 5]] = False  # holes in the middle
    mask[1, -3:] = False  # right padding
    mask[1, 0] = False  # and left padding
    noise = torch.randn(2, kv_len, DIM, dtype=x.dtype) * 3
    if pattern.endswith("cross"):
        context2 = torch.where(mask[..., None], context, noise)
        x2 = x
    else:
        x2, context2 = torch.where(mask[..., None], x, noise), None
    out1 = run(layer, x, context, padding_mask=mask)
    out2 = run(layer, x2, context2, padding_mask=mask)
    assert torch.isfinite(out1).all()
    real_queries = mask if not pattern.endswith("cross") else torch.ones(2, T, dtype=torch.bool)
    torch.testing.assert_close(out1[real_queries], out2[real_queries], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name,pattern", CASES)
def test_float32_matches_float64(name, pattern):
    layer64 = make(name, pattern)
    layer32 = make(name, pattern, dtype=torch.float32)
    layer32.load_state_dict({k: v.float() for k, v in layer64.state_dict().items()})
    x, context = inputs(pattern)
    ref = run(layer64, x, context)
    got = run(layer32, x.float(), None if context is None else context.float())
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,pattern", CASES)
def test_bf16_autocast_is_finite(name, pattern):
    layer = make(name, pattern, dtype=torch.float32)
    x, context = inputs(pattern, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(layer, x, context)
    assert out.shape == x.shape and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("name", list_attention())
def test_unknown_option_names_the_close_match(name):
    with pytest.raises(TypeError, match="unknown option 'definitely_not_an_option'"):
        build_attention(name, dim=DIM, num_heads=HEADS, definitely_not_an_option=1)


@pytest.mark.parametrize("name,pattern", CASES)
def test_wrong_shapes_raise(name, pattern):
    layer = make(name, pattern)
    x, context = inputs(pattern)
    with pytest.raises(ValueError, match=rf"x must have shape \(B, T, dim={DIM}\)"):
        run(layer, x[..., :-1], context)
    with pytest.raises(ValueError, match="padding_mask must be a bool tensor"):
        run(layer, x, context, padding_mask=torch.ones(2, 3, dtype=torch.bool))
    if not layer.causal:
        with pytest.raises(ValueError, match="not causal"):
            layer.new_cache(2)


@pytest.mark.parametrize("name,pattern", CAUSAL_CASES)
def test_cache_for_another_batch_size_raises(name, pattern):
    layer = make(name, pattern)
    x, context = inputs(pattern, T=4)
    with pytest.raises(ValueError, match=r"cache was made for batch_size=3, but x has B=2"):
        run(layer, x, context, cache=layer.new_cache(3))
