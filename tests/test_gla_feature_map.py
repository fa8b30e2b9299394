"""gla's two linearizing options: ``feature_map="hedgehog"`` (a learned [softmax(W x); softmax(-W x)] on q and k) and
``gate_bias_init`` (the forget gate's starting bias). The oracle is a token-by-token recurrence written from the
equations in layers/gla.py's docstring, with the feature map computed here, not by the layer's module."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnzoo.layers import build_attention
from attnzoo.models import GPT, LinearizeReport, linearize

DIM, HEADS = 32, 4
K = DIM // HEADS  # expand_k = 1.0
F64 = torch.float64


def make(causal: bool = True, seed: int = 0, std: float = 0.3, **options):
    """A float64 layer with every projection large enough to matter; the feature maps keep their identity init
    unless ``perturb_maps`` (then W = I + noise, so the test sees W used, not just the identity)."""
    perturb = options.pop("perturb_maps", True)
    torch.manual_seed(seed)
    options = {"expand_k": 1.0, "feature_map": "hedgehog", **options}
    layer = build_attention("gla", dim=DIM, num_heads=HEADS, causal=causal, **options).to(F64).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("feature_map"):
                if perturb:
                    p.add_(torch.randn_like(p) * 0.5)
            elif "norm" not in name:
                p.normal_(0.0, std)
    return layer


def randn(*shape, seed: int = 1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def hedgehog(x, weight):
    """(B, T, H, K) -> (B, T, H, 2K): [softmax(x W_h); softmax(-x W_h)] per head (the Hedgehog paper's map)."""
    y = torch.einsum("bthd,hdf->bthf", x, weight)
    return torch.cat([torch.softmax(y, -1), torch.softmax(-y, -1)], -1)


def reference(layer, x):
    """The layer's output from its own weights through an independent recurrence (no short conv, no GQA)."""
    B, T, _ = x.shape
    q = hedgehog(layer.q_proj(x).view(B, T, HEADS, K), layer.feature_map_q.weight)
    k = hedgehog(layer.k_proj(x).view(B, T, HEADS, K), layer.feature_map_k.weight)
    v = layer.v_proj(x).view(B, T, HEADS, -1)
    log_decay = F.logsigmoid(layer.gk_proj(x)).view(B, T, HEADS, K) / layer.gate_logit_normalizer
    log_decay = torch.cat([log_decay, log_decay], -1)  # each channel's gate decays both of its features
    S = x.new_zeros(B, HEADS, 2 * K, v.shape[-1])
    out = []
    for t in range(T):
        S = log_decay[:, t, :, :, None].exp() * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append((2 * K) ** -0.5 * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(out, 1)
    g = layer.g_proj(x).view(B, T, HEADS, -1)
    return layer.o_proj((layer.g_norm(o) * F.silu(g)).reshape(B, T, -1))


def test_hedgehog_layer_equals_recurrence_on_mapped_features():
    layer = make()
    x = randn(2, 70, DIM)  # 70 > chunk_size: the chunked kernel's inter-chunk path runs
    torch.testing.assert_close(layer(x), reference(layer, x), atol=1e-10, rtol=1e-10)


def test_the_map_changes_the_output_and_its_weights_get_gradients():
    """The option is not a no-op: the same projections without the map give another output, and the map's W is
    trained (nonzero gradient), which is what attention transfer relies on."""
    layer = make(perturb_maps=False)
    plain = build_attention("gla", dim=DIM, num_heads=HEADS, causal=True, expand_k=1.0).to(F64).eval()
    plain.load_state_dict({n: p for n, p in layer.state_dict().items() if not n.startswith("feature_map")})
    x = randn(2, 20, DIM)
    out = layer(x)
    assert (out - plain(x)).abs().max() > 1e-2 * out.abs().max()
    out.square().sum().backward()
    for name in ("feature_map_q.weight", "feature_map_k.weight"):
        grad = layer.get_parameter(name).grad
        assert grad is not None and grad.abs().max() > 1e-6, name


def test_mapped_scores_are_positive_at_init():
    """phi(q) . phi(k) > 0 for every pair (plain linear attention on copied q/k gives signed scores)."""
    layer = make(perturb_maps=False)
    x = randn(1, 16, DIM)
    q = layer.feature_map_q(layer.q_proj(x).view(1, 16, HEADS, K))
    k = layer.feature_map_k(layer.k_proj(x).view(1, 16, HEADS, K))
    assert q.shape[-1] == 2 * K
    assert torch.einsum("bthf,bshf->bhts", q, k).min() > 0
    raw = torch.einsum("bthf,bshf->bhts", layer.q_proj(x).view(1, 16, HEADS, K), layer.k_proj(x).view(1, 16, HEADS, K))
    assert raw.min() < 0  # the comparison means something: without the map some scores are negative


@pytest.mark.parametrize("options", [{}, {"use_short_conv": True, "num_kv_heads": 2}], ids=["plain", "conv-gqa"])
def test_decode_steps_equal_the_full_forward_with_a_2k_state(options):
    layer = make(**options)
    x = randn(2, 23, DIM)
    full = layer(x)
    cache = layer.new_cache(2)
    steps = torch.cat([layer(x[:, :9], cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(9, 23)], 1)
    torch.testing.assert_close(steps, full, atol=1e-10, rtol=1e-10)
    assert cache.state.shape == (2, HEADS, 2 * K, DIM // HEADS)
    conv = 0 if not layer.use_short_conv else layer.q_conv1d.state_width * (DIM + 2 * DIM // 2)
    assert layer.state_size(23) == HEADS * 2 * K * (DIM // HEADS) + conv


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_padded_positions_write_nothing_after_the_map(causal):
    """A map of a zeroed key is uniform, not zero: the layer must mask after mapping. Left padding then the real
    tokens gives the same outputs at the real positions as the real tokens alone."""
    layer = make(causal=causal)
    x = randn(2, 12, DIM)
    padded = torch.cat([randn(2, 5, DIM, seed=7), x], 1)
    mask = torch.cat([torch.zeros(2, 5, dtype=torch.bool), torch.ones(2, 12, dtype=torch.bool)], 1)
    torch.testing.assert_close(layer(padded, padding_mask=mask)[:, 5:], layer(x), atol=1e-10, rtol=1e-10)


def test_gate_bias_init_sets_the_starting_decay():
    b = 4.0
    layer = build_attention("gla", dim=DIM, num_heads=HEADS, causal=True, gate_bias_init=b)
    assert torch.equal(layer.gk_proj[1].bias, torch.full_like(layer.gk_proj[1].bias, b))
    x = torch.randn(2, 10, DIM)
    decay = layer.log_decay(x).exp()
    expected = math.exp(F.logsigmoid(torch.tensor(b)).item() / 16.0)  # 0.9989; FLA's bias 0 gives 0.958
    assert abs(decay.mean().item() - expected) < 5e-4
    fla = build_attention("gla", dim=DIM, num_heads=HEADS, causal=True).log_decay(x).exp().mean().item()
    assert abs(fla - math.exp(math.log(0.5) / 16.0)) < 5e-3


def test_bad_options_raise_with_the_fix():
    with pytest.raises(ValueError, match=r"feature_map 'hedgehogg'.*Did you mean 'hedgehog'"):
        build_attention("gla", dim=DIM, num_heads=HEADS, causal=True, feature_map="hedgehogg")
    with pytest.raises(ValueError, match="gate_bias_init must be a number"):
        build_attention("gla", dim=DIM, num_heads=HEADS, causal=True, gate_bias_init="4")


def test_linearize_trains_the_maps_and_gate_bias_in_transfer():
    """Through linearize: the maps and the gate start fresh (not copied from the teacher), attention transfer moves
    them, and the swapped layers' relative errors drop."""
    torch.manual_seed(0)
    model = GPT(16, dim=DIM, depth=2, num_heads=HEADS, attention="softmax", mlp_ratio=1.0)
    generator = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 16, (8, 13), generator=generator) for _ in range(4)]
    batches = [{"input_ids": t[:, :-1], "labels": t[:, 1:]} for t in ids]
    report = LinearizeReport()
    target = {"name": "gla", "feature_map": "hedgehog", "gate_bias_init": 4.0}
    linearize(model, target, data=batches, transfer_steps=30, finetune_steps=0, report=report)
    for path in report.swapped:
        for name in ("feature_map_q.weight", "feature_map_k.weight", "gk_proj.1.bias"):
            assert f"{path}.{name}" in report.fresh
        layer = model.get_submodule(path)
        assert not torch.allclose(layer.feature_map_q.weight, torch.eye(K).expand(HEADS, K, K), atol=1e-4)
        assert not torch.allclose(layer.gk_proj[1].bias, torch.full((DIM,), 4.0), atol=1e-4)
        assert report.transfer_layer_errors[path] < 0.9
    first, last = report.transfer_losses[0], report.transfer_losses[-1]
    assert last < 0.8 * first, (first, last)
