"""Properties of the ``retnet`` layer (Sun et al. 2023) beyond the registry-wide contract tests.

The oracle is the paper's parallel form O = (Q K^T * D) V with D[n, m] = gamma^(n-m) [n >= m], built from the
layer's own projections and rotary embedding; the layer itself runs the chunked ``simple_gla`` kernel.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from attnzoo.layers import build_attention
from attnzoo.models import GPT

DIM, HEADS = 32, 4
F64 = torch.float64


def make(causal: bool = True, seed: int = 0, **options):
    torch.manual_seed(seed)
    layer = build_attention("retnet", dim=DIM, num_heads=HEADS, causal=causal, **options).to(F64).eval()
    with torch.no_grad():  # weights large enough that every term matters (FLA's N(0, 0.02) makes outputs tiny)
        for name, p in layer.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.3)
    return layer


def randn(*shape, seed: int = 1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def parallel_retention(layer, x, decay_mask):
    """out = o_proj(RMSNorm_head((Q K^T * mask) V) * swish(G)), Q scaled by K^-1/2, q and k rotated."""
    B, T, _ = x.shape
    q = layer.rotary(layer.q_proj(x).view(B, T, HEADS, -1))
    k = layer.rotary(layer.k_proj(x).view(B, T, HEADS, -1))
    v = layer.v_proj(x).view(B, T, HEADS, -1)
    scores = torch.einsum("bthk,bshk->bhts", q * layer.head_k_dim**-0.5, k) * decay_mask  # (B, H, T, S)
    o = torch.einsum("bhts,bshv->bthv", scores, v)
    g = layer.g_proj(x).view(B, T, HEADS, -1)
    return layer.o_proj((layer.g_norm(o) * F.silu(g)).reshape(B, T, -1))


def decay_matrix(T: int, bidirectional: bool = False):
    """(H, T, T): gamma_h^(n-m) for n >= m; bidirectional adds gamma_h^(m-n) for m >= n (the diagonal twice)."""
    gammas = 1 - 2.0 ** (-5.0 - torch.arange(HEADS, dtype=F64))
    n = torch.arange(T, dtype=F64)
    distance = n[:, None] - n[None, :]  # (T, T) n - m
    lower = torch.where(distance >= 0, gammas[:, None, None] ** distance.clamp(min=0), 0.0)
    return lower + lower.transpose(1, 2) if bidirectional else lower


def test_gammas_are_exact():
    layer = build_attention("retnet", dim=64, num_heads=8, causal=True)
    expected = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(8)], dtype=F64)
    torch.testing.assert_close(layer.gammas, expected, atol=1e-15, rtol=0)


def test_chunked_layer_equals_parallel_form():
    layer = make(chunk_size=16)
    x = randn(2, 70, DIM)
    torch.testing.assert_close(layer(x), parallel_retention(layer, x, decay_matrix(70)), atol=1e-10, rtol=1e-10)


def test_bidirectional_layer_equals_two_sided_parallel_form():
    layer = make(causal=False, chunk_size=16)
    x = randn(2, 40, DIM)
    ref = parallel_retention(layer, x, decay_matrix(40, bidirectional=True))
    torch.testing.assert_close(layer(x), ref, atol=1e-10, rtol=1e-10)


def test_bidirectional_output_depends_on_both_sides():
    layer = make(causal=False)
    x = randn(1, 20, DIM)
    for j in (2, 17):
        x2 = x.clone()
        x2[:, j] += 1.0
        assert (layer(x2)[:, 10] - layer(x)[:, 10]).abs().max() > 1e-6, f"output 10 ignores position {j}"


def test_chunk_size_invariance_and_long_prefill_then_steps():
    T = 90
    x = randn(2, T, DIM)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[0, [3, 70, 71]] = False
    layer = make(chunk_size=16)
    full = layer(x, padding_mask=mask)
    torch.testing.assert_close(make(chunk_size=128)(x, padding_mask=mask), full, atol=1e-10, rtol=1e-10)
    cache = layer.new_cache(2)
    bounds = [0, 70, 71, 72, T]
    parts = [layer(x[:, a:b], padding_mask=mask[:, a:b], cache=cache) for a, b in itertools.pairwise(bounds)]
    assert cache.length == T
    torch.testing.assert_close(torch.cat(parts, 1)[mask], full[mask], atol=1e-10, rtol=1e-10)


def test_fla_defaults_and_names():
    layer = build_attention("retnet", dim=64, num_heads=4, causal=True)
    assert layer.q_proj.weight.shape == (64, 64) and layer.v_proj.weight.shape == (128, 64)  # expand_k 1, expand_v 2
    assert {n for n, _ in layer.named_parameters()} == {
        "q_proj.weight", "k_proj.weight", "v_proj.weight", "g_proj.weight", "o_proj.weight", "g_norm.weight"
    }  # fmt: skip
    assert layer.state_size(10) == 4 * 16 * 32
    with pytest.raises(ValueError, match="multiple of 2 \\* num_heads"):
        build_attention("retnet", dim=36, num_heads=4, causal=True, expand_k=0.5)


def test_gpt_trains_and_generates():
    torch.manual_seed(0)
    model = GPT(16, dim=32, depth=1, num_heads=4, attention="retnet")
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
    ref = build_attention("retnet", dim=DIM, num_heads=2, causal=causal, backend="torch", **{})
    got = build_attention("retnet", dim=DIM, num_heads=2, causal=causal, backend="triton", **{})
    got.load_state_dict(ref.state_dict())
    x = torch.randn(1, 20, DIM)
    torch.testing.assert_close(got(x), ref(x), atol=1e-5 * ref(x).abs().max().item(), rtol=1e-4)
