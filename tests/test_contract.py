"""Registry-wide contract tests: every registered attention x every pattern it has, with no per-layer lists.

A layer that registers itself is tested here on import. Cases are generated only for the patterns a layer declares
(``cls.patterns``); that building any other pattern raises the registry's clear error is tested in test_registry.py
(one case per unsupported pair). What each test checks is the contract in attnzoo/layers/registry.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from attnzoo.layers import PATTERNS, attention_class, build_attention, list_attention, pattern_flags
from attnzoo.layers.kv_cache import KVCache

DIM, HEADS = 32, 4
CASES = [
    pytest.param(n, p, id=f"{n}-{p}") for n in list_attention() for p in PATTERNS if p in attention_class(n).patterns
]
CAUSAL_CASES = [c for c in CASES if c.values[1].startswith("causal")]
CROSS_CASES = [c for c in CASES if c.values[1].endswith("cross")]
CAUSAL_CROSS_CASES = [c for c in CASES if c.values[1] == "causal_cross"]


def make(name: str, pattern: str, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    return build_attention(name, dim=DIM, num_heads=HEADS, **pattern_flags(pattern)).to(dtype).eval()


def inputs(pattern: str, B: int = 2, T: int = 11, S: int | None = None, dtype=torch.float64, seed: int = 1):
    """x (B, T, DIM) and, for cross patterns, a context (B, S, DIM) (S = T unless given)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, DIM, generator=gen, dtype=dtype)
    context = None
    if pattern.endswith("cross"):
        context = torch.randn(B, T if S is None else S, DIM, generator=gen, dtype=dtype)
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
    kv_len = S if pattern.endswith("cross") else T
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


# ----------------------------------------------------------------------------------------------------------------
# causal_cross with S != T: bottom-right alignment (query i of T sees context j <= i + S - T)


