"""Golden test: attnzoo's cosformer reproduces the official OpenNLPLab/cosFormer ``CosformerAttention``
(tests/golden/cosformer.pt, GOLDEN.md) in float64: self-attention non-causal and causal, and cross-attention with
separate key and value inputs (through ``cosformer_attention``). The file is sequence-first (L, N, E): transposed here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attnzoo.layers.cosformer import CosFormer, cosformer_attention

GOLDEN = torch.load(Path(__file__).parent / "golden" / "cosformer.pt", weights_only=True)
TOL = dict(atol=1e-10, rtol=1e-10)  # GOLDEN.md: float64 files


def official_layer(causal: bool, max_len: int | None) -> CosFormer:
    kw = GOLDEN["init_kwargs"]
    layer = CosFormer(kw["embed_dim"], kw["num_heads"], causal=causal, max_len=max_len).double().eval()
    layer.load_state_dict(GOLDEN["state_dict"])  # official parameter names, strict
    return layer


def test_noncausal_matches_official():
    layer = official_layer(causal=False, max_len=None)  # official M = max(L, S) per call
    got = layer(GOLDEN["x"].transpose(0, 1)).transpose(0, 1)
    torch.testing.assert_close(got, GOLDEN["out_noncausal"], **TOL)


@pytest.mark.parametrize("stepped", [False, True], ids=["parallel", "prefill-then-step"])
def test_causal_matches_official(stepped):
    x = GOLDEN["x"].transpose(0, 1)  # (B, L=32, E)
    layer = official_layer(causal=True, max_len=x.shape[1])  # official M = L = 32 for this call
    if stepped:
        cache = layer.new_cache(x.shape[0])
        got = torch.cat(
            [layer(x[:, :20], cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(20, 32)], 1
        )
    else:
        got = layer(x)
    torch.testing.assert_close(got.transpose(0, 1), GOLDEN["out_causal"], **TOL)


def test_cross_with_separate_key_and_value_matches_official():
    layer = official_layer(causal=False, max_len=None)  # M = max(12, 20) = 20
    query, key, value = (GOLDEN[n].transpose(0, 1) for n in ("cross_query", "cross_key", "cross_value"))
    B, T, S, H, D = query.shape[0], query.shape[1], key.shape[1], layer.num_heads, layer.head_dim
    q = F.relu(layer.q_proj(query)).view(B, T, H, D)
    k = F.relu(layer.k_proj(key)).view(B, S, H, D)
    v = layer.v_proj(value).view(B, S, H, D)
    o, _ = cosformer_attention(q, k, v, causal=False, max_len=None)
    got = layer.out_proj(o.reshape(B, T, -1)).transpose(0, 1)
    torch.testing.assert_close(got, GOLDEN["out_cross_noncausal"], **TOL)


def test_cross_layer_uses_the_official_formula():
    """With key == value, the registered noncausal_cross layer itself equals the functional path above."""
    layer = official_layer(causal=False, max_len=None)
    cross = CosFormer(64, 4, cross=True, max_len=None).double().eval()
    cross.load_state_dict(layer.state_dict())
    query, key = GOLDEN["cross_query"].transpose(0, 1), GOLDEN["cross_key"].transpose(0, 1)
    B, T, S = query.shape[0], query.shape[1], key.shape[1]
    q = F.relu(layer.q_proj(query)).view(B, T, 4, 16)
    k = F.relu(layer.k_proj(key)).view(B, S, 4, 16)
    o, _ = cosformer_attention(q, k, layer.v_proj(key).view(B, S, 4, 16), causal=False, max_len=None)
    torch.testing.assert_close(cross(query, context=key), layer.out_proj(o.reshape(B, T, -1)), **TOL)
