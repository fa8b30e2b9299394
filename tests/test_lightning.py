"""Properties of the ``lightning`` layer (TransNormerLLM / Lightning Attention-2) beyond the registry-wide contract.

Two oracles written from the papers' equations and the raw ``qkvu_proj`` weight: the token-by-token recurrence
KV_t = lambda KV_{t-1} + k_t^T v_t, o_t = q_t KV_t, and the quadratic masked "left product" (Q K^T * M) V with
M[t, s] = lambda^(t-s); the layer runs the chunked ``simple_gla`` kernel (Lightning-2's blocks).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from attnzoo.layers import build_attention
from attnzoo.layers.lightning import alibi_slopes
from attnzoo.models import GPT

DIM, HEADS = 32, 4
F64 = torch.float64


def make(causal: bool = True, seed: int = 0, **options):
    """A float64 layer with weights large enough that every term matters (N(0, 0.02) makes outputs tiny)."""
    torch.manual_seed(seed)
    layer = build_attention("lightning", dim=DIM, num_heads=HEADS, causal=causal, **options).to(F64).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.normal_(1.0 if name == "norm.weight" else 0.0, 0.3)
    return layer


def randn(*shape, seed: int = 1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def qkvu(layer, x):
    """silu(q), silu(k), v (B, T, H, K) and u (B, T, hidden) from the four row blocks of qkvu_proj."""
    B, T, _ = x.shape
    q, k, v, u = (x @ w.T for w in layer.qkvu_proj.weight.chunk(4, dim=0))
    heads = (B, T, HEADS, -1)
    return F.silu(q).view(heads), F.silu(k).view(heads), v.view(heads), u


def expected_decays(layer_idx, num_layers, heads=HEADS):
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / heads) for h in range(heads)], dtype=F64)
    return torch.exp(-slopes * (1 - layer_idx / (num_layers - 1) + 1e-5))


def recurrence(q, k, v, decays, order):
    """KV_t = lambda_h KV_{t-1} + k_t^T v_t, o_t = q_t KV_t (no scale), in the given time order."""
    B, T, H, K = q.shape
    kv = q.new_zeros(B, H, K, v.shape[-1])
    out = torch.zeros(B, T, H, v.shape[-1], dtype=q.dtype)
    for t in order:
        kv = decays[:, None, None] * kv + k[:, t, :, :, None] * v[:, t, :, None, :]
        out[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t], kv)
    return out


def finish(layer, o, u, gate=lambda u: u):
    """out_proj(SRMSNorm(o) * gate(u)), SRMSNorm = x / sqrt(mean(x^2) + 1e-6) over the whole hidden width."""
    o = o.flatten(2)
    normed = o / (o.square().mean(-1, keepdim=True) + 1e-6).sqrt()
    return (normed * gate(u)) @ layer.out_proj.weight.T


def test_alibi_slopes_match_transnormer_table():
    assert alibi_slopes(8) == [2.0**-i for i in range(1, 9)]
    # not a power of two: the 4-head slopes, then every other slope of 8 heads (TransNormerLLM / ALiBi workaround)
    assert alibi_slopes(6) == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    layer = build_attention("lightning", dim=DIM, num_heads=HEADS, causal=True, layer_idx=3, num_layers=12)
    torch.testing.assert_close(layer.decays, expected_decays(3, 12), atol=1e-15, rtol=0)
    last = build_attention("lightning", dim=DIM, num_heads=HEADS, causal=True, layer_idx=11, num_layers=12)
    assert (last.decays > 1 - 1e-5).all() and (last.decays < 1).all()  # the last layer barely decays
    fla = build_attention("lightning", dim=DIM, num_heads=HEADS, causal=True, layer_idx=3, num_layers=12,
                          decay_schedule="fla")  # fmt: skip
    expected = torch.exp(-(8 / HEADS) * (1 - 3 / 12) * torch.arange(HEADS, dtype=F64))
    torch.testing.assert_close(fla.decays, expected, atol=1e-15, rtol=0)
    single = build_attention("lightning", dim=DIM, num_heads=HEADS, causal=True, num_layers=1)
    torch.testing.assert_close(single.decays, expected_decays(0, 2), atol=1e-15, rtol=0)


@pytest.mark.parametrize("layer_idx", [0, 5], ids=["first", "deeper"])
def test_causal_layer_equals_token_by_token_recurrence(layer_idx):
    layer = make(layer_idx=layer_idx, num_layers=8, chunk_size=16)
    x = randn(2, 70, DIM)
    q, k, v, u = qkvu(layer, x)
    ref = finish(layer, recurrence(q, k, v, expected_decays(layer_idx, 8), range(70)), u)
    torch.testing.assert_close(layer(x), ref, atol=1e-10, rtol=1e-10)


def test_causal_layer_equals_masked_left_product():
    """O = (Q K^T * M) V with M[t, s] = lambda^(t - s) [t >= s]: the intra-block form over the whole sequence."""
    layer = make(chunk_size=16)
    x = randn(2, 50, DIM)
    q, k, v, u = qkvu(layer, x)
    n = torch.arange(50, dtype=F64)
    distance = n[:, None] - n[None, :]
    mask = torch.where(distance >= 0, expected_decays(0, 24)[:, None, None] ** distance.clamp(min=0), 0.0)
    o = torch.einsum("bhts,bshv->bthv", torch.einsum("bthk,bshk->bhts", q, k) * mask, v)
    torch.testing.assert_close(layer(x), finish(layer, o, u), atol=1e-10, rtol=1e-10)


def test_bidirectional_layer_equals_forward_plus_reversed_recurrence():
    layer = make(causal=False, chunk_size=16, layer_idx=2, num_layers=4)
    x = randn(2, 40, DIM)
    q, k, v, u = qkvu(layer, x)
    decays = expected_decays(2, 4)
    o = recurrence(q, k, v, decays, range(40)) + recurrence(q, k, v, decays, reversed(range(40)))
    torch.testing.assert_close(layer(x), finish(layer, o, u), atol=1e-10, rtol=1e-10)


def test_bidirectional_output_depends_on_both_sides():
    layer = make(causal=False)
    x = randn(1, 20, DIM)
    for j in (2, 17):
        x2 = x.clone()
        x2[:, j] += 1.0
        assert (layer(x2)[:, 10] - layer(x)[:, 10]).abs().max() > 1e-6, f"output 10 ignores position {j}"


def test_norm_and_gate_variants():
    """TNL's LayerNorm + sigmoid gate, and a learnable-scale RMSNorm, against the oracle."""
    x = randn(2, 21, DIM)
    layer = make(norm_type="layernorm", gate_fn="sigmoid")
    q, k, v, u = qkvu(layer, x)
    o = recurrence(q, k, v, expected_decays(0, 24), range(21)).flatten(2)
    normed = F.layer_norm(o, (DIM,), layer.norm.weight, layer.norm.bias, 1e-6)
    torch.testing.assert_close(layer(x), (normed * torch.sigmoid(u)) @ layer.out_proj.weight.T, atol=1e-10, rtol=1e-10)
    rms = make(norm_type="rmsnorm", norm_eps=1e-5)
    q, k, v, u = qkvu(rms, x)
    o = recurrence(q, k, v, expected_decays(0, 24), range(21)).flatten(2)
    normed = o / (o.square().mean(-1, keepdim=True) + 1e-5).sqrt() * rms.norm.weight
    torch.testing.assert_close(rms(x), (normed * u) @ rms.out_proj.weight.T, atol=1e-10, rtol=1e-10)