@pytest.mark.parametrize("name,pattern", CAUSAL_CROSS_CASES)
@pytest.mark.parametrize("T,S", [(7, 12), (12, 7), (5, 1)], ids=["S>T", "S<T", "S=1"])
def test_causal_cross_sees_exactly_the_aligned_context(name, pattern, T, S):
    """Changing context position j changes the output at query i exactly when j <= i + S - T."""
    layer = make(name, pattern)
    x, context = inputs(pattern, T=T, S=S)
    full = run(layer, x, context)
    for j in sorted({0, S // 2, S - 1}):
        changed = context.clone()
        changed[:, j] += 3 * torch.randn(2, DIM, generator=torch.Generator().manual_seed(j), dtype=x.dtype)
        diff = (run(layer, x, changed) - full).abs().amax(dim=(0, 2))  # (T,)
        sees = torch.arange(T) + S - T >= j
        assert (diff[~sees] == 0).all(), f"queries {(~sees).nonzero().flatten().tolist()} see context {j}"
        assert (diff[sees] > 1e-8).all(), f"queries {sees.nonzero().flatten().tolist()} should see context {j}"


@pytest.mark.parametrize("name,pattern", CAUSAL_CROSS_CASES)
def test_causal_cross_queries_before_the_context_see_nothing(name, pattern):
    """With S < T the first T - S queries have no visible context: their attention output is zero, so the layer's
    output there does not depend on the context and is the same as for a query whose context is entirely padded."""
    layer = make(name, pattern)
    T, S = 9, 4
    x, context = inputs(pattern, T=T, S=S)
    out = run(layer, x, context)
    other = run(layer, x, torch.randn_like(context))
    torch.testing.assert_close(out[:, : T - S], other[:, : T - S], atol=0, rtol=0)
    none_visible = run(layer, x, context, padding_mask=torch.zeros(2, S, dtype=torch.bool))
    assert torch.isfinite(none_visible).all()
    torch.testing.assert_close(out[:, : T - S], none_visible[:, : T - S], atol=1e-12, rtol=0)


@pytest.mark.parametrize("name,pattern", CAUSAL_CROSS_CASES)
@pytest.mark.parametrize("offset", [3, -3], ids=["S>T", "S<T"])
def test_causal_cross_prefix_runs_equal_the_full_run(name, pattern, offset):
    """Query i's output equals a run on x[:i+1] and context[:i+1+S-T] (the same offset S - T)."""
    layer = make(name, pattern)
    T = 10
    x, context = inputs(pattern, T=T, S=T + offset)
    full = run(layer, x, context)
    for t in (4, 6, 8):
        prefix = run(layer, x[:, : t + 1], context[:, : t + 1 + offset])
        torch.testing.assert_close(prefix, full[:, : t + 1], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name,pattern", CAUSAL_CROSS_CASES)
@pytest.mark.parametrize("offset", [4, 0, -3], ids=["S>T", "S=T", "S<T"])
@pytest.mark.parametrize("with_padding", [False, True], ids=["dense", "padded"])
def test_causal_cross_streaming_equals_full(name, pattern, offset, with_padding):
    """Streaming cross decode: a prefill of 5 queries with 5 + S - T context positions, then calls that add as many
    query as context positions (single-token steps and a 2-token chunk), equals one full forward."""
    layer = make(name, pattern)
    T = 11
    S = T + offset
    x, context = inputs(pattern, T=T, S=S)
    mask = None
    if with_padding:
        mask = torch.ones(2, S, dtype=torch.bool)
        mask[0, [0, S - 4]] = False
        mask[1, 1] = False
    full = run(layer, x, context, padding_mask=mask)
    cache = layer.new_cache(2)
    bounds = [0, 5, 6, 7, 8, 9, T]  # query positions of each call; context positions are these + offset
    parts = []
    for a, b in itertools.pairwise(bounds):
        c0, c1 = (0 if a == 0 else a + offset), b + offset
        piece = None if mask is None else mask[:, c0:c1]
        parts.append(layer(x[:, a:b], context=context[:, c0:c1], padding_mask=piece, cache=cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name,pattern", CAUSAL_CROSS_CASES)
def test_causal_cross_state_size_counts_context(name, pattern):
    """``state_size(S)`` for causal_cross counts the S context positions consumed, whatever the query count."""
    layer = make(name, pattern)
    x, context = inputs(pattern, T=8, S=75)
    cache = layer.new_cache(2)
    layer(x[:, :4], context=context[:, :71], cache=cache)
    assert values_held(cache, 2) == layer.state_size(71)
    for t in range(4, 8):
        layer(x[:, t : t + 1], context=context[:, 67 + t : 68 + t], cache=cache)
    assert values_held(cache, 2) == layer.state_size(75)


@pytest.mark.parametrize("name,pattern", CAUSAL_CROSS_CASES)
def test_causal_cross_step_may_not_hide_cached_context(name, pattern):
    """Once the cache holds context, a call with T > S + 1 would show its first query less context than an earlier
    query saw: a clear error. T = S + 1 (the offset shrinks by one) is allowed."""
    layer = make(name, pattern)
    x, context = inputs(pattern, T=8, S=8)
    cache = layer.new_cache(2)
    layer(x[:, :3], context=context[:, :3], cache=cache)
    layer(x[:, 3:5], context=context[:, 3:4], cache=cache)  # T = S + 1
    with pytest.raises(ValueError, match=r"at most one more query than context position per call \(got T=3, S=1\)"):
        layer(x[:, 5:8], context=context[:, 4:5], cache=cache)


@pytest.mark.parametrize("name,pattern", CROSS_CASES)
def test_empty_context_raises(name, pattern):
    layer = make(name, pattern)
    x, context = inputs(pattern)
    with pytest.raises(ValueError, match=r"context has no positions \(S=0\)"):
        run(layer, x, context[:, :0])
    with pytest.raises(ValueError, match=r"context must have shape \(B=2, S, dim=32\)"):
        run(layer, x, context[:1])


@pytest.mark.parametrize("name,pattern", CROSS_CASES)
@pytest.mark.parametrize("T,S", [(6, 13), (13, 6)], ids=["S>T", "S<T"])
def test_cross_padded_context_changes_nothing(name, pattern, T, S):
    """A padded context position has no influence with S != T; with a cache (causal_cross), streaming the padded
    context, clean or with noise at the padded positions, gives the full forward's outputs."""
    layer = make(name, pattern)
    x, context = inputs(pattern, T=T, S=S)
    mask = torch.ones(2, S, dtype=torch.bool)
    mask[0, [0, S // 2]] = False
    mask[1, -2:] = False
    noisy = torch.where(mask[..., None], context, 5 * torch.randn_like(context))
    out = run(layer, x, context, padding_mask=mask)
    torch.testing.assert_close(run(layer, x, noisy, padding_mask=mask), out, atol=1e-10, rtol=1e-10)
    if not layer.causal:
        return
    offset = S - T
    start = max(1, 1 - offset)  # the prefill: enough queries that it has at least one context position
    for ctx in (context, noisy):
        cache = layer.new_cache(2)
        parts = [
            layer(x[:, :start], context=ctx[:, : start + offset], padding_mask=mask[:, : start + offset], cache=cache)
        ]
        for t in range(start, T):
            step = slice(t + offset, t + offset + 1)
            parts.append(layer(x[:, t : t + 1], context=ctx[:, step], padding_mask=mask[:, step], cache=cache))
        torch.testing.assert_close(torch.cat(parts, dim=1), out, atol=1e-9, rtol=1e-9)
