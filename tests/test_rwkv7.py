"""Properties of the ``rwkv7`` layer beyond the registry-wide contract tests.

The oracle is an independent float64 implementation of the whole layer in RWKV-LM's own layout (the state is V x K
per head, updated as S <- S diag(w) + S (-kappa)^T (kappa a) + v^T k, output S r), one token at a time, from the
layer's weights; it shares no code with the layer or with ``attnzoo.kernels.dplr``. A GPT stack checks the value
residual that crosses layers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnzoo.layers import build_attention
from attnzoo.layers.rwkv7 import RWKV7Attention
from attnzoo.models import GPT

DIM, HEADS = 32, 4
F64 = torch.float64


def randn(*shape, seed: int = 1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def make(seed: int = 0, **options) -> RWKV7Attention:
    """A float64 layer whose LoRA down-projections (zero at init, as in FLA) are drawn so every path matters."""
    torch.manual_seed(seed)
    layer = build_attention("rwkv7", dim=DIM, num_heads=HEADS, causal=True, **options).to(F64).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("lora.0.weight"):
                p.normal_(0.0, 0.3)
    return layer


def lora(module, x):
    down, act, up = module.lora
    return up(act(down(x)))


def oracle(layer: RWKV7Attention, x, v_first=None, keep=None):
    """(output, v of this layer before the residual mix) token by token."""
    B, T, D = x.shape
    H, K = layer.num_heads, layer.head_dim
    if keep is not None:
        x = x * keep[..., None]
    out = torch.zeros(B, T, D, dtype=F64)
    values = torch.zeros(B, T, D, dtype=F64)
    for b in range(B):
        S = torch.zeros(H, K, K, dtype=F64)  # (H, V, K), RWKV-LM's layout
        previous = torch.zeros(D, dtype=F64)
        for t in range(T):
            xt = x[b, t]
            shift = previous - xt
            previous = xt

            def mixed(mu, xt=xt, shift=shift):
                return xt + shift * mu.view(-1)

            r = layer.r_proj.weight @ mixed(layer.x_r)
            k = layer.k_proj.weight @ mixed(layer.x_k)
            v = layer.v_proj.weight @ mixed(layer.x_v)
            values[b, t] = v
            if v_first is not None:
                mix = torch.sigmoid(lora(layer.v_lora, mixed(layer.x_v)))
                v = v + (v_first[b, t] - v) * mix
            w = torch.exp(-math.exp(-0.5) * torch.sigmoid(lora(layer.w_lora, mixed(layer.x_w))))
            a = torch.sigmoid(lora(layer.a_lora, mixed(layer.x_a)))
            g = lora(layer.g_lora, mixed(layer.x_g))
            kappa = (k * layer.k_k).view(H, K)
            kappa = kappa / kappa.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            k = k * (1 + (a - 1) * layer.k_a)
            real = keep is None or bool(keep[b, t])
            o = torch.zeros(H, K, dtype=F64)
            for h in range(H):
                sl = slice(h * K, (h + 1) * K)
                if real:
                    ab = torch.outer(-kappa[h], kappa[h] * a[sl])  # (K, K)
                    S[h] = S[h] * w[sl][None, :] + S[h] @ ab + torch.outer(v[sl], k[sl])
                o[h] = S[h] @ r[sl]
            normed = F.group_norm(o.reshape(1, D), H, layer.g_norm.weight, layer.g_norm.bias, layer.g_norm.eps)[0]
            vv = v if real else torch.zeros_like(v)
            kk = k if real else torch.zeros_like(k)
            bonus = torch.stack(
                [(r[h * K : (h + 1) * K] * kk[h * K : (h + 1) * K] * layer.r_k[h]).sum() * vv[h * K : (h + 1) * K]
                 for h in range(H)]
            ).reshape(D)  # fmt: skip
            out[b, t] = layer.o_proj.weight @ ((normed + bonus) * g)
    return out, values


def test_layer_matches_the_token_by_token_oracle():
    layer = make()
    x = randn(2, 21, DIM)
    expected, _ = oracle(layer, x)
    torch.testing.assert_close(layer(x), expected, atol=1e-10, rtol=1e-10)


def test_padding_removes_the_position():
    layer = make()
    x = randn(2, 13, DIM)
    keep = torch.ones(2, 13, dtype=torch.bool)
    keep[0, [0, 6]] = False
    keep[1, -2:] = False
    expected, _ = oracle(layer, x, keep=keep.to(F64))
    got = layer(x, padding_mask=keep)
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-10, rtol=1e-10)


def test_chunked_decode_equals_full_forward():
    layer = make()
    x = randn(2, 19, DIM)
    full = layer(x)
    cache = layer.new_cache(2)
    steps = [layer(x[:, :11], cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(11, 19)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-10, rtol=1e-10)
    assert cache.length == 19 and cache.state.shape == (2, HEADS, DIM // HEADS, DIM // HEADS)


def test_value_residual_in_a_gpt_stack():
    """Layer 1 of a GPT mixes in layer 0's values of the same positions; with a cache too."""
    torch.manual_seed(0)
    model = GPT(50, dim=DIM, depth=2, num_heads=HEADS, attention="rwkv7", mlp_ratio=0).double().eval()
    first, second = (block.attn for block in model.blocks)
    assert (first.layer_index, second.layer_index, second.num_layers) == (0, 1, 2)
    assert first.v_lora is None and second.v_lora is not None and second._value_source is first
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora.0.weight"):
                p.normal_(0.0, 0.3)
    idx = torch.randint(0, 50, (2, 9))
    h0 = model.tok_emb(idx)
    x0 = model.blocks[0].norm1(h0)
    out0, v0 = oracle(first, x0)
    x1 = model.blocks[1].norm1(h0 + out0)
    out1, _ = oracle(second, x1, v_first=v0)
    expected = model.head(model.norm(h0 + out0 + out1))
    torch.testing.assert_close(model(idx), expected, atol=1e-9, rtol=1e-9)
    # the mix matters: without the first layer's values the second layer's output differs
    assert not torch.allclose(out1, oracle(second, x1, v_first=torch.zeros_like(v0))[0], atol=1e-6)
    caches = model.new_caches(2)
    stepped = torch.cat([model(idx[:, :5], caches=caches)] + [model(idx[:, t : t + 1], caches=caches, offset=t)
                                                               for t in range(5, 9)], 1)  # fmt: skip
    torch.testing.assert_close(stepped, model(idx), atol=1e-9, rtol=1e-9)


