"""Property fuzzing of the attention contract: every registered attention x pattern, random shapes.

Hypothesis draws the batch, the length (1 .. 300, so lengths that are no multiple of any chunk size and the single
token case both appear), heads, head dims, a padding pattern and cache split points, and checks the contract's
properties: finite outputs, causality, cache == full forward, padding invariance; causal_cross with a context
length S != T (bottom-right alignment). Bounded (few examples per case, no
deadline) so the default run stays short; the long-sequence check is slow-marked.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from attnzoo.layers import PATTERNS, attention_class, attention_info, build_attention, list_attention, pattern_flags

# only the patterns each layer declares (an undeclared one is the registry's error, tested in test_registry.py)
CASES = [
    pytest.param(n, p, id=f"{n}-{p}") for n in list_attention() for p in PATTERNS if p in attention_class(n).patterns
]
FUZZ = settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)


@st.composite
def problems(draw, pattern: str):
    B = draw(st.integers(1, 3))
    T = draw(st.sampled_from([1, 2, 7, 63, 65, 129, 300]) | st.integers(1, 300))
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([8, 12, 16]))
    S = T  # self: the keys are x; causal_cross: S = T + offset, bottom-right aligned (query i sees j <= i + S - T)
    if pattern == "noncausal_cross":
        S = draw(st.integers(1, 200))
    elif pattern == "causal_cross":
        S = T + draw(st.sampled_from([0, 1, -1]) | st.integers(1 - T, 40))
    keep = draw(st.lists(st.booleans(), min_size=B * S, max_size=B * S))
    splits = sorted(set(draw(st.lists(st.integers(1, max(T - 1, 1)), max_size=4))))
    return B, T, S, heads, head_dim, keep, [s for s in splits if 0 < s < T]


def build(name, pattern, dim, heads):
    torch.manual_seed(0)
    try:
        layer = build_attention(name, dim=dim, num_heads=heads, **pattern_flags(pattern))
    except ValueError as err:  # a shape this layer documents as unsupported (e.g. divisibility of a derived width)
        assume(False, f"{name}: {err}")
    return layer.double().eval()


@pytest.mark.parametrize("name,pattern", CASES)
def test_fuzz_contract(name, pattern):
    @FUZZ
    @given(problem=problems(pattern))
    def check(problem):
        B, T, S, heads, head_dim, keep, splits = problem
        dim = heads * head_dim
        layer = build(name, pattern, dim, heads)
        gen = torch.Generator().manual_seed(T * 31 + S)
        x = torch.randn(B, T, dim, generator=gen, dtype=torch.float64)
        context = torch.randn(B, S, dim, generator=gen, dtype=torch.float64) if pattern.endswith("cross") else None
        mask = torch.tensor(keep, dtype=torch.bool).view(B, S)
        mask[:, 0] = True  # at least one real key per sequence
        ctx = {"context": context}

        out = layer(x, padding_mask=mask, **ctx)
        assert out.shape == x.shape and torch.isfinite(out).all()

        # padding invariance: whatever sits at padded key positions is irrelevant
        noise = torch.randn(B, S, dim, generator=gen, dtype=torch.float64) * 2
        if context is not None:
            out2 = layer(x, padding_mask=mask, context=torch.where(mask[..., None], context, noise))
            real = torch.ones(B, T, dtype=torch.bool)
        else:
            out2 = layer(torch.where(mask[..., None], x, noise), padding_mask=mask)
            real = mask
        torch.testing.assert_close(out2[real], out[real], atol=1e-9, rtol=1e-9)

        if not layer.causal:
            return
        dense = layer(x, **ctx)
        # query position q reads context up to q + offset (bottom-right alignment; offset 0 for self-attention)
        offset = S - T
        # a call needs at least one context position: split points before the context starts are dropped
        splits = [t for t in splits if t + offset >= 1]
        # causality: the prefix's outputs do not depend on what follows (in both streams)
        t = splits[0] if splits else T
        prefix = layer(x[:, :t], context=None if context is None else context[:, : t + offset])
        torch.testing.assert_close(prefix, dense[:, :t], atol=1e-9, rtol=1e-9)
        # cache: prefill + chunks at the drawn split points == one full forward (each chunk adds as many query as
        # context positions, so the offset stays S - T)
        cache = layer.new_cache(B)
        bounds = [0, *splits, T]
        parts = [
            layer(
                x[:, a:b],
                cache=cache,
                context=None if context is None else context[:, (a + offset if a else 0) : b + offset],
            )
            for a, b in itertools.pairwise(bounds)
        ]
        torch.testing.assert_close(torch.cat(parts, dim=1), dense, atol=1e-9, rtol=1e-9)

    check()


QUADRATIC_MEMORY = {"landmark"}  # layers whose memory grows with T x T by design


@pytest.mark.slow
@pytest.mark.parametrize("name", list_attention())
def test_long_sequence_bf16_is_finite(name):
    """T = 16384 (4096 for a layer with T x T memory) under bf16 autocast: finite outputs and gradients (states and
    denominators stay in float32).

    The causal pattern when the layer has one, else the non-causal one; a layer with a positional bound (cosFormer's
    ``max_len``) is built to cover the sequence.
    """
    # landmark's grouped softmax weighs every key (T x T scores per head, as the paper's): 16384 tokens need ~25 GB
    T = 4096 if name in QUADRATIC_MEMORY else 16384
    pattern = "causal_self" if "causal_self" in attention_class(name).patterns else "noncausal_self"
    options = {"max_len": T} if "max_len" in attention_info(name).options else {}
    torch.manual_seed(0)
    layer = build_attention(name, dim=64, num_heads=4, **pattern_flags(pattern), **options)
    x = torch.randn(1, T, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().square().mean().backward()
    assert torch.isfinite(out.float()).all()
    assert torch.isfinite(x.grad).all()
