"""Differential attention against the official module's naive computation (microsoft/unilm
Diff-Transformer/multihead_diffattn.py), re-derived here in float64 with explicit softmax maps, plus its depth schedule,
grouped keys, the lambda = 0 limit and the errors. The registry-wide contract (patterns, cache, padding, dtypes)
covers the rest."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnzoo.layers import build_attention
from attnzoo.layers.differential import lambda_init_for
from attnzoo.models import GPT

DIM, HEADS, B, T = 32, 2, 2, 11


def official_forward(layer, x, *, causal, context=None, key_mask=None):
    """The official naive forward, step by step: q as 2H heads of d, k as 2 H_kv heads, v as H_kv heads of 2d,
    repeat_kv, one softmax map per half, view (B, H, 2, T, S), A_1 - lambda A_2, subln, (1 - lambda_init)."""
    H, G, d = layer.num_heads, layer.num_kv_heads, layer.half_dim
    n_rep = H // G
    source = x if context is None else context
    Bx, Tq, _ = x.shape
    S = source.shape[1]
    q = layer.q_proj(x).view(Bx, Tq, 2 * H, d)
    k = layer.k_proj(source).view(Bx, S, 2 * G, d)
    v = layer.v_proj(source).view(Bx, S, G, 2 * d)
    if layer.rope is not None:
        q, k = layer.rope(q, 0), layer.rope(k, 0)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    k = k[:, :, None].expand(Bx, 2 * G, n_rep, S, d).reshape(Bx, 2 * H, S, d)  # repeat_kv
    v = v[:, :, None].expand(Bx, G, n_rep, S, 2 * d).reshape(Bx, H, S, 2 * d)
    scores = (q * d**-0.5) @ k.transpose(-1, -2)  # (B, 2H, T, S)
    if causal:
        scores = scores.masked_fill(torch.ones(Tq, S, dtype=torch.bool).triu(1 + S - Tq), float("-inf"))
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1).view(Bx, H, 2, Tq, S)
    lam = (
        torch.exp((layer.lambda_q1 * layer.lambda_k1).sum()) - torch.exp((layer.lambda_q2 * layer.lambda_k2).sum())
    ).to(x.dtype) + layer.lambda_init
    attn = (weights[:, :, 0] - lam * weights[:, :, 1]) @ v  # (B, H, T, 2d)
    rms = attn * torch.rsqrt(attn.pow(2).mean(-1, keepdim=True) + layer.subln.eps) * layer.subln.weight
    out = (rms * (1 - layer.lambda_init)).transpose(1, 2).reshape(Bx, Tq, -1)
    return layer.out_proj(out)


def make(**kw):
    torch.manual_seed(0)
    layer = build_attention("differential", dim=DIM, num_heads=kw.pop("num_heads", HEADS), **kw).double()
    with torch.no_grad():  # a non-trivial norm scale, so the test sees where subln sits
        layer.subln.weight.uniform_(0.5, 1.5)
    return layer


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(2, None), (4, 2), (4, 1)])
def test_equals_the_official_naive_forward(causal, rope, heads, kv_heads):
    layer = make(causal=causal, rope=rope, num_heads=heads, num_kv_heads=kv_heads, layer_index=3)
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    torch.testing.assert_close(layer(x), official_forward(layer, x, causal=causal), rtol=1e-10, atol=1e-10)


def test_padding_and_cross_equal_the_official_form():
    layer = make(cross=True, rope=False, num_heads=4, num_kv_heads=2)
    x, context = torch.randn(B, T, DIM, dtype=torch.float64), torch.randn(B, 7, DIM, dtype=torch.float64)
    mask = torch.ones(B, 7, dtype=torch.bool)
    mask[0, 4:] = False
    got = layer(x, context=context, padding_mask=mask)
    want = official_forward(layer, x, causal=False, context=context, key_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_depth_schedule_reaches_every_gpt_layer():
    """lambda_init = 0.8 - 0.6 exp(-0.3 l), l the 0-based block index that GPT fills in."""
    assert lambda_init_for(0) == pytest.approx(0.2)
    model = GPT(vocab_size=16, dim=DIM, depth=3, num_heads=HEADS, max_seq_len=16, attention="differential")
    got = [block.attn.lambda_init for block in model.blocks]
    assert got == pytest.approx([0.8 - 0.6 * math.exp(-0.3 * i) for i in range(3)])
    assert build_attention("differential", dim=DIM, num_heads=HEADS, lambda_init=0.5).lambda_init == 0.5


def test_zero_lambda_is_one_softmax_map_normalised():
    """With lambda_init = 0 and equal lambda pairs, lambda = 0: the layer is RMSNorm(A_1 v) of the first halves."""
    layer = make(rope=False, lambda_init=0.0)
    with torch.no_grad():
        layer.lambda_q2.copy_(layer.lambda_q1)
        layer.lambda_k2.copy_(layer.lambda_k1)
    assert float(layer.lambda_full()) == 0.0
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    d = layer.half_dim
    q = layer.q_proj(x).view(B, T, HEADS, 2, d)[:, :, :, 0].transpose(1, 2)
    k = layer.k_proj(x).view(B, T, HEADS, 2, d)[:, :, :, 0].transpose(1, 2)
    v = layer.v_proj(x).view(B, T, HEADS, 2 * d).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    want = layer.out_proj(layer.subln(o).reshape(B, T, DIM))
    torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)


def test_lambda_gets_gradients_and_stays_float32():
    layer = build_attention("differential", dim=DIM, num_heads=HEADS, causal=True, dtype=torch.bfloat16)
    assert {p.dtype for n, p in layer.named_parameters() if n.startswith("lambda_")} == {torch.float32}
    assert layer.q_proj.weight.dtype == torch.bfloat16
    layer(torch.randn(B, T, DIM, dtype=torch.bfloat16)).float().sum().backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in (layer.lambda_q1, layer.lambda_k2))


def test_parameter_names_are_the_officials():
    layer = build_attention("differential", dim=DIM, num_heads=4, num_kv_heads=2)
    assert {n: tuple(p.shape) for n, p in layer.named_parameters()} == {
        "q_proj.weight": (32, 32),
        "k_proj.weight": (16, 32),
        "v_proj.weight": (16, 32),
        "out_proj.weight": (32, 32),
        "lambda_q1": (4,),
        "lambda_k1": (4,),
        "lambda_q2": (4,),
        "lambda_k2": (4,),
        "subln.weight": (8,),
    }
    assert layer.state_size(10) == 2 * 10 * 32 // 2


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(dim=30, num_heads=2), "multiple of 2 \\* num_heads"),
        (dict(dim=32, num_heads=4, num_kv_heads=3), "num_kv_heads must divide"),
        (dict(dim=24, num_heads=4), "even half-head width"),
        (dict(dim=32, num_heads=2, layer_index=-1), "layer_index must be"),
    ],
)
def test_bad_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        build_attention("differential", **kw)