def test_fla_defaults_and_initialisation():
    layer = build_attention("rwkv7", dim=64, num_heads=1, causal=True, layer_index=1, num_layers=4)
    # FLA's LoRA ranks at hidden 64, head_dim 64: max(32, round(c * 8 / 32) * 32)
    assert [m.lora[0].out_features for m in (layer.w_lora, layer.a_lora, layer.v_lora, layer.g_lora)] == [32] * 4
    assert layer.g_norm.eps == pytest.approx(64e-5)
    torch.testing.assert_close(layer.k_a, torch.full((64,), 1.02))
    torch.testing.assert_close(layer.g_norm.weight, torch.full((64,), (2 / 4) ** 0.7))
    torch.testing.assert_close(layer.x_r[0, 0, 32], torch.tensor(1 - 0.5 ** (0.2 * 0.75)))
    assert layer.w_lora.lora[0].weight.abs().sum() == 0  # LoRA down-projections start at zero, as in FLA
    fresh = build_attention("rwkv7", dim=64, num_heads=1, causal=True, zero_init_output=True)
    assert fresh.o_proj.weight.abs().sum() == 0


def test_errors():
    with pytest.raises(ValueError, match="0 <= layer_index < num_layers"):
        build_attention("rwkv7", dim=DIM, num_heads=HEADS, causal=True, layer_index=2, num_layers=2)
    lone = build_attention("rwkv7", dim=DIM, num_heads=HEADS, causal=True, layer_index=1, num_layers=2)
    with pytest.raises(RuntimeError, match="not linked to a first layer"):
        lone(torch.randn(1, 3, DIM))
    with pytest.raises(ValueError, match=r"has no pattern 'noncausal_self'.*forward in time"):
        build_attention("rwkv7", dim=DIM, num_heads=HEADS)