def test_chunk_size_invariance_and_long_prefill_then_steps():
    T = 90
    x = randn(2, T, DIM)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[0, [3, 70, 71]] = False
    mask[1, :2] = False
    layer = make(chunk_size=16)
    full = layer(x, padding_mask=mask)
    torch.testing.assert_close(make(chunk_size=128)(x, padding_mask=mask), full, atol=1e-10, rtol=1e-10)
    cache = layer.new_cache(2)
    bounds = [0, 70, 71, 72, T]
    parts = [layer(x[:, a:b], padding_mask=mask[:, a:b], cache=cache) for a, b in itertools.pairwise(bounds)]
    assert cache.length == T
    torch.testing.assert_close(torch.cat(parts, 1)[mask], full[mask], atol=1e-10, rtol=1e-10)
    # a padded position neither writes nor decays: the same as removing it
    kept = x[0, mask[0]][None]
    torch.testing.assert_close(full[0, mask[0]], layer(kept)[0], atol=1e-10, rtol=1e-10)


def test_transnormer_defaults_names_and_state_size():
    layer = build_attention("lightning", dim=64, num_heads=4, causal=True)
    assert {n for n, _ in layer.named_parameters()} == {"qkvu_proj.weight", "out_proj.weight"}  # SRMSNorm: no weight
    assert layer.qkvu_proj.weight.shape == (256, 64) and layer.out_proj.weight.shape == (64, 64)
    assert layer.norm.eps == 1e-6 and layer.norm.normalized_shape == (64,)  # over the whole hidden width
    assert layer.state_size(10) == 4 * 16 * 16
    wide = build_attention("lightning", dim=64, num_heads=4, causal=True, hidden_dim=128)
    assert wide.qkvu_proj.weight.shape == (512, 64) and wide.state_size(10) == 4 * 32 * 32
    assert abs(layer.qkvu_proj.weight.std().item() - 0.02) < 0.003  # init_std 0.02
    assert math.isclose(layer.decays[0].item(), math.exp(-0.25 * (1 + 1e-5)), rel_tol=1e-14)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"layer_idx": 24}, r"layer_idx must be in 0 \.\. num_layers - 1 = 23; got 24"),
        ({"num_layers": 0}, "num_layers must be a positive integer"),
        ({"hidden_dim": 30}, "hidden_dim must be a positive multiple of num_heads=4"),
        ({"decay_schedule": "alibii"}, "Did you mean 'alibi'"),
        ({"norm_type": "srmsnrom"}, "Did you mean 'srmsnorm'"),
        ({"gate_fn": "sigmod"}, "Did you mean 'sigmoid'"),
    ],
    ids=["layer_idx", "num_layers", "hidden_dim", "schedule", "norm", "gate"],
)
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        build_attention("lightning", dim=DIM, num_heads=HEADS, causal=True, **options)


