"""landmark's FlexAttention lowering (``backend="flex"``: :func:`landmark_pattern` + the chunked log-normaliser through
``attnzoo.kernels.sparse_attention``) against the direct block einsum (``backend="torch"``).

FlexAttention has no CPU backward, so the flex comparisons run its CPU forward under ``torch.no_grad()``; the same
pattern through sparse_attention's gathered-tile and dense backends checks values and gradients in float64 without it.
"""

from __future__ import annotations

import pytest
import torch

import attnzoo.layers.landmark as landmark_module
from attnzoo.kernels.sparse_attention import check_kv_blocks
from attnzoo.layers import build_attention

DIM, HEADS = 32, 4
D = DIM // HEADS


def _has_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


needs_flex = pytest.mark.skipif(not _has_flex(), reason="torch.nn.attention.flex_attention is not available")


def make(dtype=torch.float32, **options):
    torch.manual_seed(0)
    layer = build_attention("landmark", dim=DIM, num_heads=HEADS, **options).to(dtype).eval()
    with torch.no_grad():  # a non-zero landmark vector, so the corrections are not just block means
        layer.landmark_key.normal_(0, 0.5)
    return layer


def padded(B: int, T: int) -> torch.Tensor:
    """Row 0 left-padded, row 1 right-padded (each over more than a block of 5), row 2 with holes: padding_mask."""
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, : T // 4] = False
    mask[1, -(T // 3) :] = False
    mask[2, 5:11] = False
    mask[2, T // 2] = False
    return mask


CASES = [  # (block_size, top_k_blocks, T): T not a multiple of block_size; 300 spans several 128-tiles
    pytest.param(size, top_k, T, id=f"block{size}-top{top_k}-T{T}")
    for size, top_k, T in [(5, None, 23), (4, 2, 23), (50, None, 300), (64, None, 300), (50, 2, 300), (64, 1, 300)]
]


@needs_flex
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("block_size,top_k,T", CASES)
def test_flex_forward_equals_the_einsum(causal, block_size, top_k, T, monkeypatch):
    """Same outputs (every row, padded queries included) with left, right and inner padding; the log-normaliser pass
    is cut into chunks of 16 queries, so chunk borders fall inside blocks."""
    monkeypatch.setattr(landmark_module, "LOG_NORM_CHUNK_ELEMENTS", 16 * 3 * HEADS * -(-T // block_size) * block_size)
    layer = make(causal=causal, block_size=block_size, top_k_blocks=top_k, backend="torch")
    x = torch.randn(3, T, DIM, generator=torch.Generator().manual_seed(T))
    mask = padded(3, T)
    with torch.no_grad():
        expected = layer(x, padding_mask=mask)
        layer.backend = "flex"
        got = layer(x, padding_mask=mask)
        unpadded = layer(x)
        layer.backend = "torch"
        unpadded_expected = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unpadded, unpadded_expected, rtol=1e-5, atol=1e-5)


@needs_flex
@pytest.mark.parametrize("top_k", [None, 1])
def test_flex_decode_equals_the_einsum(top_k):
    """Prefill, single-token steps and a last chunk (query offsets inside blocks), each on the flex path, equal one
    einsum forward; block 2 of row 0 has no real key (no landmark)."""
    layer = make(causal=True, block_size=4, top_k_blocks=top_k, backend="flex")
    x = torch.randn(2, 23, DIM)
    mask = torch.ones(2, 23, dtype=torch.bool)
    mask[0, [1, 8, 9, 10, 11, 13]] = False
    cache = layer.new_cache(2)
    with torch.no_grad():
        parts = [layer(x[:, :6], cache=cache, padding_mask=mask[:, :6])]
        parts += [layer(x[:, t : t + 1], cache=cache, padding_mask=mask[:, t : t + 1]) for t in range(6, 17)]
        parts += [layer(x[:, 17:], cache=cache, padding_mask=mask[:, 17:])]
        layer.backend = "torch"
        full = layer(x, padding_mask=mask)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "causal,top_k,q_offset",
    [(True, None, 0), (False, None, 0), (True, 2, 0), (False, 1, 0), (True, None, 13), (True, 1, 7)],
)
def test_pattern_values_and_gradients_equal_the_einsum_in_float64(causal, top_k, q_offset, monkeypatch):
    """The flex path's pattern and bias through sparse_attention's dense oracle and its gathered tiles (which have a
    backward on the CPU) equal the einsum to float64 rounding, gradients included (the log-normaliser in chunks of
    3 queries, recomputed in the backward); kv_blocks covers every pair the mask allows."""
    B, S, size = 2, 23, 5
    T = S - q_offset  # a cached call: the last T of S positions
    monkeypatch.setattr(landmark_module, "LOG_NORM_CHUNK_ELEMENTS", 3 * B * HEADS * 25)
    layer = make(torch.float64, causal=causal, block_size=size, top_k_blocks=top_k)
    generator = torch.Generator().manual_seed(q_offset)
    q, k, v = (torch.randn(B, n, HEADS, D, dtype=torch.float64, generator=generator) for n in (T, S, S))
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, [1, 10, 11, 12, 13, 14]] = False  # block 2 of row 0 is all padding
    complete = (S // size) * size if q_offset else S  # a cache holds landmarks of completed blocks only
    landmark_keys, landmark_ok = layer.landmarks(k[:, :complete], mask[:, :complete])
    inputs = [t.requires_grad_() for t in (q, k, v, landmark_keys)]

    pattern, _ = layer.block_pattern(q, k, landmark_keys, landmark_ok, mask, q_offset)
    check_kv_blocks(pattern, B, HEADS)
    expected = layer.grouped_attention(q, k, v, landmark_keys, landmark_ok, mask, q_offset)
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * grad_out).sum(), inputs)
    for backend in ("reference", "torch"):
        got = layer.sparse_grouped_attention(q, k, v, landmark_keys, landmark_ok, mask, q_offset, backend=backend)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        grads = torch.autograd.grad((got * grad_out).sum(), inputs)
        for name, got_grad, expected_grad in zip(("dq", "dk", "dv", "dlandmark"), grads, expected_grads):
            torch.testing.assert_close(got_grad, expected_grad, rtol=1e-9, atol=1e-11, msg=f"{backend} {name}")


def test_routed_pattern_lists_only_the_chosen_blocks():
    """With top_k_blocks=1 a query block lists its own block and the blocks its queries chose, not all 12."""
    layer = make(torch.float64, causal=False, block_size=4, top_k_blocks=1)
    q, k = torch.randn(1, 48, HEADS, D, dtype=torch.float64), torch.randn(1, 48, HEADS, D, dtype=torch.float64)
    landmark_keys, landmark_ok = layer.landmarks(k, None)
    pattern, _ = layer.block_pattern(q, k, landmark_keys, landmark_ok, None)
    assert pattern.kv_blocks.shape[:3] == (1, HEADS, 12)
    assert pattern.kv_blocks.shape[-1] <= 1 + 4  # own block + one choice per query of the block
    check_kv_blocks(pattern, 1, HEADS)


def test_backend_typo_raises():
    with pytest.raises(ValueError, match=r"landmark: unknown backend 'flexx'\. Did you mean 'flex'\?"):
        build_attention("landmark", dim=DIM, num_heads=HEADS, backend="flexx")


@needs_flex
def test_flex_with_grad_on_cpu_raises_and_auto_trains():
    """FlexAttention has no CPU backward: backend='flex' on CPU tensors that need grad is sparse_attention's error;
    'auto' picks the einsum there and trains."""
    layer = build_attention("landmark", dim=DIM, num_heads=HEADS, causal=True, block_size=4, backend="flex")
    x = torch.randn(2, 10, DIM)
    with pytest.raises(ValueError, match="backend='flex' on cpu tensors that require grad"):
        layer(x)
    layer.backend = "auto"
    layer(x).sum().backward()
    assert layer.q_proj.weight.grad is not None and torch.isfinite(layer.q_proj.weight.grad).all()
