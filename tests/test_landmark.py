"""landmark (Mohtashami & Jaggi 2023) against a float64 oracle: the grouped softmax written out per query and head
(own-block tokens and other blocks' landmarks in one softmax, each landmark's weight shared out by a softmax inside
its block); plus retrieval, decoding and the properties of the method."""

from __future__ import annotations

import pytest
import torch

from attnzoo.layers import build_attention

DIM, HEADS = 32, 4
D = DIM // HEADS


def make(**options):
    torch.manual_seed(0)
    layer = build_attention("landmark", dim=DIM, num_heads=HEADS, **options).double().eval()
    with torch.no_grad():  # a non-zero landmark vector, so the test sees it used
        layer.landmark_key.normal_(0, 0.5)
    return layer


def oracle(layer, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    B, T, _ = x.shape
    q = layer.q_proj(x).view(B, T, HEADS, D)
    k = layer.k_proj(x).view(B, T, HEADS, D)
    v = layer.v_proj(x).view(B, T, HEADS, D)
    if layer.rope is not None:
        q, k = layer.rope(q), layer.rope(k)
    real = torch.ones(B, T, dtype=torch.bool) if padding_mask is None else padding_mask
    size, top_k = layer.block_size, layer.top_k_blocks
    n = -(-T // size)
    out = torch.zeros(B, T, HEADS, D, dtype=x.dtype)
    for b in range(B):
        for h in range(HEADS):
            blocks = [[j for j in range(g * size, min(T, (g + 1) * size)) if real[b, j]] for g in range(n)]
            for i in range(T):
                mine = i // size
                own = [j for j in blocks[mine] if not layer.causal or j <= i]
                others = [g for g in range(n) if blocks[g] and (g < mine if layer.causal else g != mine)]
                landmark_logit = {}
                for g in others:
                    landmark = torch.stack([k[b, j, h] for j in blocks[g]]).mean(0) + layer.landmark_key[h]
                    landmark_logit[g] = q[b, i, h] @ landmark / D**0.5
                if top_k is not None:
                    others = sorted(others, key=lambda g: -landmark_logit[g])[:top_k]
                own_logit = {j: q[b, i, h] @ k[b, j, h] / D**0.5 for j in own}
                Z = sum(torch.exp(s) for s in own_logit.values()) + sum(torch.exp(landmark_logit[g]) for g in others)
                if not own and not others:
                    continue
                o = sum(torch.exp(own_logit[j]) / Z * v[b, j, h] for j in own)
                for g in others:
                    inner = torch.stack([q[b, i, h] @ k[b, j, h] / D**0.5 for j in blocks[g]]).softmax(0)
                    o = o + torch.exp(landmark_logit[g]) / Z * sum(w * v[b, j, h] for w, j in zip(inner, blocks[g]))
                out[b, i, h] = o
    return layer.o_proj(out.reshape(B, T, DIM))


CONFIGS = [
    pytest.param(causal, size, top_k, id=f"{'causal' if causal else 'bidir'}-block{size}-top{top_k}")
    for causal in (True, False)
    for size, top_k in [(4, None), (5, None), (4, 1), (3, 2)]
]


@pytest.mark.parametrize("causal,block_size,top_k", CONFIGS)
@pytest.mark.parametrize("T", [1, 14])
def test_matches_grouped_softmax_oracle(causal, block_size, top_k, T):
    layer = make(causal=causal, block_size=block_size, top_k_blocks=top_k)
    x = torch.randn(2, T, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(T))
    torch.testing.assert_close(layer(x), oracle(layer, x), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
def test_padding_matches_oracle(causal):
    """Padded keys drop out of blocks, landmark means and normalisers; an all-padded block has no landmark."""
    layer = make(causal=causal, block_size=3, rope=False)
    x = torch.randn(2, 13, DIM, dtype=torch.float64)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[0, [0, 4, 10]] = False
    mask[1, 3:6] = False  # a whole block
    got, ref = layer(x, padding_mask=mask), oracle(layer, x, mask)
    torch.testing.assert_close(got[mask], ref[mask], atol=1e-12, rtol=1e-10)


def test_one_block_is_causal_softmax():
    """With every position in one block there are no landmarks: plain causal softmax attention."""
    layer = make(causal=True, block_size=16)
    x = torch.randn(2, 16, DIM, dtype=torch.float64)
    B, T = 2, 16
    q = layer.rope(layer.q_proj(x).view(B, T, HEADS, D)).transpose(1, 2)
    k = layer.rope(layer.k_proj(x).view(B, T, HEADS, D)).transpose(1, 2)
    v = layer.v_proj(x).view(B, T, HEADS, D).transpose(1, 2)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(layer(x), layer.o_proj(o.transpose(1, 2).reshape(B, T, DIM)), atol=1e-12, rtol=1e-10)


def test_top_k_covering_every_block_changes_nothing():
    full, retrieval = make(causal=True, block_size=4), make(causal=True, block_size=4, top_k_blocks=5)
    x = torch.randn(2, 20, DIM, dtype=torch.float64)
    torch.testing.assert_close(retrieval(x), full(x), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("top_k", [None, 1])
def test_decode_equals_full_forward_across_blocks(top_k):
    layer = make(causal=True, block_size=4, top_k_blocks=top_k)
    x = torch.randn(2, 23, DIM, dtype=torch.float64)
    mask = torch.ones(2, 23, dtype=torch.bool)
    mask[0, [1, 9, 10, 11, 12]] = False  # block 2 of row 0 has no real key
    cache = layer.new_cache(2)
    parts = [layer(x[:, :6], cache=cache, padding_mask=mask[:, :6])]
    parts += [layer(x[:, t : t + 1], cache=cache, padding_mask=mask[:, t : t + 1]) for t in range(6, 17)]
    parts += [layer(x[:, 17:], cache=cache, padding_mask=mask[:, 17:])]
    full = layer(x, padding_mask=mask)
    torch.testing.assert_close(torch.cat(parts, dim=1)[mask], full[mask], atol=1e-12, rtol=1e-10)
    assert cache.landmark_keys.shape == (2, 23 // 4, HEADS, D)
    assert layer.state_size(23) == (2 * 23 + 5) * DIM


def test_bad_options_raise():
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        make(block_size=0)
    with pytest.raises(ValueError, match="top_k_blocks must be None"):
        make(top_k_blocks=0)
    with pytest.raises(ValueError, match="has no pattern 'causal_cross'"):
        make(causal=True, cross=True)