def test_gpt_with_per_layer_depths_trains_and_generates():
    torch.manual_seed(0)
    depth = 2
    specs = [{"name": "lightning", "layer_idx": i, "num_layers": depth} for i in range(depth)]
    model = GPT(16, dim=32, depth=depth, num_heads=4, attention=specs)
    assert model.blocks[0].attn.decays[0] < model.blocks[1].attn.decays[0]  # deeper layers decay less
    data = torch.arange(16).repeat(4, 2)[:, :17]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    prompt = data[:2, :5]
    cached = model.generate(prompt, 3, temperature=0)
    torch.testing.assert_close(cached, model.generate(prompt, 3, temperature=0, use_cache=False))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_triton_backend_matches_torch(causal):
    """backend= reaches the kernel: Triton (the CPU interpreter here, conftest sets TRITON_INTERPRET=1) == torch."""
    torch.manual_seed(0)
    ref = build_attention("lightning", dim=DIM, num_heads=2, causal=causal, backend="torch")
    got = build_attention("lightning", dim=DIM, num_heads=2, causal=causal, backend="triton")
    got.load_state_dict(ref.state_dict())
    x = torch.randn(1, 20, DIM)
    torch.testing.assert_close(got(x), ref(x), atol=1e-5 * ref(x).abs().max().item(), rtol=1e-4)
